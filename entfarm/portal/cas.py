"""CAS 3.0 client: login and logout URLs, ticket validation, single-logout requests.

Only the standard library: the portal hosts get no HTTP client library, and one GET per login
does not need one.
"""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

CAS_NS = "{http://www.yale.edu/tp/cas}"
SAMLP_NS = "{urn:oasis:names:tc:SAML:2.0:protocol}"
# CAS 3.0 (appendix C): service tickets start with ST- and are at most 256 characters.
TICKET = re.compile(r"^ST-[A-Za-z0-9._~-]{1,253}$")
MAX_RESPONSE_BYTES = 1 << 20
# Multi-valued attributes may come as repeated elements or, from LemonLDAP::NG macros, as one
# value joined with ';' (its multiValuesSeparator): none of the values the portal reads has one.
VALUE_SEPARATOR = ";"


class CasError(Exception):
    """Validation did not give a user; ``code`` is safe to log (never the ticket)."""

    def __init__(self, code: str, unavailable: bool = False):
        super().__init__(code)
        self.code = code
        self.unavailable = unavailable  # the CAS could not be asked, as opposed to said no


@dataclass(frozen=True)
class CasUser:
    user: str
    attributes: dict[str, list[str]]


def login_url(cas_url: str, service: str, *, gateway: bool = False) -> str:
    query = {"service": service}
    if gateway:
        query["gateway"] = "true"
    return f"{cas_url}login?{urlencode(query)}"


def logout_url(cas_url: str, service: str) -> str:
    return f"{cas_url}logout?{urlencode({'service': service})}"


def is_ticket(value: str) -> bool:
    return bool(TICKET.match(value))


def _no_doctype(body: bytes) -> None:
    # A CAS answer has no DTD; refusing one rules out entity expansion whatever the parser.
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise CasError("DTD_REFUSED")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(VALUE_SEPARATOR) if v.strip()]


def parse_service_response(body: bytes) -> CasUser:
    """The user and attributes of a ``cas:serviceResponse``; raises :class:`CasError`."""
    _no_doctype(body)
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise CasError("MALFORMED_RESPONSE") from None
    if root.tag != f"{CAS_NS}serviceResponse":
        raise CasError("MALFORMED_RESPONSE")
    failure = root.find(f"{CAS_NS}authenticationFailure")
    if failure is not None:
        # The failure's text usually repeats the ticket: only the code is kept.
        code = failure.get("code", "UNKNOWN")
        raise CasError(code if re.fullmatch(r"[A-Z_]{1,40}", code) else "UNKNOWN")
    success = root.find(f"{CAS_NS}authenticationSuccess")
    if success is None:
        raise CasError("MALFORMED_RESPONSE")
    user = (success.findtext(f"{CAS_NS}user") or "").strip()
    if not user:
        raise CasError("NO_USER")
    attributes: dict[str, list[str]] = {}
    block = success.find(f"{CAS_NS}attributes")
    for element in [] if block is None else list(block):
        if not element.tag.startswith(CAS_NS):
            continue
        name = element.tag[len(CAS_NS):]
        attributes.setdefault(name, []).extend(_split(element.text or ""))
    return CasUser(user, attributes)


class Validator:
    """Validates service tickets against ``<validate_url>p3/serviceValidate``."""

    def __init__(self, validate_url: str, ca_file: Path | None, timeout: float):
        self.validate_url = validate_url
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [
            # The farm network reaches the CAS directly: a proxy from the environment
            # would see tickets.
            urllib.request.ProxyHandler({}),
        ]
        if urlsplit(validate_url).scheme == "https":
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def validate(self, service: str, ticket: str) -> CasUser:
        if not is_ticket(ticket):
            raise CasError("INVALID_TICKET_FORMAT")
        url = (f"{self.validate_url}p3/serviceValidate?"
               + urlencode({"service": service, "ticket": ticket}))
        try:
            with self._opener.open(url, timeout=self.timeout) as answer:
                body: bytes = answer.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise CasError(f"HTTP_{exc.code}", unavailable=True) from None
        except (urllib.error.URLError, OSError, ValueError):
            raise CasError("UNREACHABLE", unavailable=True) from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise CasError("RESPONSE_TOO_LARGE", unavailable=True)
        return parse_service_response(body)


def parse_logout_request(text: str) -> str | None:
    """The SessionIndex (the service ticket) of a CAS back-channel ``logoutRequest``."""
    body = text.encode("utf-8", "replace")
    try:
        _no_doctype(body)
        root = ET.fromstring(body)
    except (CasError, ET.ParseError):
        return None
    if root.tag != f"{SAMLP_NS}LogoutRequest":
        return None
    index = (root.findtext(f"{SAMLP_NS}SessionIndex") or "").strip()
    return index or None
