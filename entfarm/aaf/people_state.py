"""The persons' state kept between imports and brought up to date from slapd's sync feed.

Every import needs, of every person the directory holds, what PERSON_STATE_ATTRIBUTES says
(jointure, login, état, digest...). Read whole, that is 20 MB of LDIF at 100 000 persons, about
2 s of CPU between slapd, ldapsearch and the parse, however small the Delta. Instead, each
import that writes keeps the state it read, by entryUUID, with the sync cookie of that read
(RFC 4533), in the farm's private state directory; the next import asks slapd's syncprov for a
refreshOnly from that cookie (``ldapsearch -E sync=ro/<cookie>``) and gets only the entries
changed since, by anyone, and which ones are gone.

What slapd answers, and what is done with it (ldapsearch's extended LDIF: the sync controls are
printed as comments, which ``-L`` and ``-LLL`` leave out):

- the delete phase (its session log covers the cookie): the changed entries (``# SyncState
  control, UUID <uuid> added``), then ID sets after ``# following UUIDs no longer match the
  search``, and ``# SyncDone control refreshDeletes=1``: the kept state, less those UUIDs,
  plus the changed entries;
- the present phase (slapd restarted since, or the session log is too short): ID sets of the
  UUIDs still there (no "no longer match" line), the changed entries, ``refreshDeletes=0``:
  only what is named is kept;
- anything else (a refused cookie: slapd 2.5.13 answers 53 to a cookie newer than its state,
  and ldapsearch exits 53; a result line other than 0; no cookie; a UUID said present that
  the kept state does not hold): the state is read again in full: the directory's cookie
  first, then every person by a plain search with its entryUUID (``Directory.state_raw``).

A restored directory goes back in time without its cookies knowing. So an import that writes
ends with a marker of its own on ``ou=people`` (a ``description`` value), and keeps the state
with that marker: a directory restored from a backup taken before that import holds another
one, and the state is read in full. An import that writes nothing keeps the state it found
(so that it writes nothing, not even a marker); the next import then starts from the older
cookie, which its marker still covers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import marshal
import os
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ldif
from .ldif import Entry

if TYPE_CHECKING:
    from .importer import Directory, Query

MARKER_PREFIX = "entfarm-aaf-import "
FORMAT = 1
_STATE = re.compile(r"^# SyncState control, UUID ([0-9a-fA-F-]+) (\w+)")
State = dict[str, tuple[str, Entry]]  # entryUUID -> DN, attributes


@dataclass
class Feed:
    """A refreshOnly sync search's answer, as ldapsearch prints it."""

    changed: State = field(default_factory=dict)  # added or modified since the cookie
    present: dict[str, str | None] = field(default_factory=dict)  # UUID -> DN if given
    deleted: set[str] = field(default_factory=set)
    refresh_deletes: bool | None = None  # None: no SyncDone seen
    cookie: str | None = None
    result: int | None = None
    problems: list[str] = field(default_factory=list)


