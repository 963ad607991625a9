"""A small CAS 3.0 client that logs in as a user would: the login form posted, the service
ticket taken from the redirect, then validated at ``/p3/serviceValidate``.

The wave gates use it (an imported élève logs in before an établissement goes live); the lab
tests can import it instead of their own copy. Standard library only. In the lab, public names
(``cas.ent.test``) do not resolve: ``connect_to`` sends every connection to that address while
the URL's name is still presented (SNI and Host), which is what a browser with a hosts entry
would do.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

CAS_NS = {"cas": "http://www.yale.edu/tp/cas"}
MAX_REDIRECTS = 6
MAX_BODY = 2 << 20


class CasClientError(Exception):
    """The CAS could not be talked to as expected (not a refused login: that is a result)."""


@dataclass
class Response:
    status: int
    location: str
    body: str


class _Connection(http.client.HTTPSConnection):
    """Connects to ``connect_to`` but presents the URL's name (SNI and Host)."""

    def __init__(self, host: str, port: int, *, connect_to: str, context: ssl.SSLContext,
                 timeout: float):
        super().__init__(host, port, context=context, timeout=timeout)
        self._connect_to = connect_to
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._connect_to, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


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
    """Cookies and HTTPS requests; redirects are followed by the caller, one hop at a time.

    ``keep_alive``: one connection per host and port, reused as a browser does (HTTP/1.1
    keep-alive); otherwise a new TCP connection and TLS handshake per request."""

    ctx: ssl.SSLContext
    connect_to: str | None = None
    timeout: float = 30.0
    cookies: dict[str, str] = field(default_factory=dict)
    keep_alive: bool = False
    _open: dict[tuple[str, int], http.client.HTTPSConnection] = field(
        default_factory=dict, repr=False)

    def _connection(self, host: str, port: int) -> http.client.HTTPSConnection:
        if self.keep_alive and (host, port) in self._open:
            return self._open[(host, port)]
        conn: http.client.HTTPSConnection
        if self.connect_to:
            conn = _Connection(host, port, connect_to=self.connect_to, context=self.ctx,
                               timeout=self.timeout)
        else:
            conn = http.client.HTTPSConnection(host, port, context=self.ctx,
                                               timeout=self.timeout)
        if self.keep_alive:
            self._open[(host, port)] = conn
        return conn

    def close(self) -> None:
        for conn in self._open.values():
            conn.close()
        self._open.clear()

    def request(self, method: str, url: str, form: dict[str, str] | None = None) -> Response:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise CasClientError(f"not an https URL: {url}")
        port = parts.port or 443
        headers = {"Accept-Language": "fr"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # A kept connection the server has closed meanwhile fails at once: retried once anew.
        reused = self.keep_alive and (parts.hostname, port) in self._open
        for attempt in (1, 2):
            conn = self._connection(parts.hostname, port)
            try:
                conn.request(method, path, body=body, headers=headers)
                raw = conn.getresponse()
                text = raw.read(MAX_BODY).decode("utf-8", "replace")
                break
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._open.pop((parts.hostname, port), None)
                if reused and attempt == 1:
                    continue
                raise CasClientError(f"{method} {parts.scheme}://{parts.netloc}{parts.path}: "
                                     f"{exc}") from exc
            finally:
                if not self.keep_alive:
                    conn.close()
        if raw.will_close:
            conn.close()
            self._open.pop((parts.hostname, port), None)
        for header in raw.headers.get_all("Set-Cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value
        return Response(raw.status, urljoin(url, raw.getheader("Location") or ""), text)

    def follow(self, response: Response, url: str, until_host: str) -> tuple[Response, str]:
        """Follow redirects that stay on ``until_host``; stop at one leaving it."""
        for _ in range(MAX_REDIRECTS):
            if response.status not in (301, 302, 303, 307) or not response.location:
                break
            if urlsplit(response.location).hostname != until_host:
                break
            url = response.location
            response = self.request("GET", url)
        return response, url


@dataclass(frozen=True)
class Validation:
    """What ``serviceValidate`` answered: a user and attributes, or a failure code."""

    user: str | None
    attributes: dict[str, list[str]]
    failure: str | None = None


@dataclass
class CasClient:
    """The CAS at ``base_url`` (``https://cas.ent.test:8443/``, paths ``cas/login`` …)."""

    base_url: str
    ctx: ssl.SSLContext
    connect_to: str | None = None

    @property
    def host(self) -> str:
        return str(urlsplit(self.base_url).hostname)

    def browser(self) -> Browser:
        return Browser(self.ctx, self.connect_to)

    def login_url(self, service: str) -> str:
        return urljoin(self.base_url, "cas/login?" + urlencode({"service": service}))

    def login(self, browser: Browser, service: str, user: str, password: str) -> Response:
        """Open the login page for the service and post the form: the last response (a redirect
        to the service when the login succeeded)."""
        url = self.login_url(service)
        page, url = browser.follow(browser.request("GET", url), url, self.host)
        if page.status != 200:
            raise CasClientError(f"CAS login page: HTTP {page.status}")
        forms = _Forms()
        forms.feed(page.body)
        form = next((f for f in forms.forms if "password" in f["inputs"]), None)
        if form is None:
            raise CasClientError("no login form on the CAS login page")
        fields = dict(form["inputs"], user=user, password=password)
        target = urljoin(url, form["action"]).split("#", 1)[0]
        answer = browser.request("POST", target, fields)
        return browser.follow(answer, target, self.host)[0]

    def ticket_for(self, browser: Browser, service: str) -> str | None:
        """A service ticket for an SSO session already open in the browser, or None."""
        url = self.login_url(service)
        return ticket_of(browser.follow(browser.request("GET", url), url, self.host)[0], service)

    def validate_xml(self, service: str, ticket: str) -> ET.Element:
        url = urljoin(self.base_url, "cas/p3/serviceValidate?"
                      + urlencode({"service": service, "ticket": ticket}))
        answer = self.browser().request("GET", url)
        if answer.status != 200:
            raise CasClientError(f"serviceValidate: HTTP {answer.status}")
        if "<!DOCTYPE" in answer.body.upper() or "<!ENTITY" in answer.body.upper():
            raise CasClientError("serviceValidate: answer carries a DTD")
        try:
            return ET.fromstring(answer.body)
        except ET.ParseError as exc:
            raise CasClientError(f"serviceValidate: not XML ({exc})") from exc

    def validate(self, service: str, ticket: str) -> Validation:
        reply = self.validate_xml(service, ticket)
        success = reply.find("cas:authenticationSuccess", CAS_NS)
        if success is None:
            failure = reply.find("cas:authenticationFailure", CAS_NS)
            code = failure.get("code", "UNKNOWN") if failure is not None else "NO_ANSWER"
            return Validation(None, {}, code)
        return Validation(success.findtext("cas:user", namespaces=CAS_NS), attributes(success))


def ticket_of(response: Response, service: str) -> str | None:
    """The ticket of a redirect to the service, None when the response is anything else."""
    if response.status not in (302, 303) or not response.location.startswith(service):
        return None
    tickets = parse_qs(urlsplit(response.location).query).get("ticket", [])
    return tickets[0] if tickets else None


def portal_message(response: Response) -> str:
    """The CAS portal's message code (LemonLDAP::NG's trmsg: 5 bad credentials, 9 first access)."""
    codes = re.findall(r'trmsg="([0-9]+)"', response.body)
    return f"HTTP {response.status}, portal message {','.join(codes) or 'none'}"


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
