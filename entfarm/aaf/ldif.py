"""LDIF in and out: parse ldapsearch output (folded lines, base64 values), write change records."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator

Entry = dict[str, list[str]]


def parse(data: bytes, names: Iterable[str] = ()) -> dict[str, Entry]:
    """DN -> attributes, attribute names normalised to the spelling given in ``names``.

    Works on the whole text at once (folded lines joined, records split on blank lines) because
    a line-by-line reader dominated the import's time on 100 000-entry searches.
    """
    canonical = {n.lower(): n for n in names}
    keys: dict[str, str] = {}  # name as written -> name to store ("" for the DN)
    out: dict[str, Entry] = {}
    records: Iterator[str]
    if b"\r" in data or b"\n " in data:
        text = data.decode("utf-8", "replace")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        records = _split_records(_unfold(text) if "\n " in text else text)
    else:  # ldapsearch -o ldif-wrap=no: decode record by record, not a second copy of it all
        records = (r.decode("utf-8", "replace") for r in _split_records_bytes(data))
    b64decode = base64.b64decode
    for record in records:
        dn: str | None = None
        entry: Entry = {}
        for line in record.split("\n"):
            if not line or line[0] == "#":
                continue
            i = line.find(":")
            if i < 0:
                continue
            name = line[:i]
            if line.startswith(":", i + 1):
                value = b64decode(line[i + 2:].strip()).decode("utf-8", "replace")
            elif line.startswith(" ", i + 1):
                value = line[i + 2:]
            else:
                value = line[i + 1:]
            key = keys.get(name)
            if key is None:
                lower = name.lower()
                key = keys[name] = "" if lower == "dn" else canonical.get(lower, name)
            if key == "":
                dn = value
            elif key in entry:
                entry[key].append(value)
            else:
                entry[key] = [value]
        if dn is not None:
            out[dn] = entry
    return out


def _split_records(text: str) -> Iterator[str]:
    """Records one at a time (a list of all of them would double the peak memory)."""
    start = 0
    while True:
        end = text.find("\n\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 2


def _split_records_bytes(data: bytes) -> Iterator[bytes]:
    start = 0
    while True:
        end = data.find(b"\n\n", start)
        if end < 0:
            yield data[start:]
            return
        yield data[start:end]
        start = end + 2


def _unfold(text: str) -> str:
    """Join continuation lines (a leading space) to their line, as the line reader did."""
    lines: list[str] = []
    for raw in text.split("\n"):
        if raw.startswith(" ") and lines and lines[-1] != "":
            lines[-1] += raw[1:]
        else:
            lines.append(raw)
    return "\n".join(lines)


# A value written as is: ASCII without NUL, CR or LF, not starting with space, colon or "<",
# not ending with a space (RFC 2849 SAFE-STRING); anything else is written base64.
_SAFE = re.compile(r"(?![ :<])[\x01-\x09\x0b\x0c\x0e-\x7f]*(?<! )")


def _safe(value: str) -> bool:
    return _SAFE.fullmatch(value) is not None


def line(name: str, value: str) -> str:
    if _SAFE.fullmatch(value) is not None:
        return f"{name}: {value}\n"
    return f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}\n"


def add(dn: str, entry: Entry) -> str:
    safe = _SAFE.fullmatch
    parts = [line("dn", dn), "changetype: add\n"]
    for name, values in entry.items():
        for v in values:
            parts.append(f"{name}: {v}\n" if safe(v) is not None else line(name, v))
    return "".join(parts) + "\n"


def modify(dn: str, replace: dict[str, list[str]], *, add: dict[str, list[str]] | None = None,
           delete: dict[str, list[str]] | None = None) -> str:
    """Replace each attribute's values (an empty list deletes the attribute), then add and
    delete single values of others (``add``/``delete``: name -> the values concerned)."""
    parts = [line("dn", dn), "changetype: modify\n"]
    for name, values in replace.items():
        if values:
            parts.append(f"replace: {name}\n")
            parts += [line(name, v) for v in values]
        else:
            parts.append(f"delete: {name}\n")
        parts.append("-\n")
    for op, changes in (("add", add), ("delete", delete)):
        for name, values in (changes or {}).items():
            if values:
                parts.append(f"{op}: {name}\n")
                parts += [line(name, v) for v in values]
                parts.append("-\n")
    return "".join(parts) + "\n"


def delete(dn: str) -> str:
    return line("dn", dn) + "changetype: delete\n\n"


def target(record: str) -> tuple[str, str]:
    """(DN, changetype) of one change record written by :func:`add`, :func:`modify` or
    :func:`delete` (its first two lines)."""
    first, _, rest = record.partition("\n")
    if first.startswith("dn:: "):
        dn = base64.b64decode(first[5:]).decode("utf-8")
    elif first.startswith("dn: "):
        dn = first[4:]
    else:
        raise ValueError(f"not a change record: {first[:80]!r}")
    kind = rest.partition("\n")[0]
    return dn, kind.removeprefix("changetype: ")


def parent(dn: str) -> str:
    """The DN without its first RDN (escaped commas, ``\\,``, stay in the RDN)."""
    i = 0
    while i < len(dn):
        if dn[i] == "\\":
            i += 2
            continue
        if dn[i] == ",":
            return dn[i + 1:]
        i += 1
    return ""


_RDN_SPECIAL = re.compile(r'[,+"\\<>;=]|^[ #]| $')


def escape_rdn_value(value: str) -> str:
    """RFC 4514 escaping of an attribute value inside a DN."""
    if not _RDN_SPECIAL.search(value):
        return value
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
