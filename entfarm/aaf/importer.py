"""``entfarm aaf import``: desired state from an export, current state from the directory, one
change set, refusals before any write, then ldapmodify (up to 4 side by side, run of
independent records after run); or, for a first import, an offline bulk load of its adds
(:mod:`.bulk`) and ldapmodify for the rest.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runlock
from ..errors import UserError
from ..model import Farm
from ..ntlm import nt_hashes
from . import bulk as bulk_load
from . import forked, ldif
from .export import Export, RecordCache, no_gc, start_load
from .mapping import (
    AAF_GROUP,
    GROUP_ATTRIBUTES,
    PERSON_ATTRIBUTES,
    PERSON_STATE_ATTRIBUTES,
    STRUCTURE_ATTRIBUTES,
    Desired,
    Provisioned,
    allocate_logins,
    desired_state,
    digest,
    group_memberships,
    person_entry,
)
from .people_state import Reading, Store
from .transport import Transport

Progress = Callable[[str], None]
Query = tuple[str, str, tuple[str, ...], str]  # base, filter, attributes, scope
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
# Persons whose entries are read one filter at a time (OR of their jointures) when their digest
# changed; past this share of the directory, one search of every person is cheaper. A filter of
# 1 000 jointures is about 31 KB, well under the 128 KiB that one argument may take (ssh hands
# the whole command to the remote shell as one); slapd tests each candidate against the OR, so
# much longer filters would cost it quadratically. 1 300 persons: 0.53-0.56 s in chunks of 200
# one after the other, 0.17-0.20 s in chunks of 1 000 side by side (lab, docker exec). Each
# chunk is searched as soon as it is full, while the other persons are still compared
# (_TargetedRead): the wait after the comparison went from 0.54 to 0.33 s (py-spy, lab).
_TARGETED_READ_CHUNK = 1000
_TARGETED_READ_MAX_SHARE = 0.2
# A first import (no person in the directory yet) of at least this many new entries is loaded
# offline with slapadd unless --online; --bulk forces it for any import.
BULK_MIN_ADDS = 10_000
# ldapmodify processes writing side by side, and the fewest records each is given.
APPLY_STREAMS = 4
STREAM_MIN_RECORDS = 50
_UAI_IN_DN = re.compile(r"^ENTStructureUAI=([^,]+),", re.IGNORECASE)


class ImportRefused(UserError):
    """The import would be unsafe or its input is broken; the directory was not touched."""


@dataclass
class NewAccount:
    uais: list[str]
    login: str
    nom: str
    prenom: str
    profil: str
    classe: str
    code: str


@dataclass
class ChangeSet:
    ldif_parts: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    per_uai: dict[str, Counter[str]] = field(default_factory=dict)
    new_accounts: list[NewAccount] = field(default_factory=list)
    logins: dict[str, str] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    people_before: int = 0  # persons in the directory when the change set was computed

    def count(self, what: str, uai: str | None = None) -> None:
        self.counts[what] += 1
        if uai:
            self.per_uai.setdefault(uai, Counter())[what] += 1

    @property
    def ldif(self) -> str:
        return "".join(self.ldif_parts)

    @property
    def changes(self) -> int:
        return len(self.ldif_parts)

    @property
    def adds(self) -> int:
        return sum(n for what, n in self.counts.items() if what.endswith(" add"))


@dataclass
class ImportResult:
    changes: ChangeSet
    applied: bool
    run_record: Path | None
    distribution: list[Path]
    timings: dict[str, float]
    bulk_backup: Path | None = None  # the slapcat backup taken before a bulk load
    people_state: str = "searched"  # how the persons' state was read (people_state.Reading)


def _ssha(code: str, algorithm: str = "sha512", salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(8)
    data = code.encode() + salt
    # The named constructors: hashlib.new looks the algorithm up at every call.
    digest = (hashlib.sha512(data) if algorithm == "sha512" else hashlib.sha1(data)
              if algorithm == "sha1" else hashlib.new(algorithm, data)).digest()
    label = "SSHA512" if algorithm == "sha512" else "SSHA"
    return "{" + label + "}" + base64.b64encode(digest + salt).decode("ascii")


def _codes(n: int) -> list[str]:
    """``n`` one-time codes of 10 letters from one draw of the system's random source.

    32 letters: the low 5 bits of a random byte pick one uniformly (secrets.choice per letter
    cost a second per 10 000 new accounts)."""
    raw = secrets.token_bytes(10 * n)
    return ["".join([CODE_ALPHABET[b & 31] for b in raw[i:i + 10]]) for i in range(0, 10 * n, 10)]


def _generalized(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ")


def _months_before(now: dt.datetime, months: int) -> dt.datetime:
    month = now.month - months
    year = now.year + (month - 1) // 12
    month = (month - 1) % 12 + 1
    day = min(now.day, 28)
    return now.replace(year=year, month=month, day=day)


# An entryUUID no entry has (slapd makes version 1 UUIDs): a search for it matches nothing.
_NO_UUID = "00000000-0000-0000-0000-000000000000"


class Directory:
    """Reads and writes the directory through a transport, with the OpenLDAP client tools."""

    def __init__(self, transport: Transport, base_dn: str, streams: int = APPLY_STREAMS):
        self.t = transport
        self.base = base_dn
        self.streams = streams  # ldapmodify side by side at most (see apply_parts)
        self._pending: dict[Query, Future[bytes] | forked.Forked[bytes]] = {}
        self._pending_sync: dict[Query, forked.Forked[bytes]] = {}

    def prefetch(self, queries: list[Query], in_child: Collection[Query] = ()) -> None:
        """Start searches in the background (the server and ldapsearch work while the export is
        read); :meth:`search` with the same arguments then takes their result.

        ``in_child``: searches run in a forked child, started before the threads of the others.
        Every prefetched output is parsed here when :meth:`search` takes it (after the export
        is read).
        The people's state (20 MB of LDIF for 100 000 persons) parsed in this process while the
        export was read held its GIL; parsed in the child, its 100 000 entries then cost 0.37 s
        to pickle there and 0.25 s to unpickle here, more than the 0.4 s of parsing them here.
        """
        children = [q for q in queries if q in in_child]
        for q, child in zip(children, forked.fork_each(lambda q: self._raw(*q), children),
                            strict=True):
            self._pending[q] = child
        pool = ThreadPoolExecutor(max_workers=max(1, len(queries)),
                                  thread_name_prefix="ldapsearch")
        for q in queries:
            if q not in in_child:
                self._pending[q] = pool.submit(self._raw, *q)
        pool.shutdown(wait=False)

    def prefetch_sync(self, query: Query, cookie: str | None) -> None:
        """Start :meth:`state_raw` of ``query`` in a forked child; :meth:`take_sync` takes it."""
        (child,) = forked.fork_each(lambda q: self.state_raw(*q, cookie), [query])
        self._pending_sync[query] = child

    def take_sync(self, query: Query) -> bytes:
        pending = self._pending_sync.pop(query, None)
        return pending.result() if pending is not None else self.state_raw(*query, None)

    def mark_people(self, descriptions: list[str]) -> None:
        """ou=people's descriptions, replaced (the import marker among them: people_state)."""
        self.apply(ldif.modify(f"ou=people,{self.base}", {"description": descriptions}))

    def drop_prefetched(self) -> None:
        """Stop the searches nobody took (an import refused before it read the directory): a
        forked one would otherwise wait on its full pipe for as long as this process lives."""
        pending, self._pending = self._pending, {}
        syncs, self._pending_sync = self._pending_sync, {}
        for p in [*pending.values(), *syncs.values()]:
            if isinstance(p, forked.Forked):
                p.cancel()

    def _auth(self) -> list[str]:
        return ["-Q", "-Y", "EXTERNAL", "-H", self.t.uri]

    def search(self, base: str, filt: str, attrs: tuple[str, ...], scope: str = "one"
               ) -> dict[str, ldif.Entry]:
        pending = self._pending.pop((base, filt, attrs, scope), None)
        if pending is not None:
            return ldif.parse(pending.result(), attrs)
        return self._search(base, filt, attrs, scope)

    def _raw(self, base: str, filt: str, attrs: tuple[str, ...], scope: str) -> bytes:
        return self.t.run(["ldapsearch", "-LLL", *self._auth(), "-o", "ldif-wrap=no", "-z", "0",
                           "-s", scope, "-b", base, filt, *attrs], ok=(0, 32), compress=True)

    def _search(self, base: str, filt: str, attrs: tuple[str, ...], scope: str
                ) -> dict[str, ldif.Entry]:
        return ldif.parse(self._raw(base, filt, attrs, scope), attrs)

    def state_raw(self, base: str, filt: str, attrs: tuple[str, ...], scope: str,
                  cookie: str | None) -> bytes:
        """What people_state.parse_state reads: from ``cookie``, the sync search. From nothing,
        the directory's cookie first (a sync search that matches nothing answers at once),
        then the entries by a plain search with their entryUUID, after a NUL byte (LDIF has
        none): a sync search without cookie sends the same entries each with its sync state,
        which costs more to send and to read (docs/performance.md, twelfth session). Read after
        its cookie, the state is only newer than the cookie says; the next feed brings those
        entries again."""
        if cookie is not None:
            return self.sync_raw(base, filt, attrs, scope, cookie)
        return self.cookie_raw(base, scope) + b"\0" + self._raw(
            base, filt, (*attrs, "entryUUID"), scope)

    def cookie_raw(self, base: str, scope: str) -> bytes:
        """The directory's current sync cookie: a sync search that matches nothing."""
        return self.sync_raw(base, f"(entryUUID={_NO_UUID})", ("1.1",), scope, None)

    def sync_raw(self, base: str, filt: str, attrs: tuple[str, ...], scope: str,
                 cookie: str | None) -> bytes:
        """A refreshOnly sync search (RFC 4533) from ``cookie`` (None: from nothing), printed
        as extended LDIF: its sync states, ID sets and cookie are comments (see people_state)."""
        return self.t.run(["ldapsearch", *self._auth(), "-o", "ldif-wrap=no", "-z", "0",
                           "-E", "sync=ro" + (f"/{cookie}" if cookie else ""),
                           "-s", scope, "-b", base, filt, *attrs], ok=(0,), compress=True)

    def people_by_jointure(self, jointures: list[str], attrs: tuple[str, ...]
                           ) -> dict[str, ldif.Entry]:
        """Person entries by ENTPersonJointure (an equality index), in one search."""
        terms = "".join(f"(ENTPersonJointure={_filter_escape(j)})" for j in jointures)
        return self._search(f"ou=people,{self.base}", f"(|{terms})", attrs, "one")

    def dump(self) -> bytes:
        """Everything under the base DN (tests compare dumps before and after)."""
        return self.t.run(["ldapsearch", "-LLL", *self._auth(), "-o", "ldif-wrap=no",
                           "-b", self.base, "(objectClass=*)", "*", "+"], ok=(0, 32))

    def apply(self, text: str) -> None:
        if text:
            self.t.run(["ldapmodify", *self._auth()], stdin=text.encode("utf-8"))

    def apply_parts(self, parts: list[str], streams: int | None = None) -> None:
        """Apply change records in their order, each run of independent records (see
        :func:`independent_runs`) split over up to ``streams`` ldapmodify run side by side.

        slapd flushes each write transaction to disk; transactions of concurrent connections
        share the file system's journal commits (one ldapmodify waits for every flush of its
        own). A run ends before the next starts, so a group is written after its members
        exist (the memberof overlay sets memberOf on existing entries only). When a stream
        fails, the others still finish their records; the first error is raised, and running
        the same import again applies what is missing, as after a failed single ldapmodify."""
        streams = self.streams if streams is None else streams
        for run in independent_runs(parts):
            size = max(1, -(-len(run) // max(1, streams)))
            if len(run) < STREAM_MIN_RECORDS * 2:
                size = len(run)
            chunks = [run[i:i + size] for i in range(0, len(run), size)]
            if len(chunks) == 1:
                self._ldapmodify(chunks[0])
                continue
            with ThreadPoolExecutor(max_workers=len(chunks),
                                    thread_name_prefix="ldapmodify") as pool:
                done = [pool.submit(self._ldapmodify, chunk) for chunk in chunks]
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                raise errors[0]  # type: ignore[misc]

    def _ldapmodify(self, parts: list[str]) -> None:
        self.t.run(["ldapmodify", *self._auth()],
                   stdin=b"".join(part.encode("utf-8") for part in parts))


def independent_runs(parts: list[str]) -> list[list[str]]:
    """The change records cut into runs that may be applied in any order: consecutive records
    under the same parent entry, all adds and modifies or all deletes, each DN once. The
    importer writes containers, structures, people, groups, then deletions, in that order."""
    runs: list[list[str]] = []
    key: tuple[str, bool] | None = None
    seen: set[str] = set()
    for part in parts:
        dn, kind = ldif.target(part)
        dn = dn.lower()
        this = (ldif.parent(dn), kind == "delete")
        if this != key or dn in seen:
            runs.append([])
            key, seen = this, set()
        seen.add(dn)
        runs[-1].append(part)
    return runs


def _filter_escape(value: str) -> str:
    """RFC 4515 escaping of an assertion value."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\\0" else c for c in value)


def _same(name: str, a: list[str], b: list[str]) -> bool:
    if a == b:  # the directory returns values in the order the importer wrote them
        return True
    if name.lower() == "objectclass":
        return {v.lower() for v in a} - {"top"} == {v.lower() for v in b} - {"top"}
    return set(a) == set(b)


def _diff(current: ldif.Entry, desired: ldif.Entry, managed: tuple[str, ...]
          ) -> dict[str, list[str]]:
    none: list[str] = []
    return {n: desired.get(n, none) for n in managed
            if not _same(n, current.get(n, none), desired.get(n, none))}


def _member_changes(current: list[str], desired: list[str]) -> tuple[list[str], list[str]]:
    """Member values to add and to delete, one by one: a replace of the whole list makes the
    memberof overlay rewrite memberOf on every member of the group, not only on those who moved.
    DNs compare without case (distinguishedNameMatch; the member DNs the importer writes hold
    no escapes or spaces that would need a fuller normalisation)."""
    have = {v.lower() for v in current}
    want = {v.lower() for v in desired}
    return ([v for v in desired if v.lower() not in have],
            [v for v in current if v.lower() not in want])


def _tag(cs: ChangeSet, d: Desired, dn: str, uais: list[str], what: str) -> None:
    """Name on an entry no import rebuilds the replication accounts of its établissements
    (ENTReplicaAccount), counted as ``what`` under its first UAI."""
    cs.ldif_parts.append(ldif.modify(dn, {}, add={
        "objectClass": ["ENTReplicated"], "ENTReplicaAccount": [d.replica_dn(u) for u in uais]}))
    cs.count(what, uais[0])


def _uais_of(entry: ldif.Entry) -> list[str]:
    out = []
    for dn in entry.get("ENTPersonEtablissements", []) + entry.get("ENTPersonStructRattach", []):
        m = _UAI_IN_DN.match(dn)
        if m:
            out.append(m.group(1))
    return list(dict.fromkeys(out)) or ["?"]


def reads(base: str, full_compare: bool = False) -> list[Query]:
    """The searches :func:`compute` makes: top containers, the base, people, structures, groups.

    Only the attributes the importer owns (and uid) are read; of people, only their state and
    digest unless ``full_compare`` (the entries of people whose digest changed are read after).
    """
    people_attrs = (*PERSON_ATTRIBUTES, "uid") if full_compare else PERSON_STATE_ATTRIBUTES
    return [
        # description: the import marker on ou=people (entfarm.aaf.people_state)
        (base, "(objectClass=organizationalUnit)", ("ou", "description"), "one"),
        (base, "(objectClass=*)", ("dn",), "base"),
        (f"ou=people,{base}", "(ENTPersonJointure=*)", people_attrs, "one"),
        (f"ou=structures,{base}", "(objectClass=ENTStructure)", STRUCTURE_ATTRIBUTES, "one"),
        (f"ou=groups,{base}", "(objectClass=groupOfNames)", GROUP_ATTRIBUTES, "one"),
        # People deactivated before mapping version 3, which no later import rebuilds (they
        # are not in the export): tagged here for the replica rules (ENTReplicaAccount). An
        # equality index on ENTPersonEtat keeps this to the deactivated; empty once tagged.
        (f"ou=people,{base}", "(&(ENTPersonEtat=DESACTIVE)(!(objectClass=ENTReplicated)))",
         ("ENTPersonJointure", "ENTPersonEtablissements"), "one"),
        # The classes the directory knows: the entries this importer writes need the role's
        # latest schema evolution (the directory converged before the import).
        ("cn=Subschema", "(objectClass=subschema)", ("objectClasses",), "base"),
    ]


def compute(export: Export, farm: Farm, directory: Directory, *, now: dt.datetime,
            max_deactivate: float, force: bool, remembered: dict[str, str],
            progress: Progress, full_compare: bool = False,
            scope: Collection[str] | None = None, held: Collection[str] = (),
            stream: Callable[[int], bulk_load.StreamingLoad | None] | None = None,
            reading: Reading | None = None) -> ChangeSet:
    """The change set; raises ImportRefused before anything is written.

    A person whose stored digest (ENTPersonEmpreinte) equals the digest of what the export says
    is up to date and is neither rebuilt nor read in full; ``full_compare`` compares every
    attribute of every person instead (it also repairs entries edited by hand).

    ``scope``: UAIs to provision (None: every établissement of farm.yml). ``held``: UAIs taken
    out on purpose (a wave rollback): their accounts are deactivated without the
    ``max_deactivate`` refusal, and neither purged nor stripped of their groups, so that
    re-onboarding finds them as they were.

    ``stream``: asked, when the base holds no person yet, whether to bulk-load this first
    import while it is computed (given the number of persons to add); the
    :class:`bulk_load.StreamingLoad` it returns is fed every change record, in order.
    """
    base = farm.spec.academie.base_dn
    d: Desired = desired_state(export, farm, scope)
    cs = ChangeSet(skipped=d.skipped)
    progress(f"reading the directory ({directory.t.describe()})")
    q_tops, q_base, q_people, q_structures, q_groups, q_untagged, q_schema = reads(
        base, full_compare)
    tops = directory.search(*q_tops)
    have_base = directory.search(*q_base)
    if not have_base:
        raise ImportRefused(f"the directory has no entry {base}: deploy the directory first "
                            "(entfarm deploy --tags directory)")
    classes = [v for e in directory.search(*q_schema).values()
               for v in e.get("objectClasses", [])]
    if not any("NAME 'ENTReplicated'" in v for v in classes):
        raise ImportRefused(
            "the directory's schema lacks the class ENTReplicated (schema evolution "
            "entfarm-sdet-replica) that this version of entfarm writes: converge the directory "
            "and the school servers first (entfarm deploy --tags directory,school_server:replica"
            "), then import again; nothing was written")
    for ou in ("people", "structures", "groups"):
        dn = f"ou={ou},{base}"
        if dn.lower() not in {k.lower() for k in tops}:
            cs.ldif_parts.append(ldif.add(dn, {"objectClass": ["organizationalUnit"], "ou": [ou]}))
            cs.count("containers add")
    people_top = next((e for dn, e in tops.items() if dn.lower() == f"ou=people,{base}".lower()),
                      {})
    people = (reading.take(people_top.get("description", [])) if reading is not None
              else directory.search(*q_people))
    structures = directory.search(*q_structures)
    groups = directory.search(*q_groups)
    untagged = directory.search(*q_untagged)
    progress(f"directory: {len(people)} person(s), {len(structures)} structure(s), "
             f"{len(groups)} group(s); export: {len(d.people)} person(s) to provision")

    by_jointure = {e["ENTPersonJointure"][0]: (dn, e) for dn, e in people.items()
                   if e.get("ENTPersonJointure")}
    cs.people_before = len(people)
    existing = {j: _login_of(dn, e) for j, (dn, e) in by_jointure.items()}
    logins = allocate_logins(d, existing, remembered)
    cs.logins = logins

    for dn, entry in d.structures.items():
        uai = entry["ENTStructureUAI"][0]
        if dn not in structures:
            cs.ldif_parts.append(ldif.add(dn, entry))
            cs.count("structures add", uai)
        else:
            changes = _diff(structures[dn], entry, STRUCTURE_ATTRIBUTES)
            if changes:
                cs.ldif_parts.append(ldif.modify(dn, changes))
                cs.count("structures modify", uai)
    # Structures kept but no longer provisioned (a wave rollback, an établissement gone from
    # farm.yml) still name their replication account, like everything the importer keeps.
    for dn, entry in sorted(structures.items()):
        uai = (entry.get("ENTStructureUAI") or [""])[0]
        if dn not in d.structures and uai and not entry.get("ENTReplicaAccount"):
            _tag(cs, d, dn, [uai], "structures tag")

    members: dict[str, list[str]] = {}
    gen = _generalized(now)
    stale: list[tuple[str, str, ldif.Entry]] = []  # jointure, uai, desired entry
    # The new accounts' one-time codes, their NT hashes computed all at once, two salts each.
    codes = _codes(sum(1 for j in d.people if j not in by_jointure))
    salts = secrets.token_bytes(16 * len(codes))
    fresh = iter([(code, nt, salts[16 * i:16 * i + 16]) for i, (code, nt)
                  in enumerate(zip(codes, nt_hashes(codes), strict=True))])
    # A first import may be loaded while it is computed (every person is then an add, and so
    # is every group not yet in the directory, with only those persons as members).
    loader = stream(len(d.people)) if stream is not None and not by_jointure else None
    if loader is not None:
        for part in cs.ldif_parts:
            loader.feed(part)
    order = sorted(d.people.items())
    # The établissements of each person the directory holds: those of the export where the
    # stored digest matched (it covers them), read from the directory for everyone else that
    # needs them: the persons to rewrite, those leaving, and those the retention may purge.
    # Their entries are read while the others are compared, from the first person on (the
    # digests' children are forked by then).
    purge_before = _generalized(_months_before(now, farm.spec.farm.retention_months))
    leaving_jointures = [j for j, (_dn, e) in by_jointure.items() if j not in d.people and (
        (e.get("ENTPersonEtat") or ["ACTIF"])[0] != "DESACTIVE"
        or (e.get("ENTPersonDateDesactivation") or [gen])[0] < purge_before)]
    targeted = _TargetedRead(directory, _TARGETED_READ_MAX_SHARE * len(by_jointure))
    if not full_compare:
        targeted.add(leaving_jointures, start=False)
    # Not with a loader: its writer thread holds slapadd's input, which a child would inherit.
    facts = person_facts(d, order, logins, forking=loader is None)
    for n, ((jointure, p), (fingerprint, joined)) in enumerate(zip(order, facts, strict=True), 1):
        if n % 20000 == 0:
            progress(f"comparing persons ({n} of {len(d.people)})")
        if n == 1:
            targeted.flush()
        dn = d.people_dn(logins[jointure])
        for cn in joined:
            members.setdefault(cn, []).append(dn)
        known = by_jointure.get(jointure)
        if known is not None and not full_compare:
            state = known[1]
            if ((state.get("ENTPersonEmpreinte") or [""])[0] == fingerprint
                    and (state.get("ENTPersonEtat") or [""])[0] != "DESACTIVE"):
                continue
        entry = person_entry(d, p, logins, fingerprint)
        uai = d.sid_uai[p.sids[0]]
        if known is not None:
            stale.append((jointure, uai, entry))
            if not full_compare:
                targeted.add([jointure])
            continue
        code, nt, salt = next(fresh)
        entry["ENTPersonCodeActivation"] = [_ssha(code, "sha512", salt[:8])]
        entry["userPassword"] = [_ssha(code, "sha1", salt[8:])]
        # Samba on the school servers checks logins against it (entfarm/ntlm.py)
        entry["ENTPersonNTHash"] = [nt]
        cs.ldif_parts.append(ldif.add(dn, entry))
        if loader is not None:
            loader.add(cs.ldif_parts[-1], [g for g in dict.fromkeys(map(d.group_dn, joined))
                                           if g not in groups],
                       reading.load_person(dn, entry) if reading is not None else None)
        cs.count("people add", uai)
        classes = [v.split("$", 1)[1] for v in entry.get("ENTEleveClasses", [])]
        cs.new_accounts.append(NewAccount(
            [d.sid_uai[s] for s in p.sids], logins[jointure], entry["sn"][0],
            (entry.get("givenName") or [""])[0], p.label, " ".join(classes), code))

    after_people = len(cs.ldif_parts)
    current_of = _current_entries(directory, q_people[0], targeted, len(stale),
                                  len(leaving_jointures), by_jointure, full_compare, progress)

    def uais_of(jointure: str) -> list[str]:
        dn, e = by_jointure[jointure]
        read = current_of.get(dn)
        if read is not None:
            return _uais_of(read)
        p = d.people.get(jointure)
        if p is None:  # not found by the targeted read (gone meanwhile): what the state says
            return _uais_of(e)
        return list(dict.fromkeys(d.sid_uai[s] for s in p.sids))  # its digest covers them

    # Refusal: too many deactivations in one établissement (nothing is written before).
    # Most persons stay, unread: they are counted by their list of structures, and each list
    # is turned into UAIs once.
    active: Counter[str] = Counter()
    leaving: Counter[str] = Counter()
    staying: Counter[tuple[str, ...]] = Counter()
    for j, (dn, e) in by_jointure.items():
        if (e.get("ENTPersonEtat") or ["ACTIF"])[0] == "DESACTIVE":
            continue
        wanted = d.people.get(j)
        if wanted is not None and dn not in current_of:
            staying[tuple(wanted.sids)] += 1
            continue
        for uai in uais_of(j):
            active[uai] += 1
            if wanted is None:
                leaving[uai] += 1
    for sids, n in staying.items():
        for uai in dict.fromkeys(d.sid_uai[s] for s in sids):
            active[uai] += n
    over = [f"{n} of the {active[uai]} active accounts of {uai} ({n / active[uai]:.1%})"
            for uai, n in sorted(leaving.items())
            if uai not in held and n / active[uai] > max_deactivate]
    if over and not force:
        raise ImportRefused(
            f"refusing to import: it would deactivate {'; '.join(over)}: more than the "
            f"allowed {max_deactivate:.0%}; check the export, then re-run with --force to "
            "deactivate them anyway (or raise --max-deactivate)")

    for jointure, uai, entry in stale:
        current_dn = by_jointure[jointure][0]
        current = current_of.get(current_dn, {})
        # Equal dicts (same names, same value lists; both hold only owned attributes and uid)
        # need no attribute-by-attribute comparison.
        changes = {} if current == entry else _diff(current, entry, PERSON_ATTRIBUTES)
        if changes:
            cs.ldif_parts.append(ldif.modify(current_dn, changes))
            was_off = (current.get("ENTPersonEtat") or [""])[0] == "DESACTIVE"
            cs.count("people reactivate" if was_off else "people modify", uai)

    purges: list[str] = []
    for jointure, (dn, e) in sorted(by_jointure.items()):
        if jointure in d.people:
            continue
        if (e.get("ENTPersonEtat") or ["ACTIF"])[0] != "DESACTIVE":
            cs.ldif_parts.append(ldif.modify(dn, {"ENTPersonEtat": ["DESACTIVE"],
                                                  "ENTPersonDateDesactivation": [gen]}))
            cs.count("people deactivate", uais_of(jointure)[0])
        elif (e.get("ENTPersonDateDesactivation") or [gen])[0] < purge_before and not (
                held and set(uais_of(jointure)) & set(held)):
            purges.append(dn)
            cs.count("people purge", uais_of(jointure)[0])

    for cn, dns in sorted(members.items()):
        dn = d.group_dn(cn)
        entry = {"objectClass": ["groupOfNames", "ENTReplicated"], "cn": [cn],
                 "ENTReplicaAccount": [d.replica_dn(cn.split("$")[0])],
                 "member": list(dict.fromkeys(dns))}
        if dn not in groups:
            cs.ldif_parts.append(ldif.add(dn, entry))
            cs.count("groups add", cn.split("$")[0])
        else:
            current = groups[dn]
            changes = _diff(current, entry, ("objectClass", "cn", "ENTReplicaAccount"))
            added, removed = _member_changes(current.get("member", []), entry["member"])
            if changes or added or removed:
                cs.ldif_parts.append(ldif.modify(dn, changes, add={"member": added},
                                                 delete={"member": removed}))
                cs.count("groups modify", cn.split("$")[0])
    for dn, entry in sorted(groups.items()):
        cn = (entry.get("cn") or [""])[0]
        if AAF_GROUP.match(cn) and cn not in members and cn.split("$")[0] not in held:
            cs.ldif_parts.append(ldif.delete(dn))
            cs.count("groups delete", cn.split("$")[0])
        elif AAF_GROUP.match(cn) and cn not in members and not entry.get("ENTReplicaAccount"):
            # A held établissement's group, kept as it was: named like the others.
            _tag(cs, d, dn, [cn.split("$")[0]], "groups tag")
    cs.ldif_parts += [ldif.delete(dn) for dn in purges]
    purged = {dn.lower() for dn in purges}
    for dn, e in sorted(untagged.items()):
        jointure = (e.get("ENTPersonJointure") or [""])[0]
        uais = [u for u in _uais_of(e) if u != "?"]
        if jointure in d.people or dn.lower() in purged or not uais:
            continue  # rebuilt above, gone, or of no établissement
        _tag(cs, d, dn, uais, "people tag")
    if loader is not None:
        for part in cs.ldif_parts[after_people:]:
            loader.feed(part)
    return cs


# Below this many persons, one process computes their digests (a fork costs more than it saves).
_PARALLEL_MIN_PEOPLE = 20_000
Fact = tuple[str, list[str]]  # a person's digest and group cns


def _facts(d: Desired, order: list[tuple[str, Provisioned]], logins: dict[str, str],
           bounds: tuple[int, int]) -> Iterator[Fact]:
    for _j, p in order[bounds[0]:bounds[1]]:
        yield digest(d, p, logins), group_memberships(d, p)


def person_facts(d: Desired, order: list[tuple[str, Provisioned]], logins: dict[str, str],
                 forking: bool = True) -> Iterator[Fact]:
    """Each person's digest and groups, in ``order``, on every core: forked children compute
    the last slices (what they read is inherited, only their results come back) while this
    process yields the first one; one process for small exports or where ``forking`` is False.

    The children run only the pure functions digest() and group_memberships() on inherited
    data, so the caller's other threads, if any, hold nothing they need."""
    n = len(order)
    cores = forked.cores()
    if not forking or cores < 2 or n < _PARALLEL_MIN_PEOPLE:
        yield from _facts(d, order, logins, (0, n))
        return
    slices = forked.split([1] * n, cores)
    children = forked.fork_each(lambda bounds: list(_facts(d, order, logins, bounds)),
                                slices[1:])
    try:
        yield from _facts(d, order, logins, slices[0])
        for child in children:
            yield from child.result()
    finally:
        for child in children:
            child.cancel()


class _TargetedRead:
    """The entries (owned attributes and uid) of the persons to compare attribute by attribute
    and of those leaving or to purge, by jointure, read while compute() goes on: a search per
    chunk of _TARGETED_READ_CHUNK jointures, up to ``directory.streams`` side by side, each
    started as soon as its chunk is full. Past ``limit`` persons (:attr:`over`), one search
    of every person is cheaper: nothing more is started, and what was is left to finish."""

    def __init__(self, directory: Directory, limit: float):
        self.directory = directory
        self.limit = limit
        self.wanted = 0
        self.pending: list[str] = []
        self.started: list[Future[dict[str, ldif.Entry]]] = []
        self._pool: ThreadPoolExecutor | None = None

    @property
    def over(self) -> bool:
        return self.wanted > self.limit

    def add(self, jointures: list[str], start: bool = True) -> None:
        """``start``: False only collects (no thread may start yet: a fork is to come)."""
        self.wanted += len(jointures)
        if self.over:
            self.pending = []
            return
        self.pending += jointures
        while start and len(self.pending) >= _TARGETED_READ_CHUNK:
            self._start(self.pending[:_TARGETED_READ_CHUNK])
            self.pending = self.pending[_TARGETED_READ_CHUNK:]

    def flush(self) -> None:
        """Start reading what is collected so far."""
        if self.pending and not self.over:
            self._start(self.pending)
            self.pending = []

    def _start(self, chunk: list[str]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.directory.streams),
                                            thread_name_prefix="ldapsearch")
        self.started.append(self._pool.submit(self.directory.people_by_jointure, chunk,
                                              (*PERSON_ATTRIBUTES, "uid")))

    def result(self) -> dict[str, ldif.Entry]:
        """DN -> entry of every person added (not :attr:`over` the limit)."""
        try:
            self.flush()
            out: dict[str, ldif.Entry] = {}
            for future in self.started:
                out.update(future.result())
            return out
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _current_entries(directory: Directory, people_base: str, targeted: _TargetedRead,
                     stale: int, leaving: int, by_jointure: dict[str, tuple[str, ldif.Entry]],
                     full_compare: bool, progress: Progress) -> dict[str, ldif.Entry]:
    """DN -> owned attributes of the persons to compare attribute by attribute (``stale`` of
    them) and of those leaving or to purge (``leaving``), as ``targeted`` read them, or read
    all at once past its limit."""
    if full_compare:
        return {dn: e for dn, e in by_jointure.values()}
    if targeted.over:
        targeted.close()
        progress(f"reading {len(by_jointure)} person entries in full ({stale} changed, "
                 f"{leaving} leaving or to purge)")
        return directory.search(people_base, "(ENTPersonJointure=*)",
                                (*PERSON_ATTRIBUTES, "uid"), "one")
    if stale or leaving:
        progress(f"reading {stale} changed person entries in full, and {leaving} leaving "
                 "or to purge")
    return targeted.result()


def _login_of(dn: str, entry: ldif.Entry) -> str:
    """A person's login: ENTPersonLogin, else the value of a ``uid=`` RDN (the importer's DNs;
    logins hold no character that a DN escapes)."""
    login = (entry.get("ENTPersonLogin") or [""])[0]
    if login:
        return login
    name, _, value = dn.split(",", 1)[0].partition("=")
    return value if name.strip().lower() == "uid" else ""


def _farm_key(farm: Farm, *, write: bool = True) -> bytes | None:
    """The farm's key for what the importer keeps between runs (the export's record cache,
    the persons' state): made on first use, 0600 in the private state directory; None when
    there is none yet and ``write`` is False."""
    path = farm.state_dir / "aaf" / "record-cache.key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if not write:
            return None
        key = secrets.token_bytes(32)
        _write_private_bytes(path, key)
    if len(key) != 32:
        raise UserError(f"{path}: expected 32 bytes, found {len(key)}; delete it (the record "
                        "caches of the exports are then parsed over once, and the persons' "
                        "state read in full)")
    return key


def record_cache(farm: Farm, export: Path, *, write: bool = True) -> RecordCache | None:
    """The export's record cache, with the farm's key (None when there is none yet and
    ``write`` is False)."""
    key = _farm_key(farm, write=write)
    return None if key is None else RecordCache(export, key, write=write)


def _logins_file(state: Path) -> Path:
    return state / "aaf" / "logins.json"


def _read_logins(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot be read ({exc}); it keeps every login ever given, so "
                        "that no login changes: restore it from the state directory's backup "
                        "before importing") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of AAF jointure to login, found "
                        f"{type(data).__name__}; restore it from the state directory's backup "
                        "before importing")
    return {str(k): str(v) for k, v in data.items()}


