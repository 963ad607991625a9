"""The portal's configuration: one JSON file rendered from farm.yml by the portal role.

The format is documented key by key in ``entfarm/portal/README.md``; the dataclasses below are
its schema. :func:`load_config` reports every problem at once, each naming the key
(``departements[1].branding.colors.primary: ...``), so that a bad render fails the service start
with a message that says what to fix.

Relative paths in the file are relative to the directory of the file itself, so that the role can
lay out ``/etc/entfarm-portal/{portal.json,logos/,news/}`` and the same file works in a checkout.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

FORMAT = 1
DEFAULT_CONFIG_PATH = "/etc/entfarm-portal/portal.json"

# Portal profile ids, in the order the portal shows them, with their French labels.
PROFILES: dict[str, str] = {
    "eleve": "élève",
    "parent": "parent",
    "enseignant": "enseignant",
    "personnel": "personnel",
    "direction": "direction",
    "administrateur": "administrateur",
}

_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_UAI = re.compile(r"^[0-9]{7}[A-Z]$")
_DEPARTEMENT = re.compile(r"^(0[1-9][0-9]|[1-9][0-9]{2}|02[AB])$")
# Tile ids appear in URLs (/icones/<id>) and HTML ids.
_TILE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# RFC 6265 token characters, so that the name survives any cookie parser.
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """The configuration file cannot be used; the message lists every problem found."""

    def __init__(self, file: str, problems: Sequence[str]):
        self.file = file
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(
            f"{file}: {count} problem{'s' if count != 1 else ''} in the portal configuration:\n"
            + "\n".join(f"  {p}" for p in self.problems)
        )


@dataclass(frozen=True)
class Colors:
    """Brand colours, ``#rrggbb``. The portal adjusts them for contrast (see contrast.py)."""

    primary: str  # header background, and (darkened when needed) links and focus rings
    secondary: str  # page background around the content cards


@dataclass(frozen=True)
class Branding:
    name: str  # shown in the header and the page titles, e.g. "ENT des collèges de l'Indre"
    logo: Path | None  # SVG, PNG, JPEG or WebP file served by the portal
    colors: Colors


@dataclass(frozen=True)
class CasSettings:
    url: str  # CAS prefix as the browser sees it; login, logout are appended
    validate_url: str  # CAS prefix the portal calls for p3/serviceValidate (server to server)
    ca_file: Path | None  # PEM bundle to verify validate_url's certificate; None: system CAs
    timeout: float  # seconds for one validation call


@dataclass(frozen=True)
class Departement:
    code: str  # "036"
    name: str  # "Indre"
    url: str  # public base URL of the portal on the département's domain
    branding: Branding
    news_dir: Path | None  # Markdown news files AAAA-MM-JJ-titre.md; None: no news

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class Etablissement:
    uai: str
    name: str
    commune: str
    departement: str  # code of a declared département


@dataclass(frozen=True)
class Tile:
    id: str  # service id, e.g. "etherpad"
    label: str
    url: str  # the service's own URL: it is a CAS client, so opening it is single sign-on
    description: str
    icon: Path | None
    profiles: tuple[str, ...]  # portal profile ids (PROFILES) allowed to see the tile


@dataclass(frozen=True)
class SessionSettings:
    secret_key_file: Path  # shared by every portal node: any node serves any request
    previous_secret_key_files: tuple[Path, ...]  # still accepted, for key rotation
    lifetime: int  # seconds a login lasts at most
    recheck: int  # seconds after which the CAS session is checked again (0: never)
    cookie_name: str


@dataclass(frozen=True)
class PortalConfig:
    file: Path
    cas: CasSettings
    portal_url: str  # generic public base URL, https://portail.<farm domain>/
    branding: Branding  # on the generic name and any host that is no département's
    departements: tuple[Departement, ...]
    etablissements: tuple[Etablissement, ...]
    tiles: tuple[Tile, ...]
    session: SessionSettings
    news_limit: int

    @property
    def portal_host(self) -> str:
        return urlsplit(self.portal_url).hostname or ""

    def departement_for_host(self, host: str) -> Departement | None:
        """The département whose domain the request came in on (Host, port ignored)."""
        try:
            name = (urlsplit(f"//{host.strip()}").hostname or "").rstrip(".")
        except ValueError:
            return None
        return next((d for d in self.departements if d.host == name), None)

    def departement(self, code: str) -> Departement | None:
        return next((d for d in self.departements if d.code == code), None)

    def etablissement(self, uai: str) -> Etablissement | None:
        return next((e for e in self.etablissements if e.uai == uai), None)

    def tile(self, tile_id: str) -> Tile | None:
        return next((t for t in self.tiles if t.id == tile_id), None)


