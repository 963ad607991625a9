"""Helpers shared by the lab tests that log people in: the AAF-imported accounts (fixture
`imported`), a loopback HTTPS client that presents the public *.test names (Browser), a CAS
client (Cas, fixture `cas`) and docker exec on the lab's hosts.

Test modules import what they use; a module-scoped fixture imported into a test module is that
module's fixture (`from identity_helpers import imported`).
"""

from __future__ import annotations

import csv
import http.client
import json
import re
import shlex
import socket
import ssl
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest

from entfarm.model import Farm

ROOT = Path(__file__).resolve().parents[2]
IDP = "entfarm-lab-idp"
CAS_NS = {"cas": "http://www.yale.edu/tp/cas"}
PROFILES = {"élève": "National_ELV", "parent": "National_TUT", "enseignant": "National_ENS"}


def on_host(container: str, command: str, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A shell command inside a lab container (docker exec)."""
    return subprocess.run(
        ["docker", "exec", "-i", container, "sh", "-c", command],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
    )


def on_idp(command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return on_host(IDP, command, stdin)


def read_fact(role: str) -> dict[str, Any]:
    out = on_idp(f"cat /etc/ansible/facts.d/{role}.fact")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def entfarm_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "entfarm.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )


# -- the people: a generated export for the lab's établissements, imported -----------------------


@dataclass(frozen=True)
class Account:
    login: str
    code: str
    profil: str
    uai: str
    display_name: str


def _distributed_accounts(farm: Farm, uais: list[str]) -> dict[str, Account]:
    """login -> account, from every distribution CSV of these UAIs: a login's latest CSV holds
    the code its password was set to (a re-import of the same export distributes nothing)."""
    accounts: dict[str, Account] = {}
    root = farm.state_dir / "aaf" / "distribution"
    paths = sorted((p for uai in uais for p in (root / uai).glob("comptes-*.csv")),
                   key=lambda p: p.name)
    for path in paths:
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                accounts[row["login"]] = Account(
                    row["login"], row["code_activation"], row["profil"], path.parent.name,
                    f"{row['prenom']} {row['nom']}".strip())
    return accounts


@pytest.fixture(scope="module")
def imported(deployed_lab: Any, lab_farm: Farm,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Account]]:
    """Import a small export; the imported accounts per profile label, first wave first."""
    out = tmp_path_factory.mktemp("aaf")
    generated = entfarm_cli("aaf", "generate", str(out), "-i", str(lab_farm.inventory_dir),
                            "--seed", "3", "--eleves-per-college", "10")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    result = entfarm_cli("aaf", "import", str(out), "-i", str(lab_farm.inventory_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    first_wave = lab_farm.spec.waves[0].id
    uais = [e.uai for e in lab_farm.spec.etablissements if e.wave == first_wave]
    uais += [e.uai for e in lab_farm.spec.etablissements if e.wave and e.uai not in uais]
    accounts = _distributed_accounts(lab_farm, uais)
    present = set(ldap_root_search(f"ou=people,{lab_farm.spec.academie.base_dn}",
                                   "(ENTPersonEtat=ACTIF)", "uid").get("uid", []))
    by_profile: dict[str, list[Account]] = {}
    for account in sorted(accounts.values(), key=lambda a: (uais.index(a.uai), a.login)):
        if account.login in present:
            by_profile.setdefault(account.profil, []).append(account)
    for label in PROFILES:
        assert by_profile.get(label), f"no imported {label} with a distributed code"
    return by_profile


def ldap_root_search(base: str, filt: str, *attrs: str) -> dict[str, list[str]]:
    """Attribute values (all entries merged) of a search as root of the directory host."""
    out = on_idp(f"ldapsearch -Q -LLL -o ldif-wrap=no -Y EXTERNAL -H ldapi:/// "
                 f"-b {shlex.quote(base)} {shlex.quote(filt)} " + " ".join(attrs))
    assert out.returncode == 0, out.stderr
    values: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            values.setdefault(key, []).append(value)
    return values


# -- a browser, reaching every *.test name at 127.0.0.1 -----------------------------------------


class _LoopbackHTTPS(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but presents the URL's name (SNI and Host)."""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass
class Response:
    status: int
    location: str
    body: str


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "inputs": {}})
        elif tag == "input" and self.forms and a.get("name"):
            if a.get("type", "text") not in ("checkbox", "radio", "submit", "button"):
                self.forms[-1]["inputs"][a["name"]] = a.get("value", "")


