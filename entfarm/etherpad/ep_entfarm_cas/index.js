'use strict';
/*
 * ep_entfarm_cas: only authenticated ENT users get into Etherpad.
 *
 * Etherpad runs with requireAuthentication: every request without a user in its session reaches
 * the authnFailure hook (webaccess.js, step 3). There, a request carrying a CAS service ticket
 * has it validated server to server (CAS 3.0 /p3/serviceValidate, TLS checked against the farm
 * CA); the person's profiles must be among the allowed ones, then the user goes into the
 * session and the browser is sent back to the same URL without the ticket. Any other request
 * is sent to the CAS login page (pages) or refused with 401 (socket.io, XHR). Nothing here
 * logs an address or a ticket.
 *
 * Établissement pads: a pad named "<UAI>.<anything>" (0360005K.conseil) opens only to people of
 * that établissement (the UAIs the CAS releases for them), and only once the établissement is
 * onboarded: its UAI listed in the tenants file (a JSON list the etherpad role writes; a wave
 * adds each batch's UAIs). The file is read again when it changes, without a restart. The
 * refusal happens before Etherpad grants the pad (preAuthorize), so the socket that edits the
 * pad is refused too (Etherpad's SecurityManager requires that grant); a CLIENT_READY for a
 * refused pad is also dropped, for sessions granted before the établissement was taken out.
 *
 * Configuration: settings.json's "ep_entfarm_cas" object (keys below, see the etherpad role).
 */

const fs = require('fs');
const https = require('https');
const http = require('http');
const {URL, URLSearchParams} = require('url');

const settings = require('ep_etherpad-lite/node/utils/Settings');
const authorManager = require('ep_etherpad-lite/node/db/AuthorManager');
const readOnlyManager = require('ep_etherpad-lite/node/db/ReadOnlyManager');
const log4js = require('ep_etherpad-lite/node_modules/log4js');

const logger = log4js.getLogger('ep_entfarm_cas');

const TICKET = /^ST-[A-Za-z0-9._~-]{1,253}$/;
const MAX_RESPONSE_BYTES = 1 << 20;
// LemonLDAP::NG joins multi-valued attributes with ';' when it releases a macro.
const VALUE_SEPARATOR = ';';

let cached = null;
const config = () => {
  if (cached != null) return cached;
  const raw = settings.ep_entfarm_cas || {};
  for (const key of ['publicUrl', 'casLoginUrl', 'casValidateUrl', 'allowedProfiles']) {
    if (!raw[key]) throw new Error(`ep_entfarm_cas: settings.json lacks ep_entfarm_cas.${key}`);
  }
  cached = {
    publicUrl: new URL(raw.publicUrl),
    casLoginUrl: String(raw.casLoginUrl).replace(/\/?$/, '/'),
    casValidateUrl: new URL(String(raw.casValidateUrl).replace(/\/?$/, '/')),
    ca: raw.caFile ? fs.readFileSync(raw.caFile) : undefined,
    timeoutMs: (raw.timeout || 10) * 1000,
    allowedProfiles: new Set(raw.allowedProfiles.map((p) => String(p).toLowerCase())),
    tenantsFile: raw.tenantsFile ? String(raw.tenantsFile) : null,
  };
  return cached;
};

// "<UAI>.<name>": an établissement's pad (a UAI is 7 digits, then a letter).
const UAI_PAD = /^([0-9]{7}[A-Z])\.(.+)$/;
let tenantsRead = {mtimeMs: null, size: null, uais: new Set()};

// The onboarded UAIs, read again when the file changed. A missing file opens none; a file that
// does not parse keeps what was read before (the role writes it whole, never in place).
const tenants = () => {
  const {tenantsFile} = config();
  if (!tenantsFile) return new Set();
  let stat;
  try {
    stat = fs.statSync(tenantsFile);
  } catch (err) {
    if (tenantsRead.mtimeMs !== 0) logger.warn(`no tenants file ${tenantsFile}: no pad opens`);
    tenantsRead = {mtimeMs: 0, size: 0, uais: new Set()};
    return tenantsRead.uais;
  }
  if (stat.mtimeMs !== tenantsRead.mtimeMs || stat.size !== tenantsRead.size) {
    try {
      const list = JSON.parse(fs.readFileSync(tenantsFile, 'utf8'));
      if (!Array.isArray(list)) throw new Error('not a JSON list');
      tenantsRead = {mtimeMs: stat.mtimeMs, size: stat.size, uais: new Set(list.map(String))};
    } catch (err) {
      logger.error(`cannot read ${tenantsFile}: ${err.message}; keeping the previous list`);
    }
  }
  return tenantsRead.uais;
};

// Why this user may not open this pad (a sentence for the refusal page), or null.
const tenantRefusal = (padId, user) => {
  const m = UAI_PAD.exec(padId);
  if (!m) return null;
  const uai = m[1];
  if (!tenants().has(uai)) return `Les pads de l’établissement ${uai} ne sont pas ouverts.`;
  if (!(user.uais || []).includes(uai)) {
    return `Ce pad est réservé aux personnes de l’établissement ${uai}.`;
  }
  return null;
};