def parse_feed(data: bytes, names: Iterable[str]) -> Feed:
    """The entries, UUID sets, result and cookie of ``ldapsearch -E sync=ro[/cookie]`` output
    (extended LDIF, ``-o ldif-wrap=no``). Attributes are kept only if named in ``names``."""
    canonical = {n.lower(): n for n in names}
    feed = Feed()
    text = data.decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\n " in text:
        text = ldif._unfold(text)
    dn: str | None = None
    entry: Entry = {}
    uuid: str | None = None
    kind: str | None = None
    uuids_to: set[str] | dict[str, str | None] | None = None  # inside an ID set's list

    def end_entry() -> None:
        if dn is None:
            return
        if uuid is None or kind is None:
            feed.problems.append(f"entry {dn} without a sync state")
        elif kind in ("added", "modified", "add", "modify"):
            feed.changed[uuid] = (dn, entry)
        elif kind == "present":
            feed.present[uuid] = dn
        elif kind in ("deleted", "delete"):
            feed.deleted.add(uuid)
        else:
            feed.problems.append(f"entry {dn}: unknown sync state {kind!r}")

    deletes = False
    for lines in ldif._slices(text):
        for line in lines:
            if not line:
                end_entry()
                dn, entry, uuid, kind, uuids_to = None, {}, None, None, None
                continue
            if line[0] == "#":
                if uuids_to is not None and line.startswith("#\t"):
                    value = line[2:].strip()
                    if isinstance(uuids_to, set):
                        uuids_to.add(value)
                    else:
                        uuids_to[value] = None
                elif m := _STATE.match(line):
                    uuid, kind = m.group(1).lower(), m.group(2)
                elif line.startswith("# SyncInfo Received: ID Set"):
                    deletes = False
                elif line == "# following UUIDs no longer match the search":
                    deletes = True
                elif line == "# syncUUIDs:":
                    uuids_to = feed.deleted if deletes else feed.present
                elif line.startswith("# SyncDone control refreshDeletes="):
                    feed.refresh_deletes = line.rsplit("=", 1)[1].strip() == "1"
                elif line.startswith("# cookie: "):
                    feed.cookie = line[len("# cookie: "):].strip()
                continue
            name, sep, value = line.partition(": ")
            if not sep:
                name, sep, value = line.partition(":")
                if not sep:
                    continue
                if value[:1] == ":":
                    name += ":"
                    value = value[1:]
            if name[-1:] == ":":
                name = name[:-1]
                try:
                    value = base64.b64decode(value.strip()).decode("utf-8", "replace")
                except ValueError:
                    feed.problems.append(f"unreadable base64 value of {name}")
                    continue
            lower = name.lower()
            if lower == "dn":
                dn = value
            elif lower == "result" and dn is None:
                try:
                    feed.result = int(value.split()[0])
                except (ValueError, IndexError):
                    feed.problems.append(f"unreadable result line {line!r}")
            elif dn is not None and lower in canonical:
                entry.setdefault(canonical[lower], []).append(value)
    end_entry()
    return feed


def parse_state(data: bytes, names: Iterable[str]) -> Feed:
    """What ``Directory.state_raw`` returned: a sync feed, or (read from no cookie) the
    directory's cookie, a NUL byte, then every entry with its entryUUID, given as a feed that
    sends everything."""
    if b"\0" not in data:
        return parse_feed(data, names)
    head, body = data.split(b"\0", 1)
    feed = parse_feed(head, ())
    if feed.changed or feed.present or feed.deleted:
        feed.problems.append("the cookie's search matched entries")
    names = tuple(names)
    for dn, entry in ldif.parse(body, (*names, "entryUUID")).items():
        uuid = entry.pop("entryUUID", [""])[0].strip().lower()
        if not uuid:
            feed.problems.append(f"entry {dn} without an entryUUID")
            continue
        feed.changed[uuid] = (dn, entry)
    return feed


def merge(kept: State | None, feed: Feed) -> State | None:
    """The directory's state after ``feed``, on top of ``kept`` (the state of the feed's
    cookie; None: a feed without cookie, which sends everything); None when the feed cannot be
    trusted to complete it (then read everything again)."""
    if feed.result != 0 or feed.cookie is None or feed.refresh_deletes is None or feed.problems:
        return None
    if kept is None:
        if feed.present or feed.deleted:
            return None
        return dict(feed.changed)
    if feed.refresh_deletes:
        out = {u: v for u, v in kept.items() if u not in feed.deleted}
    else:
        if not feed.present.keys() <= kept.keys() | feed.changed.keys():
            return None  # said present, never seen: not the directory this state was read from
        out = {}
        for u, given in feed.present.items():
            if u in kept:
                dn, entry = kept[u]
                out[u] = (given or dn, entry)
    out.update(feed.changed)
    return out


@dataclass
class Kept:
    """What an import keeps: the state, the cookie of its read, the marker that ended it."""

    where: str  # the directory (transport), base and attributes it was read with
    cookie: str
    marker: str
    state: State