def import_lock(state: Path) -> contextlib.AbstractContextManager[None]:
    """One import of a farm at a time: two would compute against the same directory and both
    write, and the second would overwrite the logins the first gave."""
    path = state / "aaf" / "import.lock"
    return runlock.held(path, "entfarm aaf import", lambda holder: ImportRefused(
        f"another import of this farm is running ({holder}; lock {path}); the directory was "
        "not touched: run this one again when it has ended"))


def _write_private(path: Path, text: str) -> None:
    _write_private_bytes(path, text.encode("utf-8"))


def _write_private_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_distribution(state: Path, accounts: list[NewAccount], stamp: str) -> list[Path]:
    """One CSV per UAI of the new accounts with their one-time codes, readable by the owner only."""
    per_uai: dict[str, list[NewAccount]] = {}
    for a in accounts:
        for uai in a.uais:
            per_uai.setdefault(uai, []).append(a)
    paths = []
    for uai, rows in sorted(per_uai.items()):
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=";", lineterminator="\n")
        writer.writerow(["login", "nom", "prenom", "profil", "classe", "code_activation"])
        for a in sorted(rows, key=lambda r: (r.profil, r.classe, r.nom, r.prenom)):
            writer.writerow([a.login, a.nom, a.prenom, a.profil, a.classe, a.code])
        path = state / "aaf" / "distribution" / uai / f"comptes-{stamp}.csv"
        _write_private(path, buf.getvalue())
        paths.append(path)
    return paths