// The pad a request or message is about: read-only ids ("r.…") stand for their pad.
const realPadId = async (padId) => readOnlyManager.isReadOnlyId(padId)
  ? (await readOnlyManager.getPadId(padId)) || padId : padId;

// The URL the browser asked for, on the configured public origin (never the Host header), with
// the CAS ticket removed: this is the CAS "service" and where the browser returns.
const serviceUrl = (req) => {
  const {publicUrl} = config();
  const url = new URL(req.originalUrl || req.url, publicUrl);
  const clean = new URL(url.pathname, publicUrl);
  for (const [k, v] of url.searchParams) if (k !== 'ticket') clean.searchParams.append(k, v);
  return clean.toString();
};

const decode = (text) => text
    .replace(/&#x([0-9a-fA-F]+);/g, (_, h) => String.fromCodePoint(parseInt(h, 16)))
    .replace(/&#([0-9]+);/g, (_, d) => String.fromCodePoint(parseInt(d, 10)))
    .replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"')
    .replace(/&apos;/g, '\'').replace(/&amp;/g, '&');

// A cas:serviceResponse: {user, attributes: {name: [values]}} or {failure: code}.
const parseServiceResponse = (body) => {
  if (/<!DOCTYPE|<!ENTITY/i.test(body)) return {failure: 'DTD_REFUSED'};
  const failure = body.match(/<cas:authenticationFailure[^>]*code="([^"]*)"/);
  if (failure) return {failure: failure[1]};
  const success = body.match(/<cas:authenticationSuccess>([\s\S]*)<\/cas:authenticationSuccess>/);
  if (!success) return {failure: 'UNEXPECTED_RESPONSE'};
  const user = success[1].match(/<cas:user>([^<]*)<\/cas:user>/);
  if (!user || !user[1].trim()) return {failure: 'NO_USER'};
  const attributes = {};
  const block = success[1].match(/<cas:attributes>([\s\S]*)<\/cas:attributes>/);
  const re = /<cas:([A-Za-z0-9_.-]+)>([^<]*)<\/cas:\1>/g;
  let m;
  while (block && (m = re.exec(block[1])) !== null) {
    const values = decode(m[2]).split(VALUE_SEPARATOR).map((v) => v.trim()).filter((v) => v);
    attributes[m[1]] = (attributes[m[1]] || []).concat(values);
  }
  return {user: decode(user[1].trim()), attributes};
};

const validate = (service, ticket) => new Promise((resolve) => {
  const {casValidateUrl, ca, timeoutMs} = config();
  const url = new URL('p3/serviceValidate', casValidateUrl);
  url.search = new URLSearchParams({service, ticket}).toString();
  const client = url.protocol === 'https:' ? https : http;
  // No proxy from the environment: it would see tickets.
  const request = client.get(url, {ca, timeout: timeoutMs, agent: false}, (res) => {
    if (res.statusCode !== 200) {
      res.resume();
      return resolve({failure: `HTTP_${res.statusCode}`});
    }
    const chunks = [];
    let size = 0;
    res.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_RESPONSE_BYTES) return request.destroy(new Error('RESPONSE_TOO_LARGE'));
      chunks.push(chunk);
    });
    res.on('end', () => resolve(parseServiceResponse(Buffer.concat(chunks).toString('utf8'))));
  });
  request.on('timeout', () => request.destroy(new Error('TIMEOUT')));
  request.on('error', (err) => resolve({failure: `UNREACHABLE: ${err.code || err.message}`}));
});

const page = (res, status, title, text) => {
  res.status(status).set({
    'Content-Type': 'text/html; charset=utf-8',
    'Cache-Control': 'no-store',
  }).send(`<!doctype html><html lang="fr"><head><meta charset="utf-8"><title>${title}</title>` +
          `</head><body><main><h1>${title}</h1><p>${text}</p></main></body></html>`);
};

// Pages get a redirect to the CAS; requests a page makes in the background get 401, since a
// redirect to the CAS login form would not mean anything to them.
const wantsPage = (req) => req.method === 'GET' && !/^\/socket\.io\//.test(req.path) &&
    !(req.headers['x-requested-with'] === 'XMLHttpRequest');

