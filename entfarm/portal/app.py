"""The portal's Flask application.

``create_app(config_path)`` builds it; gunicorn loads ``entfarm.portal.app:application``, built on
first use from the file named by ``ENTFARM_PORTAL_CONFIG`` (default
``/etc/entfarm-portal/portal.json``)::

    ENTFARM_PORTAL_CONFIG=/etc/entfarm-portal/portal.json \\
        gunicorn --preload --bind 127.0.0.1:8000 --access-logfile - \\
        --access-logformat '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)s' \\
        entfarm.portal.app:application

Sessions are Flask's signed cookies with a key shared by every node, so any node serves any
request and nothing is stored server side (see docs/architecture.md, "Portal").
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, NotFound

from . import cas
from .config import (
    DEFAULT_CONFIG_PATH,
    LOGO_TYPES,
    Branding,
    ConfigError,
    Departement,
    PortalConfig,
    load_config,
    read_secret_keys,
)
from .contrast import Palette, palette
from .identity import (
    Identity,
    etablissements,
    identity_from_cas,
    news_departement,
    profile_labels,
    tiles,
)
from .news import NewsStore

CONFIG_ENV = "ENTFARM_PORTAL_CONFIG"
PACKAGE_DIR = Path(__file__).resolve().parent
GENERIC_KEY = "portail"
# Requests whose line would only repeat the proxy's health checks and asset fetches.
QUIET_ENDPOINTS = {"healthz", "static", "theme", "logo", "icon"}
# A clock slightly ahead on the node that validated the ticket must not end the session.
CLOCK_SKEW = 300

log = logging.getLogger("entfarm.portal")


def _version() -> str:
    try:
        return package_version("entfarm")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Site:
    """The portal as reached on one host: its public URL and its branding."""

    key: str  # département code, or "portail" for the generic name
    url: str
    departement: Departement | None
    branding: Branding
    palette: Palette

    @property
    def login_service(self) -> str:
        return f"{self.url}connexion"

    @property
    def recheck_service(self) -> str:
        return f"{self.url}connexion?verif=1"

    @property
    def logged_out_url(self) -> str:
        return f"{self.url}deconnecte"


def _clean(text: str, limit: int = 200) -> str:
    """Log-safe: one line, no control characters, bounded."""
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])
    return shown + ("…" if len(text) > limit else "")


@dataclass(frozen=True)
class ErrorPage:
    title: str
    message: str
    retry: bool = False  # offer "Réessayer" (a new CAS login) rather than the home page


ERRORS: dict[int, ErrorPage] = {
    400: ErrorPage("Requête incorrecte", "La demande envoyée au portail n'est pas valide."),
    404: ErrorPage("Page introuvable", "L'adresse demandée n'existe pas sur ce portail."),
    405: ErrorPage("Action impossible", "Cette action n'est pas possible à cette adresse."),
    413: ErrorPage("Requête trop volumineuse", "La demande envoyée au portail est trop grande."),
    500: ErrorPage("Erreur du portail", "Une erreur inattendue s'est produite. Réessayez dans "
                   "quelques instants ; si elle persiste, prévenez l'assistance de l'ENT."),
}
CAS_REFUSED = ErrorPage(
    "Connexion non aboutie",
    "Votre connexion n'a pas pu être vérifiée : le ticket de connexion est invalide ou a expiré. "
    "Vous pouvez réessayer.", retry=True)
CAS_UNAVAILABLE = ErrorPage(
    "Service de connexion indisponible",
    "Le service de connexion de l'ENT ne répond pas pour le moment. Réessayez dans quelques "
    "instants.", retry=True)


def create_app(config_path: str | Path) -> Flask:
    """The portal for the configuration file at ``config_path``; raises ConfigError."""
    config = load_config(config_path)
    keys = read_secret_keys(config)
    app = Flask(__name__, static_folder=str(PACKAGE_DIR / "static"),
                template_folder=str(PACKAGE_DIR / "templates"))
    # Every template is escaped, whatever its name; news HTML is the only Markup.
    app.jinja_options = {**app.jinja_options, "autoescape": True, "trim_blocks": True,
                         "lstrip_blocks": True}
    app.config.update(
        SECRET_KEY=keys[0],
        SECRET_KEY_FALLBACKS=keys[1:],
        SESSION_COOKIE_NAME=config.session.cookie_name,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
        SESSION_COOKIE_DOMAIN=None,
        # The login time in the cookie bounds the session, not each request: no refresh.
        SESSION_REFRESH_EACH_REQUEST=False,
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=config.session.lifetime),
        # Only CAS logout requests are ever posted here, and they are small.
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    portal = _Portal(config)
    app.extensions["entfarm_portal"] = portal
    _routes(app, portal)
    return app


class _Portal:
    """What the requests share: configuration, sites per host, validator, news cache."""

    def __init__(self, config: PortalConfig):
        self.config = config
        self.version = _version()
        self.validator = cas.Validator(config.cas.validate_url, config.cas.ca_file,
                                       config.cas.timeout)
        self.news = NewsStore()
        self.generic = Site(GENERIC_KEY, config.portal_url, None, config.branding,
                            palette(config.branding.colors.primary,
                                    config.branding.colors.secondary))
        self.sites = {d.host: Site(d.code, d.url, d, d.branding,
                                   palette(d.branding.colors.primary, d.branding.colors.secondary))
                      for d in config.departements}
        cas_origin = urlsplit(config.cas.url)
        self.csp = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                    "script-src 'none'; object-src 'none'; base-uri 'none'; "
                    "frame-ancestors 'none'; "
                    f"form-action 'self' {cas_origin.scheme}://{cas_origin.netloc}")

    def site(self, host: str) -> Site:
        """The branding follows the Host the user came in on; unknown hosts get the generic."""
        dep = self.config.departement_for_host(host)
        return self.sites[dep.host] if dep is not None else self.generic

    def site_by_key(self, key: str) -> Site | None:
        if key == GENERIC_KEY:
            return self.generic
        return next((s for s in self.sites.values() if s.key == key), None)

    def identity(self) -> Identity | None:
        """The logged-in person, None when anonymous or the login is older than the lifetime."""
        found = Identity.from_session(session)
        if found is None:
            return None
        age = time.time() - found.authenticated_at
        if age >= self.config.session.lifetime or age < -CLOCK_SKEW:
            return None
        g.login = found.login
        return found


def _routes(app: Flask, portal: _Portal) -> None:
    config = portal.config

    def page(template: str, site: Site, status: int = 200, **context: Any) -> Response:
        theme = hashlib.sha256(repr(site.palette).encode()).hexdigest()[:10]
        body = render_template(
            template, site=site, brand=site.branding,
            logo_url=url_for("logo", key=site.key) if site.branding.logo else None,
            theme_url=url_for("theme", v=theme), **context)
        return Response(body, status=status, mimetype="text/html")

    def error_page(site: Site, status: int, error: ErrorPage) -> Response:
        return page("error.html", site, status, error=error, code=status)

    @app.get("/")
    def index() -> ResponseReturnValue:
        site = portal.site(request.host)
        identity = portal.identity()
        if identity is None:
            if session:
                session.clear()  # an expired or foreign cookie: drop it
            return redirect(cas.login_url(config.cas.url, site.login_service))
        recheck = config.session.recheck
        if recheck and time.time() - identity.authenticated_at >= recheck:
            # Stateless single logout: a silent round trip to the CAS tells whether the SSO
            # session still exists (it comes back with a ticket) or ended (without).
            return redirect(cas.login_url(config.cas.url, site.recheck_service, gateway=True))
        news_dep = news_departement(identity, config, site.departement)
        return page(
            "home.html", site,
            user=identity,
            labels=profile_labels(identity),
            etablissements=etablissements(identity, config),
            tiles=tiles(identity, config),
            news_dep=news_dep,
            news=portal.news.items(news_dep.news_dir if news_dep else None,
                                   config.news_limit),
        )

    @app.get("/connexion")
    def login() -> ResponseReturnValue:
        site = portal.site(request.host)
        recheck = request.args.get("verif") == "1"
        service = site.recheck_service if recheck else site.login_service
        ticket = request.args.get("ticket")
        if ticket is None:
            if recheck:
                # The CAS answered a gateway request without a ticket: its session is over.
                previous = Identity.from_session(session)
                g.login = previous.login if previous else None
                session.clear()
                g.event = "session CAS terminée"
                return redirect(url_for("logged_out", fin=1))
            return redirect(cas.login_url(config.cas.url, service))
        try:
            user = portal.validator.validate(service, ticket)
        except cas.CasError as exc:
            if session:
                session.clear()
            g.event = f"ticket refusé ({exc.code})"
            return error_page(site, 502 if exc.unavailable else 403,
                              CAS_UNAVAILABLE if exc.unavailable else CAS_REFUSED)
        identity = identity_from_cas(user.user, user.attributes)
        session.clear()
        session.update(identity.to_session())
        session.permanent = True
        g.login = identity.login
        g.event = "connexion"
        # Back to a URL without the ticket: it must not stay in the history or a Referer.
        return redirect(url_for("index"))

    @app.post("/connexion")
    def single_logout() -> ResponseReturnValue:
        # CAS back-channel logout. Sessions live in the browser's cookie only, so there is
        # nothing to delete here: the recheck interval bounds how long the portal session
        # outlives the CAS one (docs/architecture.md, "Portal").
        index = cas.parse_logout_request(request.form.get("logoutRequest", ""))
        g.event = "logoutRequest reçu" if index else "logoutRequest illisible"
        return Response("", status=200 if index else 400, mimetype="text/plain")

    @app.route("/deconnexion", methods=["GET", "POST"])
    def logout() -> ResponseReturnValue:
        site = portal.site(request.host)
        previous = Identity.from_session(session)
        g.login = previous.login if previous else None
        session.clear()
        g.event = "déconnexion"
        return redirect(cas.logout_url(config.cas.url, site.logged_out_url))

    @app.get("/deconnecte")
    def logged_out() -> ResponseReturnValue:
        site = portal.site(request.host)
        return page("logged_out.html", site, ended=request.args.get("fin") == "1")

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify(status="ok", version=portal.version)

    @app.get("/theme.css")
    def theme() -> ResponseReturnValue:
        p = portal.site(request.host).palette
        css = (":root{"
               f"--primaire:{p.header_bg};--sur-primaire:{p.header_text};"
               f"--accent:{p.accent};--fond:{p.page_bg};--texte-fond:{p.page_text};"
               f"--focus:{p.focus}"
               "}\n")
        response = Response(css, mimetype="text/css")
        response.cache_control.public = True
        response.cache_control.max_age = 3600
        return response

    def image(path: Path | None) -> Response:
        if path is None or not path.is_file():
            raise NotFound()
        response = Response(path.read_bytes(), mimetype=LOGO_TYPES[path.suffix.lower()])
        response.cache_control.public = True
        response.cache_control.max_age = 3600
        # An SVG opened on its own runs in the portal's origin: no scripts, no fetches.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox")
        return response

    @app.get("/logo/<key>")
    def logo(key: str) -> ResponseReturnValue:
        found = portal.site_by_key(key)
        return image(found.branding.logo if found else None)

    @app.get("/icones/<tile_id>")
    def icon(tile_id: str) -> ResponseReturnValue:
        tile = config.tile(tile_id)
        return image(tile.icon if tile else None)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        status = exc.code or 500
        error = ERRORS.get(status, ErrorPage("Erreur", exc.description or "Erreur."))
        response = error_page(portal.site(request.host), status, error)
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> ResponseReturnValue:
        # The traceback goes to the log (no request data in it); the user gets a French page.
        log.exception("internal error on %s %s", request.method, _clean(request.path))
        return error_page(portal.site(request.host), 500, ERRORS[500])

    @app.after_request
    def finish(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("Content-Security-Policy", portal.csp)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html" and not response.cache_control.public:
            # Pages carry the person's name and établissements.
            response.cache_control.no_store = True
            response.cache_control.private = True
        if request.endpoint not in QUIET_ENDPOINTS:
            login = g.get("login")
            event = g.get("event")
            # One line per request; the login is the only personal data, never the query
            # string (it carries tickets), names, profiles or attributes.
            log.info("%s %s %s %s%s", request.method, _clean(request.path),
                     response.status_code, _clean(login, 64) if login else "-",
                     f" {event}" if event else "")
        return response


def configure_logging() -> None:
    """One line per event on stderr (journald under systemd), when nothing else set it up."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


_application: Flask | None = None


def __getattr__(name: str) -> Flask:
    """``application``, built on first access so that importing this module reads no file."""
    global _application
    if name != "application":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _application is None:
        configure_logging()
        path = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
        try:
            _application = create_app(path)
        except ConfigError as exc:
            log.error("%s", exc)
            raise
    return _application