def use_bulk(cs: ChangeSet, bulk: bool | None, target: bulk_load.BulkTarget | None) -> bool:
    """Whether the change set goes through an offline bulk load (see ``bulk`` of run_import)."""
    if bulk is False or cs.adds == 0:
        return False
    if bulk is None:
        return target is not None and cs.people_before == 0 and cs.adds >= BULK_MIN_ADDS
    if target is None:
        raise UserError("--bulk: this directory cannot be stopped and loaded offline from "
                        "here (no bulk target); import with --online")
    return True


def run_import(path: Path, farm: Farm, directory: Directory, *, dry_run: bool = False,
               force: bool = False, max_deactivate: float = 0.10,
               now: dt.datetime | None = None, progress: Progress = lambda _line: None,
               full_compare: bool = False, scope: Collection[str] | None = None,
               held: Collection[str] = (), bulk: bool | None = None,
               bulk_target: bulk_load.BulkTarget | None = None,
               export: Export | None = None, use_cache: bool = True) -> ImportResult:
    """Import an export; ``scope`` and ``held`` as in :func:`compute` (the wave ledger's).

    ``bulk``: True loads the adds offline through ``bulk_target`` (slapd stopped, slapadd,
    restarted; a slapcat backup restored on failure), False writes everything with ldapmodify,
    None (default) bulk-loads a first import of at least BULK_MIN_ADDS entries when a target is
    given.

    ``export``: ``path`` already read by :func:`load` (a wave imports the same export once per
    batch and reads it once); None reads it here, with the export's record cache unless
    ``use_cache`` is False (see :class:`RecordCache`; a dry run reads it and writes nothing).
    """
    with no_gc(), (contextlib.nullcontext() if dry_run else import_lock(farm.state_dir)):
        try:
            return _run_import(path, farm, directory, dry_run=dry_run, force=force,
                               max_deactivate=max_deactivate, now=now, progress=progress,
                               full_compare=full_compare, scope=scope, held=held, bulk=bulk,
                               bulk_target=bulk_target, export=export, use_cache=use_cache)
        finally:
            directory.drop_prefetched()