const login = async (req, res) => {
  // Signed in already, yet refused (the admin pages: there is no admin): a new CAS round trip
  // would bring the same person back here, forever.
  if (req.session && req.session.user) {
    page(res, 403, 'Accès refusé', 'Vous n’avez pas accès à cette page.');
    return;
  }
  const service = serviceUrl(req);
  const ticket = typeof req.query.ticket === 'string' ? req.query.ticket : null;
  if (ticket == null) {
    if (!wantsPage(req)) {
      res.status(401).set('Cache-Control', 'no-store').send('Authentication Required');
      return;
    }
    res.redirect(302, `${config().casLoginUrl}login?${new URLSearchParams({service})}`);
    return;
  }
  const answer = TICKET.test(ticket) ? await validate(service, ticket)
    : {failure: 'INVALID_TICKET_FORMAT'};
  if (answer.failure) {
    logger.warn(`CAS ticket refused: ${answer.failure}`);
    page(res, answer.failure.startsWith('HTTP_') || answer.failure.startsWith('UNREACHABLE')
      ? 503 : 403, 'Connexion impossible',
    'Le service d’authentification n’a pas confirmé votre connexion. ' +
         `<a href="${service.replace(/"/g, '&quot;')}">Réessayer</a>.`);
    return;
  }
  const profiles = answer.attributes.ENTPersonProfils || [];
  const {allowedProfiles} = config();
  if (!profiles.some((p) => allowedProfiles.has(p.toLowerCase()))) {
    logger.warn(`access refused to ${answer.user}: no allowed profile`);
    page(res, 403, 'Accès refusé',
        'Les pads collaboratifs ne sont pas ouverts à votre profil.');
    return;
  }
  const displayName = (answer.attributes.displayName || answer.attributes.cn || [answer.user])[0];
  // A fresh session for a fresh login: an earlier session id is not reused (session fixation).
  await new Promise((resolve, reject) => req.session.regenerate((e) => e ? reject(e) : resolve()));
  const uais = [...new Set([
    ...(answer.attributes.ENTStructureUAI || []),
    ...(answer.attributes.ENTEtablissementsUAI || []),
  ].map((u) => u.toUpperCase()))];
  req.session.user = {
    username: answer.user,
    displayName,
    profiles,
    uais,
    is_admin: false,
    entfarmCas: true,
  };
  res.redirect(302, service);
};

exports.authnFailure = (hookName, {req, res}, cb) => {
  login(req, res).then(() => cb([true]), (err) => {
    logger.error(`CAS login failed: ${err.stack || err}`);
    if (!res.headersSent) page(res, 500, 'Erreur', 'Erreur interne.');
    cb([true]);
  });
};

// Authenticated but refused (e.g. the admin pages): a plain 403, never the basic-auth prompt.
exports.authzFailure = (hookName, {res}, cb) => {
  page(res, 403, 'Accès refusé', 'Vous n’avez pas accès à cette page.');
  cb([true]);
};

// The pad shows the person's name from the directory, to them and to the others.
exports.clientVars = (hookName, {clientVars, socket}, cb) => {
  const {session: {user} = {}} = socket.client.request;
  if (!user || !user.displayName || !clientVars.userId) return cb([]);
  authorManager.setAuthorName(clientVars.userId, user.displayName).then(
      () => cb([{userName: user.displayName}]),
      (err) => {
        logger.error(`cannot set the author name: ${err.stack || err}`);
        cb([]);
      });
};

// An établissement's pad, asked for by a signed-in user who may not open it: refused before
// Etherpad grants it. Anyone not signed in yet goes through the CAS first (authnFailure), then
// comes back here.
exports.preAuthorize = (hookName, {req}, cb) => {
  const m = req.path.match(/^\/p\/([^/]+)/);
  const user = req.session && req.session.user;
  if (!m || !user) return cb([]);
  let padId;
  try {
    padId = decodeURIComponent(m[1]);
  } catch (err) {
    return cb([]); // Etherpad answers a malformed pad name itself
  }
  realPadId(padId).then((id) => {
    const refusal = tenantRefusal(id, user);
    if (refusal == null) return cb([]);
    req.entfarmRefusal = refusal;
    logger.info(`pad refused to ${user.username}: ${refusal}`);
    cb([false]);
  }, (err) => {
    logger.error(`cannot check the pad's établissement: ${err.stack || err}`);
    req.entfarmRefusal = 'Erreur interne.';
    cb([false]);
  });
};

exports.preAuthzFailure = (hookName, {req, res}, cb) => {
  if (!req.entfarmRefusal) return cb([]);
  page(res, 403, 'Accès refusé', req.entfarmRefusal);
  cb([true]);
};

// A pad opened earlier in the same session, before its établissement was taken out: the
// socket's first message is dropped as well.
exports.handleMessage = (hookName, {message, socket}, cb) => {
  if (!message || message.type !== 'CLIENT_READY' || typeof message.padId !== 'string') {
    return cb([]);
  }
  const {session: {user} = {}} = socket.client.request;
  realPadId(message.padId).then((id) => {
    const refusal = user ? tenantRefusal(id, user) : null;
    if (refusal != null) logger.info(`pad socket refused to ${user.username}: ${refusal}`);
    cb(refusal == null ? [] : [null]);
  }, (err) => {
    logger.error(`cannot check the pad's établissement: ${err.stack || err}`);
    cb([null]);
  });
};

// For the unit tests of this plugin.
exports._parseServiceResponse = parseServiceResponse;
exports._tenantRefusal = tenantRefusal;
exports._UAI_PAD = UAI_PAD;