def where(directory: str, people_base: str, attrs: Iterable[str]) -> str:
    return "\x1f".join([directory, people_base.lower(), *sorted(a.lower() for a in attrs)])


class Store:
    """The kept state in a private file of the farm's state directory: a head (where it was
    read, its cookie and marker) and the state, each with its MAC (the farm's key, checked before
    anything is unmarshalled, as the export's record cache), so that the head is read, and the
    sync search started, before the 20 MB of state are loaded."""

    def __init__(self, path: Path, key: bytes):
        self.path = path
        self._key = key
        self._body: bytes | None = None

    def head(self, where_: str) -> tuple[str, str] | None:
        """(cookie, marker) of the kept state read as ``where_`` says, or None."""
        try:
            blob = self.path.read_bytes()
        except OSError:
            return None
        head = self._part(blob, 0)
        if head is None:
            return None
        value, end = head
        if not (isinstance(value, tuple) and len(value) == 4 and value[0] == FORMAT
                and value[1] == where_ and isinstance(value[2], str)
                and isinstance(value[3], str)):
            return None
        self._body = blob[end:]
        return value[2], value[3]

    def state(self) -> State | None:
        """The kept state whose head :meth:`head` returned, or None."""
        body, self._body = self._body, None
        part = self._part(body, 0) if body is not None else None
        return part[0] if part is not None and isinstance(part[0], dict) else None

    def _part(self, blob: bytes, at: int) -> tuple[Any, int] | None:
        """A MAC, an 8-byte length, then that many bytes of marshal data."""
        if len(blob) < at + 40:
            return None
        check, size = blob[at:at + 32], int.from_bytes(blob[at + 32:at + 40], "big")
        data = blob[at + 40:at + 40 + size]
        if len(data) != size or not hmac.compare_digest(self._mac(data), check):
            return None
        try:
            return marshal.loads(data), at + 40 + size
        except (ValueError, EOFError, TypeError):
            return None

    def save(self, kept: Kept) -> None:
        parts = [marshal.dumps((FORMAT, kept.where, kept.cookie, kept.marker)),
                 marshal.dumps(kept.state)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                for data in parts:
                    fh.write(self._mac(data) + len(data).to_bytes(8, "big"))
                    fh.write(data)
            os.replace(tmp, self.path)
        except OSError:  # the next import reads everything: slower, not wrong
            tmp.unlink(missing_ok=True)

    def load(self, where_: str) -> Kept | None:
        head = self.head(where_)
        state = self.state() if head is not None else None
        return None if head is None or state is None else Kept(where_, *head, state)

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)

    def _mac(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()


def new_marker(stamp: str) -> str:
    return f"{MARKER_PREFIX}{stamp} {secrets.token_hex(8)}"


def markers(values: Iterable[str]) -> list[str]:
    """The import markers among ``ou=people``'s description values."""
    return [v for v in values if v.startswith(MARKER_PREFIX)]


class Reading:
    """One import's read of the persons' state: started with the export's read (a forked
    child runs the sync search), taken by compute(), kept after the import if it wrote.

    ``directory``: an importer.Directory; ``query``: the people's search of importer.reads();
    ``store``: None reads everything with a plain search and keeps nothing (full compare)."""

    def __init__(self, directory: Directory, query: Query, store: Store | None):
        self.directory = directory
        self.query = query
        self.store = store
        self.where = where(directory.t.describe(), query[0], query[2])
        self.head = store.head(self.where) if store is not None else None
        self.kept: Kept | None = None
        self.state: State | None = None
        self.cookie: str | None = None
        self.how = "searched"  # "searched", "synced" (from the kept state), "synced in full"
        self.descriptions: list[str] = []  # ou=people's, as take() was given them
        # The persons a streaming bulk load writes, by the entryUUID given them, and the
        # directory's cookie read once slapd is up again (see load_person).
        self.loaded: State | None = None
        self.loaded_from: str | None = None

    def start(self) -> None:
        if self.store is not None:
            self.directory.prefetch_sync(self.query, self.head[0] if self.head else None)
            if self.head is not None:  # loaded while slapd and the forked child work
                state = self.store.state()
                self.kept = None if state is None else Kept(self.where, *self.head, state)

    def take(self, descriptions: list[str]) -> dict[str, Entry]:
        """DN -> state of every person. ``descriptions``: ou=people's, as read now; the kept
        state is used only if the import markers among them are exactly its own."""
        self.descriptions = descriptions
        people_markers = markers(descriptions)
        if self.store is None:
            return self.directory.search(*self.query)
        from_cookie = self.head is not None  # the search started from the kept cookie
        state: State | None = None
        feed = self._feed(prefetched=True)
        if feed is not None and not from_cookie:
            state, self.how = merge(None, feed), "synced in full"
        elif feed is not None and self.kept is not None and people_markers == [self.kept.marker]:
            state, self.how = merge(self.kept.state, feed), "synced"
        if state is None and from_cookie:  # not usable: everything, from no cookie
            feed = self._feed(prefetched=False)
            state, self.how = (merge(None, feed) if feed else None), "synced in full"
        if state is None or feed is None:  # no sync feed here (no syncprov?): a plain search
            self.how = "searched"
            return self.directory._search(*self.query)
        self.state, self.cookie = state, feed.cookie
        return {dn: entry for dn, entry in state.values()}

    def _feed(self, prefetched: bool) -> Feed | None:
        from .transport import TransportError

        try:
            raw = (self.directory.take_sync(self.query) if prefetched
                   else self.directory.state_raw(*self.query, None))
        except TransportError:
            return None
        return parse_state(raw, self.query[2])

    def load_person(self, dn: str, entry: Entry) -> str | None:
        """A person a first import loads offline (into a base that held no person): the
        entryUUID to load it with, its state kept as written (None: nothing is kept). With the
        cookie that :meth:`loaded_cookie` reads once slapd is up again, that is the persons'
        state after the load, without reading 100 000 entries back: the next import is synced
        from there (docs/architecture.md, "The persons' state between imports")."""
        if self.store is None:
            return None
        if self.loaded is None:
            self.loaded = {}
        key = str(uuid.uuid4())
        self.loaded[key] = (dn, {n: list(entry[n]) for n in self.query[2] if n in entry})
        return key

    def loaded_cookie(self) -> None:
        """Right after a streaming bulk load started slapd again, before anything else writes:
        the directory's cookie, which covers what slapadd loaded (``-w`` wrote the
        contextCSN). What is written afterwards (the records left online, memberOf written by
        the overlay) comes in the next import's feed. Unreadable: nothing is kept."""
        from .transport import TransportError

        if self.loaded is None:
            return
        try:
            feed = parse_feed(self.directory.cookie_raw(self.query[0], self.query[3]), ())
        except TransportError:
            feed = None
        if (feed is None or feed.result != 0 or feed.problems or feed.changed or feed.present
                or feed.deleted):
            self.loaded = None
            return
        self.loaded_from = feed.cookie

    def commit(self, wrote: bool, bulk: bool, stamp: str) -> None:
        """After the import's changes are written: keep the state with a new marker written as
        the import's last write. Nothing is kept or marked when the import wrote nothing (the
        kept state and the directory's marker stay as they were). A bulk load keeps the state
        of the persons it loaded into a base that held none, with the cookie read when slapd
        started again (:meth:`load_person`); any other bulk load drops what was kept."""
        if self.store is None:
            return
        if bulk:
            if self.loaded is None or self.loaded_from is None:
                self.store.drop()
                return
            self.state, self.cookie = self.loaded, self.loaded_from
        if not wrote or self.state is None or self.cookie is None:
            return
        marker = new_marker(stamp)
        self.directory.mark_people([*(v for v in self.descriptions
                                      if not v.startswith(MARKER_PREFIX)), marker])
        self.store.save(Kept(self.where, self.cookie, marker, self.state))