def _run_import(path: Path, farm: Farm, directory: Directory, *, dry_run: bool,
                force: bool, max_deactivate: float, now: dt.datetime | None,
                progress: Progress, full_compare: bool, scope: Collection[str] | None,
                held: Collection[str], bulk: bool | None,
                bulk_target: bulk_load.BulkTarget | None, export: Export | None,
                use_cache: bool) -> ImportResult:
    now = now or dt.datetime.now(dt.UTC)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    # The export's readers fork before any thread starts; the directory is then read while the
    # export is parsed, and compute() takes those results.
    loading = None
    if export is None:
        cache = record_cache(farm, path, write=not dry_run) if use_cache else None
        loading = start_load(path, cache=cache)
    queries = reads(farm.spec.academie.base_dn, full_compare)
    _tops, _base, people, _structures, _groups, _untagged, _schema = queries
    # The persons' state from the directory's sync feed, on top of what the last import kept
    # (entfarm.aaf.people_state); a full compare reads every attribute with a plain search.
    key = None if full_compare else _farm_key(farm, write=not dry_run)
    reading = Reading(directory, people, None if key is None else Store(
        farm.state_dir / "aaf" / "people-state", key))
    if reading.store is None:
        directory.prefetch(queries, in_child=[people])
    else:
        reading.start()  # a fork, before the searches' threads
        directory.prefetch([q for q in queries if q != people])
    if loading is not None:
        export = loading.finish(progress)
    assert export is not None
    timings["read"] = time.monotonic() - t0
    if export.blocking:
        shown = "\n".join(p.render() for p in export.blocking[:20])
        more = len(export.blocking) - 20
        raise ImportRefused(
            f"refusing to import {path}: {len(export.blocking)} blocking problem(s) in the "
            f"export; the directory was not touched:\n{shown}"
            + (f"\n… and {more} more (entfarm aaf check {path})" if more > 0 else ""))
    state = farm.state_dir
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    remembered = _read_logins(_logins_file(state))
    streaming: list[bulk_load.StreamingLoad] = []

    def stream(people: int) -> bulk_load.StreamingLoad | None:
        """A first import goes offline while it is computed: the automatic rule of use_bulk,
        or --bulk, decided before its persons are built."""
        if dry_run or bulk is False or bulk_target is None or people == 0:
            return None
        if bulk is None and people < BULK_MIN_ADDS:
            return None
        streaming.append(bulk_load.StreamingLoad(
            farm.spec.academie.base_dn, bulk_target, state / "aaf" / "backups", stamp=stamp,
            people=people, progress=progress))
        return streaming[0]

    t1 = time.monotonic()
    try:
        cs = compute(export, farm, directory, now=now, max_deactivate=max_deactivate,
                     force=force, remembered=remembered, progress=progress,
                     full_compare=full_compare, scope=scope, held=held, stream=stream,
                     reading=reading)
        people_state = reading.how
        progress(f"persons' state: {people_state}")
        timings["compare"] = time.monotonic() - t1
        if dry_run:
            return ImportResult(cs, False, None, [], timings, people_state=people_state)
        t2 = time.monotonic()
        record: dict[str, Any] = {
            "started": now.isoformat(), "export": str(path),
            "files": [f.path.name for f in export.files], "counts": dict(cs.counts),
            "per_uai": {u: dict(c) for u, c in cs.per_uai.items()}, "skipped": dict(cs.skipped),
            "force": force, "max_deactivate": max_deactivate, "full_compare": full_compare,
            "scope": None if scope is None else sorted(scope), "held": sorted(held),
            "people_state": people_state,
        }
        offline = bool(streaming) or use_bulk(cs, bulk, bulk_target)
        backup: Path | None = None
        record["bulk"] = offline
        if cs.changes or streaming:
            try:
                online = cs.ldif_parts
                if offline:
                    assert bulk_target is not None  # use_bulk says so
                    report = (streaming[0].finish() if streaming else bulk_load.load(
                        cs.ldif_parts, farm.spec.academie.base_dn, bulk_target,
                        state / "aaf" / "backups", stamp=stamp, progress=progress))
                    if streaming:  # slapd is up again: the cookie of what it loaded
                        reading.loaded_cookie()
                    backup = report.backup
                    record["bulk_backup"] = str(backup)
                    timings.update(report.timings)
                    online = report.online
                if online:
                    progress(f"applying {len(online)} change(s) with ldapmodify "
                             f"(up to {directory.streams} side by side)")
                    try:
                        directory.apply_parts(online)
                    except UserError as exc:
                        if backup is None:
                            raise _partly_applied(exc, state, cs, stamp, directory, record,
                                                  remembered) from exc
                        # The loaded accounts are in the directory: keep their logins and
                        # one-time codes, which a second run could not give again.
                        written = _keep_accounts(state, cs, stamp, remembered)
                        record["distribution"] = [str(p) for p in written]
                        raise UserError(
                            f"{exc}\nThe bulk load before it succeeded (its backup: {backup}; "
                            f"distribution files of its new accounts written: {len(written)}); "
                            "running the same import again applies the changes still missing") \
                            from exc
            except UserError as exc:
                record["status"] = "failed"
                record["error"] = str(exc)
                _write_run(state, stamp, record)
                raise
        # The import's last write, when it wrote: the marker of the state it keeps.
        try:
            reading.commit(wrote=bool(cs.changes), bulk=offline, stamp=stamp)
        except UserError as exc:
            progress(f"the persons' state is not kept ({exc}): the next import reads it all")
            if reading.store is not None:
                reading.store.drop()
        timings["apply"] = time.monotonic() - t2
        distribution = _keep_accounts(state, cs, stamp, remembered)
        record.update(status="ok", timings=timings, distribution=[str(p) for p in distribution])
        run = _write_run(state, stamp, record)
        return ImportResult(cs, True, run, distribution, timings, backup, people_state)
    except BaseException as exc:
        # Offline and fed, but neither finished nor restored (an error, an interrupt): restore.
        if streaming and not streaming[0].ended:
            raise streaming[0].abandon(exc) from exc
        raise


