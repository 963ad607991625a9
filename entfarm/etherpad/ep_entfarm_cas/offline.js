'use strict';
/*
 * Preloaded with `node --require` before Etherpad's server.js (see the etherpad role's unit).
 * Etherpad 1.8 asks static.etherpad.org for its latest version at every start, before any plugin
 * is loaded and without a setting to turn it off. Farm hosts never reach the internet (DESIGN
 * principle 4): the check is replaced by one that reports "no update", so no request leaves.
 */
const path = require('path');

const updateCheck = require(path.join(__dirname, '..', 'ep_etherpad-lite', 'node', 'utils',
    'UpdateCheck'));
updateCheck.needsUpdate = (cb) => { if (cb) cb(false); };
updateCheck.check = () => {};
