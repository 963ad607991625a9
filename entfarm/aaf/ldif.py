"""LDIF in and out: parse ldapsearch output (folded lines, base64 values), write change records."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator

Entry = dict[str, list[str]]


def parse(data: bytes, names: Iterable[str] = ()) -> dict[str, Entry]:
    """DN -> attributes, attribute names normalised to the spelling given in ``names``."""
    canonical = {n.lower(): n for n in names}
    out: dict[str, Entry] = {}
    for record in _records(data):
        dn: str | None = None
        entry: Entry = {}
        for line in record:
            name, sep, rest = line.partition(":")
            if not sep:
                continue
            if rest.startswith(":"):
                value = base64.b64decode(rest[1:].strip()).decode("utf-8", "replace")
            else:
                value = rest[1:] if rest.startswith(" ") else rest
            if name.lower() == "dn":
                dn = value
            else:
                key = canonical.get(name.lower(), name)
                entry.setdefault(key, []).append(value)
        if dn is not None:
            out[dn] = entry
    return out


def _records(data: bytes) -> Iterator[list[str]]:
    lines: list[str] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        if raw.startswith(" ") and lines:
            lines[-1] += raw[1:]
        elif raw.startswith("#"):
            continue
        elif raw == "":
            if lines:
                yield lines
            lines = []
        else:
            lines.append(raw)
    if lines:
        yield lines


def _safe(value: str) -> bool:
    if not value:
        return True
    if value[0] in " :<" or value[-1] == " ":
        return False
    return value.isascii() and "\n" not in value and "\r" not in value and "\0" not in value


def line(name: str, value: str) -> str:
    if _safe(value):
        return f"{name}: {value}\n"
    return f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}\n"


def add(dn: str, entry: Entry) -> str:
    parts = [line("dn", dn), "changetype: add\n"]
    for name, values in entry.items():
        parts += [line(name, v) for v in values]
    return "".join(parts) + "\n"


def modify(dn: str, replace: dict[str, list[str]]) -> str:
    """Replace each attribute's values; an empty list deletes the attribute."""
    parts = [line("dn", dn), "changetype: modify\n"]
    for name, values in replace.items():
        if values:
            parts.append(f"replace: {name}\n")
            parts += [line(name, v) for v in values]
        else:
            parts.append(f"delete: {name}\n")
        parts.append("-\n")
    return "".join(parts) + "\n"


def delete(dn: str) -> str:
    return line("dn", dn) + "changetype: delete\n\n"


def escape_rdn_value(value: str) -> str:
    """RFC 4514 escaping of an attribute value inside a DN."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