# -- loading ---------------------------------------------------------------------------------

T = TypeVar("T")

_TOP_KEYS = ("format", "cas", "portal", "departements", "etablissements", "tiles", "session",
             "news_limit")
_REQUIRED_ABOUT = {
    "format": f"the format number of this file, {FORMAT}",
    "cas": "the CAS server: url, validate_url, ca_file, timeout",
    "portal": "the generic portal: url, branding",
    "departements": "the départements served, each with code, name, url, branding",
    "session": "session settings: secret_key_file, lifetime",
    "url": "a public base URL such as https://portail.ent.test/",
    "branding": "name, logo, colors",
    "colors": "primary and secondary, #rrggbb",
    "primary": "a colour written #rrggbb",
    "secondary": "a colour written #rrggbb",
    "secret_key_file": "the file holding the key that signs session cookies",
    "profiles": f"the profiles allowed to see the tile, among {', '.join(PROFILES)}",
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"the text {value!r}"


def _suggest(bad: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(bad, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Reads the JSON document, collecting every problem with the path of its key."""

    def __init__(self, base_dir: Path, check_files: bool):
        self.base_dir = base_dir
        self.check_files = check_files
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '<document>'}: {message}")

    def obj(self, value: Any, path: str, keys: Sequence[str], required: Sequence[str]
            ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"expected an object with the keys {', '.join(keys)}, "
                      f"got {_kind(value)}")
            return None
        for key in value:
            if key not in keys:
                self.fail(_join(path, key), f"unknown key{_suggest(str(key), keys)}; "
                          f"valid keys here: {', '.join(keys)}")
        for key in required:
            if key not in value:
                about = _REQUIRED_ABOUT.get(key)
                self.fail(_join(path, key), "required key is missing"
                          + (f": {about}" if about else ""))
        return value

    def items(self, value: Any, path: str, *, allow_empty: bool = True) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
            return []
        if not value and not allow_empty:
            self.fail(path, "expected at least one item, got none")
        return value

    def text(self, data: dict[str, Any], key: str, path: str, *, default: str | None = None,
             pattern: re.Pattern[str] | None = None, meaning: str = "") -> str:
        where = _join(path, key)
        if key not in data:
            return default if default is not None else ""
        value = data[key]
        if not isinstance(value, str):
            self.fail(where, f"expected text{f' ({meaning})' if meaning else ''}, "
                      f"got {_kind(value)}")
            return ""
        value = value.strip()
        if not value:
            self.fail(where, "must not be empty")
        elif pattern is not None and not pattern.match(value):
            self.fail(where, f"{value!r}: expected {meaning or f'text matching {pattern.pattern}'}")
        return value

    def number(self, data: dict[str, Any], key: str, path: str, *, default: float,
               minimum: float, maximum: float, integer: bool) -> float:
        where = _join(path, key)
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integer and not isinstance(value, int)):
            self.fail(where, f"expected {'a whole number' if integer else 'a number'}, "
                      f"got {_kind(value)}")
            return default
        if not minimum <= value <= maximum:
            self.fail(where, f"{value}: must be between {minimum:g} and {maximum:g}")
            return default
        return float(value)

    def url(self, data: dict[str, Any], key: str, path: str, *, schemes: Sequence[str],
            base: bool) -> str:
        """A URL; a ``base`` URL is a prefix other paths are appended to: no query, ends '/'."""
        where = _join(path, key)
        value = self.text(data, key, path, meaning="a URL")
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            hint = (f" (write {schemes[0]}://{parts.netloc}{parts.path or '/'})"
                    if parts.hostname and parts.scheme in ("http", "https") else "")
            self.fail(where, f"{value!r}: expected an absolute {' or '.join(schemes)} URL{hint}")
            return ""
        try:
            parts.port  # noqa: B018 -- raises on a malformed port
        except ValueError:
            self.fail(where, f"{value!r}: the port is not a number between 0 and 65535")
            return ""
        if base and (parts.query or parts.fragment or not parts.path.endswith("/")):
            self.fail(where, f"{value!r}: expected a base URL without query or fragment, "
                      f"ending with '/' (e.g. {parts.scheme}://{parts.netloc}{parts.path}/)")
            return ""
        return value

    def path(self, data: dict[str, Any], key: str, path: str, *, kind: str = "file",
             optional: bool = True) -> Path | None:
        where = _join(path, key)
        if key not in data or (optional and data[key] is None):
            return None
        value = self.text(data, key, path, meaning=f"the path of a {kind}")
        if not value:
            return None
        resolved = self.base_dir / value
        if self.check_files:
            exists = resolved.is_dir() if kind == "directory" else resolved.is_file()
            if not exists:
                self.fail(where, f"{value!r}: no such {kind} ({resolved})")
        return resolved

    def each(self, value: Any, path: str, read: Callable[[Any, str], T | None],
             *, allow_empty: bool = True) -> list[T]:
        out = []
        for i, item in enumerate(self.items(value, path, allow_empty=allow_empty)):
            result = read(item, f"{path}[{i}]")
            if result is not None:
                out.append(result)
        return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _branding(r: _Reader, value: Any, path: str) -> Branding | None:
    data = r.obj(value, path, ("name", "logo", "colors"), ("name", "colors"))
    if data is None:
        return None
    colors = r.obj(data.get("colors"), _join(path, "colors"), ("primary", "secondary"),
                   ("primary", "secondary")) if "colors" in data else None
    meaning = 'a colour written #rrggbb (e.g. "#005a8c")'
    primary = secondary = "#000000"
    if colors is not None:
        primary = r.text(colors, "primary", _join(path, "colors"), pattern=_COLOR,
                         meaning=meaning)
        secondary = r.text(colors, "secondary", _join(path, "colors"), pattern=_COLOR,
                           meaning=meaning)
    logo = r.path(data, "logo", path)
    if logo is not None and logo.suffix.lower() not in LOGO_TYPES:
        r.fail(_join(path, "logo"), f"{logo.name!r}: expected an image file ending in "
               f"{', '.join(LOGO_TYPES)}")
    return Branding(r.text(data, "name", path), logo, Colors(primary.lower(), secondary.lower()))


# Image types the portal serves for logos and icons, by file suffix.
LOGO_TYPES = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg",
              ".jpeg": "image/jpeg", ".webp": "image/webp"}


def _departement(r: _Reader, value: Any, path: str) -> Departement | None:
    data = r.obj(value, path, ("code", "name", "url", "branding", "news_dir"),
                 ("code", "name", "url", "branding"))
    if data is None:
        return None
    branding = _branding(r, data["branding"], _join(path, "branding")) \
        if "branding" in data else None
    return Departement(
        code=r.text(data, "code", path, pattern=_DEPARTEMENT,
                    meaning='a département code of three characters: "036", "02A"'),
        name=r.text(data, "name", path),
        url=r.url(data, "url", path, schemes=("https",), base=True),
        branding=branding or Branding("", None, Colors("#000000", "#ffffff")),
        news_dir=r.path(data, "news_dir", path, kind="directory"),
    )


def _etablissement(r: _Reader, value: Any, path: str) -> Etablissement | None:
    data = r.obj(value, path, ("uai", "name", "commune", "departement"),
                 ("uai", "name", "commune", "departement"))
    if data is None:
        return None
    return Etablissement(
        uai=r.text(data, "uai", path, pattern=_UAI,
                   meaning="a UAI: 7 digits then a capital letter, e.g. 0360005K"),
        name=r.text(data, "name", path),
        commune=r.text(data, "commune", path),
        departement=r.text(data, "departement", path, pattern=_DEPARTEMENT,
                           meaning='a département code of three characters: "036", "02A"'),
    )


def _tile(r: _Reader, value: Any, path: str) -> Tile | None:
    data = r.obj(value, path, ("id", "label", "url", "description", "icon", "profiles"),
                 ("id", "label", "url", "profiles"))
    if data is None:
        return None
    profiles: list[str] = []
    if "profiles" in data:
        where = _join(path, "profiles")
        for i, item in enumerate(r.items(data["profiles"], where, allow_empty=False)):
            if not isinstance(item, str) or item not in PROFILES:
                shown = item if isinstance(item, str) else _kind(item)
                r.fail(f"{where}[{i}]", f"unknown profile {shown!r}"
                       f"{_suggest(_ascii(shown), list(PROFILES))}; "
                       f"valid profiles: {', '.join(PROFILES)}")
            elif item not in profiles:
                profiles.append(item)
    icon = r.path(data, "icon", path)
    if icon is not None and icon.suffix.lower() not in LOGO_TYPES:
        r.fail(_join(path, "icon"), f"{icon.name!r}: expected an image file ending in "
               f"{', '.join(LOGO_TYPES)}")
    return Tile(
        id=r.text(data, "id", path, pattern=_TILE_ID,
                  meaning="a service id: lower-case letters, digits, '_' and '-'"),
        label=r.text(data, "label", path),
        url=r.url(data, "url", path, schemes=("https", "http"), base=False),
        description=r.text(data, "description", path, default=""),
        icon=icon,
        profiles=tuple(p for p in PROFILES if p in profiles),
    )


def _ascii(text: str) -> str:
    return text.translate(str.maketrans("éèêàç", "eeeac")).lower()


def _session(r: _Reader, value: Any, path: str) -> SessionSettings | None:
    keys = ("secret_key_file", "previous_secret_key_files", "lifetime", "recheck", "cookie_name")
    data = r.obj(value, path, keys, ("secret_key_file",))
    if data is None:
        return None
    secret = r.path(data, "secret_key_file", path, optional=False)
    previous = []
    where = _join(path, "previous_secret_key_files")
    for i, item in enumerate(r.items(data.get("previous_secret_key_files", []), where)):
        found = r.path({"f": item}, "f", f"{where}[{i}]", optional=False)
        if found is not None:
            previous.append(found)
    lifetime = int(r.number(data, "lifetime", path, default=28800, minimum=60,
                            maximum=7 * 86400, integer=True))
    recheck = int(r.number(data, "recheck", path, default=600, minimum=0,
                           maximum=7 * 86400, integer=True))
    return SessionSettings(
        secret_key_file=secret or Path(),
        previous_secret_key_files=tuple(previous),
        lifetime=lifetime,
        recheck=recheck,
        cookie_name=r.text(data, "cookie_name", path, default="__Host-entfarm-portail",
                           pattern=_COOKIE_NAME, meaning="a cookie name (letters, digits, -_.)"),
    )


def _cross_checks(r: _Reader, portal_url: str, deps: list[Departement],
                  etabs: list[Etablissement], tiles: list[Tile]) -> None:
    """Duplicates and references, on values that are well formed."""
    codes: dict[str, int] = {}
    hosts: dict[str, str] = {}
    portal_host = urlsplit(portal_url).hostname if portal_url else None
    if portal_host:
        hosts[portal_host] = "portal.url"
    for i, dep in enumerate(deps):
        if dep.code in codes:
            r.fail(f"departements[{i}].code", f"département {dep.code!r} is already declared "
                   f"at departements[{codes[dep.code]}]")
        elif dep.code:
            codes[dep.code] = i
        if dep.url and dep.host in hosts:
            r.fail(f"departements[{i}].url", f"host {dep.host!r} is already the host of "
                   f"{hosts[dep.host]}; the branding follows the host, so each has its own")
        elif dep.url:
            hosts[dep.host] = f"departements[{i}].url"
    seen: dict[str, int] = {}
    for i, etab in enumerate(etabs):
        if etab.uai in seen:
            r.fail(f"etablissements[{i}].uai", f"UAI {etab.uai!r} is already declared at "
                   f"etablissements[{seen[etab.uai]}]")
        elif etab.uai:
            seen[etab.uai] = i
        if etab.departement and _DEPARTEMENT.match(etab.departement) \
                and etab.departement not in codes:
            r.fail(f"etablissements[{i}].departement",
                   f"unknown département {etab.departement!r}"
                   f"{_suggest(etab.departement, list(codes))}; declared: "
                   f"{', '.join(codes) or 'none'}")
    ids: dict[str, int] = {}
    for i, tile in enumerate(tiles):
        if tile.id in ids:
            r.fail(f"tiles[{i}].id",
                   f"tile {tile.id!r} is already declared at tiles[{ids[tile.id]}]")
        elif tile.id:
            ids[tile.id] = i


def parse_config(data: Any, file: Path, *, check_files: bool = True) -> PortalConfig:
    """Validate a decoded document; ``check_files`` also requires the files it names to exist."""
    r = _Reader(file.parent, check_files)
    top = r.obj(data, "", _TOP_KEYS, ("format", "cas", "portal", "departements", "session"))
    if top is None:
        raise ConfigError(str(file), r.problems)
    if "format" in top and (top["format"] != FORMAT or isinstance(top["format"], bool)):
        r.fail("format", f"{top['format']!r}: this portal reads format {FORMAT}; render the "
               "configuration with the portal role of the same entfarm version")

    cas = CasSettings("", "", None, 10.0)
    if "cas" in top:
        c = r.obj(top["cas"], "cas", ("url", "validate_url", "ca_file", "timeout"), ("url",))
        if c is not None:
            url = r.url(c, "url", "cas", schemes=("https",), base=True)
            validate = r.url(c, "validate_url", "cas", schemes=("https", "http"), base=True) \
                if "validate_url" in c else url
            cas = CasSettings(url, validate, r.path(c, "ca_file", "cas"),
                              r.number(c, "timeout", "cas", default=10.0, minimum=0.5,
                                       maximum=120, integer=False))

    portal_url = ""
    branding = Branding("", None, Colors("#000000", "#ffffff"))
    if "portal" in top:
        p = r.obj(top["portal"], "portal", ("url", "branding"), ("url", "branding"))
        if p is not None:
            portal_url = r.url(p, "url", "portal", schemes=("https",), base=True)
            if "branding" in p:
                branding = _branding(r, p["branding"], "portal.branding") or branding

    deps = r.each(top.get("departements", []), "departements",
                  lambda v, p: _departement(r, v, p), allow_empty=False) \
        if "departements" in top else []
    etabs = r.each(top.get("etablissements", []), "etablissements",
                   lambda v, p: _etablissement(r, v, p))
    tiles = r.each(top.get("tiles", []), "tiles", lambda v, p: _tile(r, v, p))
    session = _session(r, top["session"], "session") if "session" in top else None
    news_limit = int(r.number(top, "news_limit", "", default=5, minimum=0, maximum=100,
                              integer=True))
    _cross_checks(r, portal_url, deps, etabs, tiles)
    if r.problems or session is None:
        raise ConfigError(str(file), r.problems)
    return PortalConfig(file, cas, portal_url, branding, tuple(deps), tuple(etabs),
                        tuple(tiles), session, news_limit)


def load_config(path: str | Path, *, check_files: bool = True) -> PortalConfig:
    """Read and validate the configuration file; raises :class:`ConfigError`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), [f"<document>: cannot read the file: {exc}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(file), [
            f"<document>: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ]) from None
    return parse_config(data, file.resolve(), check_files=check_files)


def read_secret_keys(config: PortalConfig) -> list[str]:
    """The current signing key, then the previous ones; raises :class:`ConfigError`."""
    settings = config.session
    keys = []
    files = [("session.secret_key_file", settings.secret_key_file)] + [
        (f"session.previous_secret_key_files[{i}]", p)
        for i, p in enumerate(settings.previous_secret_key_files)]
    problems = []
    for where, file in files:
        try:
            key = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{where}: cannot read the key: {exc}")
            continue
        if len(key.encode()) < MIN_SECRET_BYTES:
            problems.append(f"{where}: {file} holds {len(key.encode())} bytes; at least "
                            f"{MIN_SECRET_BYTES} are needed (e.g. openssl rand -hex 32)")
            continue
        keys.append(key)
    if problems:
        raise ConfigError(str(config.file), problems)
    return keys
