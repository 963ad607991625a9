"""The portal application with Flask's test client, against a stand-in CAS server.

The stand-in is a tiny HTTP server on 127.0.0.1 answering /cas/p3/serviceValidate with CAS 3.0
XML, so that the portal's real validation code (urllib, XML parsing) runs; the real CAS is
exercised by the lab browser tests.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit
from xml.sax.saxutils import escape

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from entfarm.model import load_farm
from entfarm.portal.app import create_app
from entfarm.portal.cas import parse_logout_request, parse_service_response
from entfarm.portal.config import ConfigError, load_config, parse_config
from entfarm.portal.contrast import (
    BLACK,
    TEXT_RATIO,
    WHITE,
    contrast_ratio,
    darken_until,
    palette,
    text_on,
)
from entfarm.portal.news import NewsStore

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab"
COOKIE = "__Host-entfarm-portail"
CAS_URL = "https://cas.ent.test:8443/cas/"
INDRE = "indre.ent.test"
LOIRET = "loiret.ent.test"
PORTAIL = "portail.ent.test"
SECRET = "0123456789abcdef" * 4

# -- the stand-in CAS ----------------------------------------------------------------------------

PEOPLE: dict[str, tuple[str, dict[str, list[str]]]] = {
    "ST-eleve": ("lea.martin", {
        "uid": ["lea.martin"], "displayName": ["Léa Martin"], "mail": ["lea@example.org"],
        "ENTPersonProfils": ["National_ELV"], "ENTStructureUAI": ["0360005K"],
        "ENTEtablissementsUAI": ["0360005K"],
    }),
    "ST-parent": ("sophie.martin", {
        "uid": ["sophie.martin"], "displayName": ["Sophie Martin"],
        "ENTPersonProfils": ["National_TUT"], "ENTStructureUAI": ["0360005K"],
        # As LemonLDAP::NG's macro joins it: one value with ';'.
        "ENTEtablissementsUAI": ["0360005K;0450022E"],
        "ENTAuxPersRelEleveEnfants": ["0360005K$Léa Martin", "0450022E$Hugo Martin",
                           "0360005K$Adèle Martin"],
    }),
    "ST-parent-sans-enfants": ("paul.durand", {
        "uid": ["paul.durand"], "displayName": ["Paul Durand"],
        "ENTPersonProfils": ["National_TUT"], "ENTStructureUAI": ["0360005K"],
        "ENTEtablissementsUAI": ["0360005K;0450022E"],
    }),
    "ST-enseignant": ("marc.petit", {
        "uid": ["marc.petit"], "displayName": ["Marc Petit"],
        "ENTPersonProfils": ["National_ENS"], "ENTStructureUAI": ["0450022E"],
        # As repeated elements this time.
        "ENTEtablissementsUAI": ["0450022E", "0450040Z"],
    }),
}


def service_response(ticket: str) -> str:
    if ticket not in PEOPLE:
        return ('<cas:serviceResponse xmlns:cas="http://www.yale.edu/tp/cas">'
                f'<cas:authenticationFailure code="INVALID_TICKET">Ticket {escape(ticket)} '
                "not recognized</cas:authenticationFailure></cas:serviceResponse>")
    user, attributes = PEOPLE[ticket]
    attrs = "".join(f"<cas:{k}>{escape(v)}</cas:{k}>" for k, vs in attributes.items()
                    for v in vs)
    return ('<cas:serviceResponse xmlns:cas="http://www.yale.edu/tp/cas">'
            f"<cas:authenticationSuccess><cas:user>{escape(user)}</cas:user>"
            f"<cas:attributes>{attrs}</cas:attributes>"
            "</cas:authenticationSuccess></cas:serviceResponse>")


@dataclass
class StandInCas:
    url: str
    calls: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def cas_server() -> Iterator[StandInCas]:
    calls: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path != "/cas/p3/serviceValidate":
                self.send_error(404)
                return
            calls.append(query)
            body = service_response(query.get("ticket", "")).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/xml; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield StandInCas(f"http://127.0.0.1:{server.server_address[1]}/cas/", calls)
    finally:
        server.shutdown()
        server.server_close()


# -- a portal configuration ----------------------------------------------------------------------

NEWS_036 = {
    "2026-01-10-ancienne.md": "# Ancienne nouvelle\n\nTexte ancien.\n",
    "2026-03-05-recente.md": (
        "# Nouvelle récente\n\nBonjour <script>alert('x')</script> à tous.\n\n"
        "[piège](javascript:alert(1))\n\n## Sous-titre\n\n**gras**\n"),
    "2999-01-01-future.md": "# Nouvelle du futur\n\nPas encore publiée.\n",
    "brouillon.md": "# Brouillon\n",
}
NEWS_045 = {"2026-02-01-loiret.md": "# Nouvelle du Loiret\n\nTexte.\n"}


def config_data(cas_validate_url: str) -> dict[str, Any]:
    def branding(name: str, logo: str | None, primary: str, secondary: str) -> dict[str, Any]:
        return {"name": name, "logo": logo,
                "colors": {"primary": primary, "secondary": secondary}}

    return {
        "format": 1,
        "cas": {"url": CAS_URL, "validate_url": cas_validate_url, "timeout": 5},
        "portal": {"url": f"https://{PORTAIL}:8443/",
                   "branding": branding("ENT de l'académie", None, "#1f3f66", "#f2f4f7")},
        "departements": [
            {"code": "036", "name": "Indre", "url": f"https://{INDRE}:8443/",
             "branding": branding("ENT des collèges de l'Indre", "logos/indre.svg",
                                  "#005a8c", "#e6f0f5"),
             "news_dir": "news/036"},
            {"code": "045", "name": "Loiret", "url": f"https://{LOIRET}:8443/",
             "branding": branding("ENT des collèges du Loiret", "logos/loiret.svg",
                                  "#7a1f3d", "#f6eaee"),
             "news_dir": "news/045"},
        ],
        "etablissements": [
            {"uai": "0360005K", "name": "Collège Les Capucins", "commune": "Châteauroux",
             "departement": "036"},
            {"uai": "0360010R", "name": "Collège Jean Moulin", "commune": "Issoudun",
             "departement": "036"},
            {"uai": "0450022E", "name": "Collège Jeanne d'Arc", "commune": "Orléans",
             "departement": "045"},
            {"uai": "0450040Z", "name": "Collège Val de Loire", "commune": "Montargis",
             "departement": "045"},
        ],
        "tiles": [
            {"id": "pad", "label": "Pad collaboratif", "url": "https://pad.ent.test:8443/",
             "description": "Écrire à plusieurs.", "profiles": ["eleve", "enseignant"]},
            {"id": "cours", "label": "Cours en ligne", "url": "https://moodle.ent.test:8443/",
             "profiles": ["eleve", "parent", "enseignant"]},
            {"id": "parents", "label": "Espace parents", "url": "https://parents.ent.test/",
             "icon": "icons/parents.svg", "profiles": ["parent"]},
            {"id": "supervision", "label": "Supervision", "url": "https://supervision.ent.test/",
             "profiles": ["administrateur"]},
        ],
        "session": {"secret_key_file": "secret_key", "lifetime": 3600, "recheck": 600},
        "news_limit": 5,
    }


def write_portal_dir(directory: Path, data: dict[str, Any], secret: str = SECRET) -> Path:
    for code, files in (("036", NEWS_036), ("045", NEWS_045)):
        news = directory / "news" / code
        news.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (news / name).write_text(text, encoding="utf-8")
    (directory / "logos").mkdir(exist_ok=True)
    for name in ("indre.svg", "loiret.svg"):
        (directory / "logos" / name).write_bytes((LAB / "logos" / name).read_bytes())
    (directory / "icons").mkdir(exist_ok=True)
    (directory / "icons" / "parents.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1 1"/>', encoding="utf-8")
    (directory / "secret_key").write_text(secret + "\n", encoding="utf-8")
    path = directory / "portal.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path, cas_server: StandInCas) -> Path:
    return write_portal_dir(tmp_path, config_data(cas_server.url))


@pytest.fixture
def app(config_path: Path) -> Flask:
    return create_app(config_path)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def get(client: FlaskClient, host: str, path: str, **kwargs: Any) -> TestResponse:
    return client.get(path, base_url=f"https://{host}", **kwargs)


def login(client: FlaskClient, ticket: str, host: str = INDRE) -> TestResponse:
    return get(client, host, "/connexion?" + urlencode({"ticket": ticket}))


def home(client: FlaskClient, ticket: str, host: str = INDRE) -> Page:
    answer = login(client, ticket, host)
    assert answer.status_code == 302, answer.get_data(as_text=True)
    page = get(client, host, "/")
    assert page.status_code == 200, page.headers.get("Location")
    return Page.of(page)


# -- reading pages -------------------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        parts = [c if isinstance(c, str) else c.text for c in self.children]
        return " ".join(" ".join(parts).split())

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and (cls is None or cls in child.attrs.get("class", "")
                                         .split()):
                    found.append(child)
                found += child.find_all(tag, cls)
        return found


VOID = {"meta", "link", "img", "br", "hr", "input", "source"}


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


@dataclass
class Page:
    html: str
    root: Node

    @classmethod
    def of(cls, response: TestResponse) -> Page:
        html = response.get_data(as_text=True)
        tree = _Tree()
        tree.feed(html)
        tree.close()
        assert len(tree.stack) == 1, f"unclosed <{tree.stack[-1].tag}>"
        return cls(html, tree.root)

    @property
    def text(self) -> str:
        return self.root.text

    def etablissements(self) -> dict[str, list[str]]:
        """Établissement name -> the children listed under it."""
        out = {}
        for card in self.root.find_all("li", "etab"):
            name = card.find_all("h3")[0].text
            out[name] = [li.text for ul in card.find_all("ul", "etab__enfants")
                         for li in ul.find_all("li")]
        return out

    def tiles(self) -> list[str]:
        return [li.attrs["data-service"] for li in self.root.find_all("li", "tuile")]

    def news_titles(self) -> list[str]:
        return [a.find_all("h3")[0].text for a in self.root.find_all("article", "actu")]


# -- login ---------------------------------------------------------------------------------------


def test_anonymous_is_sent_to_cas_login_with_the_hosts_service(client: FlaskClient) -> None:
    answer = get(client, INDRE, "/")
    assert answer.status_code == 302
    assert answer.headers["Location"] == CAS_URL + "login?" + urlencode(
        {"service": f"https://{INDRE}:8443/connexion"})
    generic = get(client, "unknown.example:8000", "/")
    assert parse_qs(urlsplit(generic.headers["Location"]).query)["service"] == [
        f"https://{PORTAIL}:8443/connexion"]
    assert "Set-Cookie" not in answer.headers


def test_ticket_is_validated_then_stripped_from_the_url(
        client: FlaskClient, cas_server: StandInCas) -> None:
    answer = login(client, "ST-eleve")
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/"
    assert cas_server.calls[-1] == {"service": f"https://{INDRE}:8443/connexion",
                                    "ticket": "ST-eleve"}
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(COOKIE + "=")
    for flag in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert flag in cookie, cookie
    assert "Domain=" not in cookie


def test_eleve_sees_their_college_and_only_their_tiles(client: FlaskClient) -> None:
    page = home(client, "ST-eleve")
    assert page.root.find_all("h1")[0].text == "Bonjour Léa Martin"
    assert "Profil : élève" in page.text
    assert page.etablissements() == {"Collège Les Capucins": []}
    assert "Châteauroux" in page.text
    assert page.tiles() == ["pad", "cours"]
    assert "https://pad.ent.test:8443/" in page.html
    assert "lea@example.org" not in page.html


def test_parent_sees_each_child_under_its_college(client: FlaskClient) -> None:
    page = home(client, "ST-parent")
    assert page.etablissements() == {
        "Collège Les Capucins": ["Adèle Martin", "Léa Martin"],
        "Collège Jeanne d'Arc": ["Hugo Martin"],
    }
    assert "Orléans" in page.text and "Châteauroux" in page.text
    assert page.tiles() == ["cours", "parents"]
    assert "Profil : parent" in page.text


def test_parent_without_the_children_attribute_sees_the_colleges(client: FlaskClient) -> None:
    page = home(client, "ST-parent-sans-enfants")
    assert page.etablissements() == {"Collège Les Capucins": [], "Collège Jeanne d'Arc": []}
    assert page.tiles() == ["cours", "parents"]


def test_enseignant_sees_both_colleges_main_first(client: FlaskClient) -> None:
    page = home(client, "ST-enseignant", host=LOIRET)
    assert list(page.etablissements()) == ["Collège Jeanne d'Arc", "Collège Val de Loire"]
    assert page.tiles() == ["pad", "cours"]


def test_bad_ticket_gives_a_french_error_page_and_no_session(
        client: FlaskClient, cas_server: StandInCas) -> None:
    answer = login(client, "ST-inconnu")
    assert answer.status_code == 403
    page = Page.of(answer)
    assert page.root.find_all("html")[0].attrs["lang"] == "fr"
    assert page.root.find_all("h1")[0].text == "Connexion non aboutie"
    retry = [a for a in page.root.find_all("a") if a.text == "Réessayer"]
    assert retry and retry[0].attrs["href"] == "/connexion"
    assert "Traceback" not in page.html and "ST-inconnu" not in page.html
    assert client.get_cookie(COOKIE, domain=INDRE) is None
    assert get(client, INDRE, "/").status_code == 302


def test_malformed_ticket_is_refused_without_asking_cas(
        client: FlaskClient, cas_server: StandInCas) -> None:
    before = len(cas_server.calls)
    answer = get(client, INDRE, "/connexion?ticket=%3Cscript%3E")
    assert answer.status_code == 403
    assert len(cas_server.calls) == before


def test_unreachable_cas_is_a_french_error_page(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(write_portal_dir(tmp_path, config_data(f"http://127.0.0.1:{port}/cas/")))
    answer = login(app.test_client(), "ST-eleve")
    assert answer.status_code == 502
    assert "Service de connexion indisponible" in answer.get_data(as_text=True)
    assert "Réessayer" in answer.get_data(as_text=True)


def test_logout_clears_the_cookie_and_ends_the_cas_session(client: FlaskClient) -> None:
    login(client, "ST-eleve")
    answer = client.post("/deconnexion", base_url=f"https://{INDRE}")
    assert answer.status_code == 302
    assert answer.headers["Location"] == CAS_URL + "logout?" + urlencode(
        {"service": f"https://{INDRE}:8443/deconnecte"})
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(COOKIE + "=;") and "Expires=Thu, 01 Jan 1970" in cookie
    assert client.get_cookie(COOKIE, domain=INDRE) is None
    assert get(client, INDRE, "/").status_code == 302
    page = get(client, INDRE, "/deconnecte")
    assert page.status_code == 200 and "Vous êtes déconnecté" in page.get_data(as_text=True)


def test_a_cookie_from_one_node_is_accepted_by_another(config_path: Path) -> None:
    node1, node2 = create_app(config_path), create_app(config_path)
    browser = node1.test_client()
    login(browser, "ST-parent")
    cookie = browser.get_cookie(COOKIE, domain=INDRE)
    assert cookie is not None
    other = node2.test_client()
    other.set_cookie(COOKIE, cookie.value, domain=INDRE)
    answer = get(other, INDRE, "/")
    assert answer.status_code == 200
    assert "Bonjour Sophie Martin" in answer.get_data(as_text=True)


def test_a_cookie_signed_with_another_key_is_not(config_path: Path, tmp_path: Path,
                                                 cas_server: StandInCas) -> None:
    browser = create_app(config_path).test_client()
    login(browser, "ST-eleve")
    cookie = browser.get_cookie(COOKIE, domain=INDRE)
    assert cookie is not None
    other_dir = tmp_path / "autre"
    other_dir.mkdir()
    stranger = create_app(write_portal_dir(other_dir, config_data(cas_server.url),
                                           secret="f" * 64)).test_client()
    stranger.set_cookie(COOKIE, cookie.value, domain=INDRE)
    assert get(stranger, INDRE, "/").status_code == 302


def test_previous_key_still_accepted_after_rotation(config_path: Path, tmp_path: Path,
                                                    cas_server: StandInCas) -> None:
    browser = create_app(config_path).test_client()
    login(browser, "ST-eleve")
    cookie = browser.get_cookie(COOKIE, domain=INDRE)
    assert cookie is not None
    rotated_dir = tmp_path / "rotation"
    rotated_dir.mkdir()
    (rotated_dir / "old_key").write_text(SECRET, encoding="utf-8")
    data = config_data(cas_server.url)
    data["session"]["previous_secret_key_files"] = ["old_key"]
    rotated = create_app(write_portal_dir(rotated_dir, data, secret="e" * 64)).test_client()
    rotated.set_cookie(COOKIE, cookie.value, domain=INDRE)
    assert get(rotated, INDRE, "/").status_code == 200


def test_session_older_than_the_lifetime_is_a_new_login(client: FlaskClient) -> None:
    login(client, "ST-eleve")
    with client.session_transaction(base_url=f"https://{INDRE}") as session:
        session["auth"] -= 3600
    answer = get(client, INDRE, "/")
    assert answer.status_code == 302
    assert "gateway" not in answer.headers["Location"]


def test_recheck_asks_cas_silently_and_ends_the_session_when_cas_has(
        client: FlaskClient) -> None:
    login(client, "ST-eleve")
    with client.session_transaction(base_url=f"https://{INDRE}") as session:
        session["auth"] -= 601
    answer = get(client, INDRE, "/")
    assert answer.status_code == 302
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    assert query == {"service": [f"https://{INDRE}:8443/connexion?verif=1"],
                     "gateway": ["true"]}
    # The CAS session is still there: a new ticket, validated for the same service.
    renewed = get(client, INDRE, "/connexion?verif=1&ticket=ST-eleve")
    assert renewed.status_code == 302 and renewed.headers["Location"] == "/"
    assert get(client, INDRE, "/").status_code == 200
    # It is over (logged out elsewhere): back without a ticket, the portal session ends too.
    with client.session_transaction(base_url=f"https://{INDRE}") as session:
        session["auth"] -= 601
    ended = get(client, INDRE, "/connexion?verif=1")
    assert ended.status_code == 302 and ended.headers["Location"] == "/deconnecte?fin=1"
    assert client.get_cookie(COOKIE, domain=INDRE) is None
    assert "Session terminée" in get(client, INDRE, "/deconnecte?fin=1").get_data(as_text=True)


def test_single_logout_request_is_accepted(client: FlaskClient) -> None:
    request = ('<samlp:LogoutRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
               'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="LR-1" Version="2.0" '
               'IssueInstant="2026-11-23T10:00:00Z"><saml:NameID>@NOT_USED@</saml:NameID>'
               "<samlp:SessionIndex>ST-eleve</samlp:SessionIndex></samlp:LogoutRequest>")
    answer = client.post("/connexion", base_url=f"https://{INDRE}",
                         data={"logoutRequest": request})
    assert answer.status_code == 200
    assert parse_logout_request(request) == "ST-eleve"
    junk = client.post("/connexion", base_url=f"https://{INDRE}", data={"x": "y"})
    assert junk.status_code == 400


# -- what the page looks like --------------------------------------------------------------------


def test_branding_follows_the_host(client: FlaskClient) -> None:
    indre = home(client, "ST-eleve", INDRE)
    assert "ENT des collèges de l'Indre" in indre.text
    assert indre.root.find_all("img", "entete__logo")[0].attrs["src"] == "/logo/036"
    loiret = home(client, "ST-eleve", LOIRET)
    assert "ENT des collèges du Loiret" in loiret.text
    generic = home(client, "ST-eleve", PORTAIL)
    assert "ENT de l'académie" in generic.text
    assert not generic.root.find_all("img", "entete__logo")
    assert "--primaire:#005a8c" in get(client, INDRE, "/theme.css").get_data(as_text=True)
    assert "--primaire:#7a1f3d" in get(client, LOIRET, "/theme.css").get_data(as_text=True)
    logo = get(client, LOIRET, "/logo/045")
    assert logo.status_code == 200 and logo.mimetype == "image/svg+xml"
    assert "sandbox" in logo.headers["Content-Security-Policy"]
    assert get(client, INDRE, "/logo/999").status_code == 404
    assert get(client, INDRE, "/icones/parents").mimetype == "image/svg+xml"


def test_news_newest_first_escaped_and_from_the_users_departement(client: FlaskClient) -> None:
    # An Indre élève on the Loiret domain: Loiret branding, Indre news.
    page = home(client, "ST-eleve", LOIRET)
    assert "ENT des collèges du Loiret" in page.text
    assert page.news_titles() == ["Nouvelle récente", "Ancienne nouvelle"]
    assert "<script" not in page.html
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in page.html
    assert "Bonjour <script>alert('x')</script> à tous." in page.text
    assert 'href="javascript:' not in page.html
    assert "<h4>Sous-titre</h4>" in page.html and "<strong>gras</strong>" in page.html
    assert '<time datetime="2026-03-05">5 mars 2026</time>' in page.html
    assert "Nouvelle du futur" not in page.html and "Brouillon" not in page.html


def test_news_store_limit_and_dates(tmp_path: Path) -> None:
    for day in ("2026-09-01", "2026-09-02", "2026-10-01"):
        (tmp_path / f"{day}-info.md").write_text(f"Texte du {day}\n", encoding="utf-8")
    items = NewsStore().items(tmp_path, 2, today=datetime.date(2026, 9, 30))
    assert [i.date.isoformat() for i in items] == ["2026-09-02", "2026-09-01"]
    assert items[0].title == "Info"
    assert items[1].date_fr == "1er septembre 2026"


def test_page_is_french_semantic_and_self_contained(client: FlaskClient) -> None:
    page = home(client, "ST-parent")
    root = page.root
    assert root.find_all("html")[0].attrs["lang"] == "fr"
    for tag in ("header", "nav", "main", "footer"):
        assert len(root.find_all(tag)) == 1, tag
    assert len(root.find_all("h1")) == 1
    first_link = root.find_all("a")[0]
    assert first_link.attrs["href"] == "#contenu" and first_link.text == "Aller au contenu"
    assert root.find_all("main")[0].attrs["id"] == "contenu"
    assert root.find_all("nav")[0].attrs.get("aria-label")
    assert any(m.attrs.get("name") == "viewport" for m in root.find_all("meta"))
    assert not root.find_all("script")
    local = [n.attrs.get("href") or n.attrs.get("src") or ""
             for n in root.find_all("link") + root.find_all("img")]
    assert local and all(u.startswith("/") for u in local), local
    logout = root.find_all("form")[0]
    assert logout.attrs["method"] == "post" and logout.attrs["action"] == "/deconnexion"
    assert root.find_all("button")[0].text == "Se déconnecter"


def test_pages_send_protective_headers(client: FlaskClient) -> None:
    login(client, "ST-eleve")
    answer = get(client, INDRE, "/")
    csp = answer.headers["Content-Security-Policy"]
    assert "script-src 'none'" in csp and "form-action 'self' https://cas.ent.test:8443" in csp
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" in answer.headers["Cache-Control"]


def test_not_found_is_a_french_page(client: FlaskClient) -> None:
    answer = get(client, INDRE, "/nulle-part")
    assert answer.status_code == 404
    assert "Page introuvable" in answer.get_data(as_text=True)


def test_healthz_needs_no_login_and_no_cas(client: FlaskClient, cas_server: StandInCas) -> None:
    before = len(cas_server.calls)
    answer = client.get("/healthz", base_url="http://10.0.0.5:8000")
    assert answer.status_code == 200
    data = answer.get_json()
    assert data["status"] == "ok" and isinstance(data["version"], str) and data["version"]
    assert "Set-Cookie" not in answer.headers
    assert len(cas_server.calls) == before


def test_logs_carry_the_login_and_nothing_else_personal(
        client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="entfarm.portal"):
        home(client, "ST-parent")
        login(client, "ST-inconnu")
        client.post("/deconnexion", base_url=f"https://{INDRE}")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /connexion 302 sophie.martin connexion" in text
    assert "INVALID_TICKET" in text
    # The refused ticket ended the session: the logout that follows has no login.
    assert "POST /deconnexion 302 - déconnexion" in text
    for secret in ("ST-parent", "ST-inconnu", "ticket=", "Sophie Martin", "Léa", "Hugo",
                   "National_TUT", "0360005K"):
        assert secret not in text, secret
    assert len([r for r in caplog.records if "GET / " in r.getMessage()]) == 1


# -- building blocks -----------------------------------------------------------------------------


def test_contrast_helper() -> None:
    assert contrast_ratio(WHITE, BLACK) == pytest.approx(21)
    assert contrast_ratio("#777777", WHITE) == pytest.approx(4.48, abs=0.01)
    assert text_on("#ffcc00") == BLACK
    assert text_on("#005a8c") == WHITE
    darker = darken_until("#ffcc00")
    assert contrast_ratio(darker, WHITE) >= TEXT_RATIO
    assert darker != "#ffcc00" and darker.startswith("#")


def test_lab_colours_are_readable() -> None:
    farm = load_farm(LAB)
    for dep in farm.spec.departements:
        colors = dep.branding.colors
        assert contrast_ratio(WHITE, colors.primary) >= TEXT_RATIO, dep.code
        p = palette(colors.primary, colors.secondary)
        assert p.header_text == WHITE and p.accent == colors.primary
        assert contrast_ratio(p.page_text, p.page_bg) >= TEXT_RATIO
    failing = palette("#ffcc00", "#333333")
    assert contrast_ratio(failing.header_text, failing.header_bg) >= TEXT_RATIO
    assert contrast_ratio(failing.accent, WHITE) >= TEXT_RATIO
    assert contrast_ratio(failing.page_text, failing.page_bg) >= TEXT_RATIO


def test_lab_news_and_logos_are_usable() -> None:
    store = NewsStore()
    for code in ("036", "045"):
        items = store.items(LAB / "news" / code, 5, today=datetime.date(2026, 12, 31))
        assert len(items) == 2 and items[0].date > items[1].date
        assert all(i.title and "<script" not in i.html for i in items)
    for name in ("indre.svg", "loiret.svg"):
        assert (LAB / "logos" / name).read_text(encoding="utf-8").startswith("<svg")


def test_cas_response_parsing() -> None:
    user = parse_service_response(service_response("ST-parent").encode())
    assert user.user == "sophie.martin"
    assert user.attributes["ENTEtablissementsUAI"] == ["0360005K", "0450022E"]
    assert len(user.attributes["ENTAuxPersRelEleveEnfants"]) == 3
    with pytest.raises(Exception, match="DTD_REFUSED"):
        parse_service_response(b'<!DOCTYPE x [<!ENTITY a "b">]><x/>')


def test_example_configuration_is_valid() -> None:
    config = load_config(REPO / "entfarm" / "portal" / "portal.example.json", check_files=False)
    assert [d.host for d in config.departements] == [INDRE, LOIRET]
    assert {e.uai for e in config.etablissements} == {
        e.uai for e in load_farm(LAB).spec.etablissements}


def problems_of(data: Any, tmp_path: Path, check_files: bool = False) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "portal.json", check_files=check_files)
    return str(caught.value)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    data = config_data("http://127.0.0.1:1/cas/")
    data["cas"]["url"] = "http://cas.ent.test/cas"
    data["departements"][1]["branding"]["colors"]["primary"] = "bordeaux"
    data["departements"][0]["newsdir"] = "news"
    data["tiles"][0]["profiles"] = ["élève", "prof"]
    data["etablissements"][0]["departement"] = "037"
    del data["session"]["secret_key_file"]
    data["session"]["lifetime"] = "8h"
    message = problems_of(data, tmp_path)
    for expected in (
        "cas.url: 'http://cas.ent.test/cas': expected an absolute https URL "
        "(write https://cas.ent.test/cas)",
        "departements[1].branding.colors.primary: 'bordeaux': expected a colour written",
        "departements[0].newsdir: unknown key (did you mean 'news_dir'?)",
        "tiles[0].profiles[0]: unknown profile 'élève' (did you mean 'eleve'?)",
        "tiles[0].profiles[1]: unknown profile 'prof'",
        "etablissements[0].departement: unknown département '037'",
        "session.secret_key_file: required key is missing",
        "session.lifetime: expected a whole number, got the text '8h'",
    ):
        assert expected in message, message
    assert "8 problems" in message


def test_config_file_problems(tmp_path: Path, cas_server: StandInCas) -> None:
    path = write_portal_dir(tmp_path, config_data(cas_server.url))
    (tmp_path / "logos" / "loiret.svg").unlink()
    with pytest.raises(ConfigError, match=r"departements\[1\]\.branding\.logo: 'logos/loiret"):
        load_config(path)
    path.write_text('{"format": 1,', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        load_config(path)
    missing = problems_of({"format": 1}, tmp_path)
    for key in ("cas", "portal", "departements", "session"):
        assert f"{key}: required key is missing" in missing, missing
    assert "<document>: expected an object" in problems_of([], tmp_path)


def test_short_secret_is_refused(tmp_path: Path, cas_server: StandInCas) -> None:
    path = write_portal_dir(tmp_path, config_data(cas_server.url), secret="court")
    with pytest.raises(ConfigError, match=r"session\.secret_key_file: .* holds 5 bytes"):
        create_app(path)


def test_portal_imports_nothing_heavy_from_entfarm() -> None:
    code = ("import sys, entfarm.portal.app\n"
            "heavy = [m for m in ('pydantic', 'ansible', 'ansible_runner', 'docker', 'yaml', "
            "'rich', 'entfarm.model', 'entfarm.cli') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "", out.stdout