def _partly_applied(exc: UserError, state: Path, cs: ChangeSet, stamp: str,
                    directory: Directory, record: dict[str, Any],
                    remembered: dict[str, str]) -> UserError:
    """After a failed ldapmodify: keep the one-time codes of the new accounts it wrote before
    failing (a second run would not give them again), and say what a second run does."""
    if not cs.new_accounts:
        return exc
    written: set[str] = set()
    logins = [a.login for a in cs.new_accounts]
    try:
        for i in range(0, len(logins), _TARGETED_READ_CHUNK):
            terms = "".join(f"(uid={_filter_escape(x)})"
                            for x in logins[i:i + _TARGETED_READ_CHUNK])
            found = directory.search(f"ou=people,{directory.base}", f"(|{terms})", ("uid",))
            written |= {v for e in found.values() for v in e.get("uid", [])}
    except UserError as again:  # the directory is gone too: say so, keep nothing unsure
        return UserError(f"{exc}\nThe new accounts written before the failure could not be "
                         f"read back ({again}); their one-time codes are lost: reset them "
                         "after the next import")
    kept = [a for a in cs.new_accounts if a.login in written]
    paths = _keep_accounts(state, cs, stamp, remembered, accounts=kept)
    record["distribution"] = [str(p) for p in paths]
    return UserError(f"{exc}\n{len(kept)} of the {len(cs.new_accounts)} new accounts were "
                     f"written before the failure; their distribution files: "
                     f"{', '.join(str(p) for p in paths) or 'none'}. Running the same import "
                     "again applies the changes still missing")


def _keep_accounts(state: Path, cs: ChangeSet, stamp: str, remembered: dict[str, str],
                   accounts: list[NewAccount] | None = None) -> list[Path]:
    """Remember the logins and write the distribution files of the new accounts (``accounts``:
    only those, when a failed write left the others out of the directory).

    ``remembered``: logins.json as the import read it before computing (the import lock keeps
    it so); it is written again only when a login is new or moved."""
    logins_file = _logins_file(state)
    new = {j: login for j, login in cs.logins.items() if remembered.get(j) != login}
    if new or not logins_file.exists():
        _write_private(logins_file, json.dumps({**remembered, **new}, sort_keys=True, indent=0))
    return write_distribution(state, cs.new_accounts if accounts is None else accounts, stamp)


def _write_run(state: Path, stamp: str, record: dict[str, Any]) -> Path:
    path = state / "aaf" / "runs" / f"import-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return path