@dataclass
class Browser:
    ctx: ssl.SSLContext
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, url: str, form: dict[str, str] | None = None) -> Response:
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.hostname, url
        conn = _LoopbackHTTPS(parts.hostname, parts.port or 443, context=self.ctx, timeout=30)
        headers = {"Accept-Language": "fr"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path or "/", body=body, headers=headers)
            raw = conn.getresponse()
            text = raw.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for header in raw.headers.get_all("Set-Cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value
        return Response(raw.status, urljoin(url, raw.getheader("Location") or ""), text)

    def follow(self, response: Response, url: str, until_host: str) -> tuple[Response, str]:
        """Follow redirects that stay on the CAS server; stop at one leaving it."""
        for _ in range(6):
            if response.status not in (301, 302, 303, 307) or not response.location:
                break
            if urlsplit(response.location).hostname != until_host:
                break
            url = response.location
            response = self.request("GET", url)
        return response, url


@dataclass
class Cas:
    portal: str  # https://cas.ent.test:8443/
    ctx: ssl.SSLContext

    @property
    def host(self) -> str:
        return str(urlsplit(self.portal).hostname)

    def login_url(self, service: str) -> str:
        return urljoin(self.portal, "cas/login?" + urlencode({"service": service}))

    def login(self, browser: Browser, service: str, user: str, password: str) -> Response:
        """Open the login page for the service and post the form: the last response (a redirect
        to the service when the login succeeded)."""
        url = self.login_url(service)
        page, url = browser.follow(browser.request("GET", url), url, self.host)
        assert page.status == 200, (page.status, page.location)
        forms = _Forms()
        forms.feed(page.body)
        form = next((f for f in forms.forms if "password" in f["inputs"]), None)
        assert form is not None, "no login form on the CAS login page"
        fields = dict(form["inputs"], user=user, password=password)
        target = urljoin(url, form["action"]).split("#", 1)[0]
        answer = browser.request("POST", target, fields)
        return browser.follow(answer, target, self.host)[0]

    def ticket_for(self, browser: Browser, service: str) -> str | None:
        """A service ticket for an SSO session already open in the browser, or None."""
        url = self.login_url(service)
        return ticket_of(browser.follow(browser.request("GET", url), url, self.host)[0], service)

    def validate(self, service: str, ticket: str) -> ET.Element:
        url = urljoin(self.portal, "cas/p3/serviceValidate?"
                      + urlencode({"service": service, "ticket": ticket}))
        answer = Browser(self.ctx).request("GET", url)
        assert answer.status == 200, answer.status
        return ET.fromstring(answer.body)


def portal_message(response: Response) -> str:
    """The portal's message code (LemonLDAP::NG's trmsg: 5 bad credentials, 9 first access…)."""
    codes = re.findall(r'trmsg="([0-9]+)"', response.body)
    return f"HTTP {response.status}, portal message {','.join(codes) or 'none'}"


def ticket_of(response: Response, service: str) -> str | None:
    """The ticket of a redirect to the service, None when the response is anything else."""
    if response.status not in (302, 303) or not response.location.startswith(service):
        return None
    tickets = parse_qs(urlsplit(response.location).query).get("ticket", [])
    return tickets[0] if tickets else None


def attributes(success: ET.Element) -> dict[str, list[str]]:
    """CAS 3.0 attributes; multi-valued ones as repeated elements or joined with ';'."""
    out: dict[str, list[str]] = {}
    block = success.find("cas:attributes", CAS_NS)
    for element in [] if block is None else list(block):
        name = element.tag.rsplit("}", 1)[-1]
        for value in (element.text or "").split(";"):
            if value.strip():
                out.setdefault(name, []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def cas(deployed_lab: Any, lab_farm: Farm) -> Cas:
    ca = lab_farm.secrets_dir / "pki" / "ca.crt"
    assert ca.is_file(), f"farm CA certificate missing at {ca}"
    return Cas(str(read_fact("cas")["portal_url"]), ssl.create_default_context(cafile=str(ca)))
