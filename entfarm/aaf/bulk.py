"""Offline bulk load of a first AAF import: slapd stopped, the new entries loaded with ``slapadd``,
slapd started again, with a ``slapcat`` backup restored on any failure.

Why: online, slapd spends most of a first import in per-operation work (one write transaction,
its page writes, a thread hand-off per entry) that ``slapadd -q`` batches; a 100 000-person first
import is several times slower through ``ldapmodify`` than the same entries through ``slapadd``.
``slapadd`` runs no overlay, so the memberOf values the memberof overlay would have written are
computed here (``slapadd`` stores them as given); refint has nothing to do on adds, and ``-w``
writes the syncprov contextCSN so that replicas see the new state.

Safety: slapd is stopped first (so that no write lands between the backup and the load), the
whole database is exported with ``slapcat`` into a file on the controller, and any failure of
the load or of the restart empties the database, loads the backup back and starts slapd, then
raises :class:`BulkLoadFailed` saying what failed and that the directory was restored.
"""

from __future__ import annotations

import base64
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import ldif
from .transport import Transport, TransportError

Progress = Callable[[str], None]
# The memberof overlay's attribute (roles/directory: olcMemberOfMemberOfAD).
MEMBER_OF = "memberOf"
_ADD = "changetype: add\n"


class BulkLoadFailed(UserError):
    """The offline load failed; the message says whether the directory was restored."""


@dataclass
class BulkTarget:
    """How to take the directory's database offline and load it.

    ``stop`` and ``start`` stop and start slapd (and return once it is stopped or started);
    ``slapcat``, ``slapadd`` and the removal of the database files run through ``transport`` on
    the directory host, behind ``run_as`` (the user slapd runs as must own what they write).
    """

    transport: Transport
    stop: Callable[[], None]
    start: Callable[[], None]
    config_dir: str = "/etc/ldap/slapd.d"
    run_as: tuple[str, ...] = ()
    sbin: str = "/usr/sbin"
    name: str = field(default="")

    def describe(self) -> str:
        return self.name or self.transport.describe()


def for_host(transport: Transport) -> BulkTarget:
    """The target of a farm's directory host (roles/directory): the slapd systemd unit, cn=config
    in /etc/ldap/slapd.d, the database owned by openldap (slapd runs with -u openldap)."""

    def systemctl(action: str) -> Callable[[], None]:
        def run() -> None:
            transport.run(["systemctl", action, "slapd"])
        return run

    return BulkTarget(transport, stop=systemctl("stop"), start=systemctl("start"),
                      run_as=("runuser", "-u", "openldap", "--"),
                      name=f"slapd on {transport.describe()}")


@dataclass
class BulkReport:
    backup: Path
    loaded: int
    online: list[str]  # the change records left to ldapmodify, in their order
    timings: dict[str, float]


def dn_of(part: str) -> str:
    """The DN of one LDIF change record (its first line)."""
    first = part[:part.index("\n")]
    if first.startswith("dn:: "):
        return base64.b64decode(first[5:]).decode("utf-8")
    return first[4:] if first.startswith("dn: ") else first[3:].lstrip()


def is_add(part: str) -> bool:
    return part.startswith(_ADD, part.index("\n") + 1)


@dataclass
class Plan:
    """What a bulk load writes offline and what it leaves to ldapmodify."""

    parts: list[str]
    load: list[int]  # indices in ``parts`` of the adds that slapadd loads, in order
    member_of: dict[str, list[str]]  # lower-case DN of a loaded entry -> group DNs
    online: list[str]  # change records left to ldapmodify afterwards, in their order

    def records(self) -> Iterator[str]:
        """The slapadd records: the adds without their changetype line, with memberOf."""
        for i in self.load:
            part = self.parts[i]
            yield offline_record(part, self.member_of.get(dn_of(part).lower(), ()))


def offline_record(part: str, member_of: Iterable[str] = (), uuid: str | None = None) -> str:
    """The slapadd record of an add change record: without its changetype line, with the
    memberOf values the overlay would have written, and ``uuid`` as its entryUUID if given
    (slapadd makes one otherwise; the importer gives it to keep the persons' state it loads,
    entfarm.aaf.people_state)."""
    start = part.index("\n") + 1
    record = part[:start] + part[start + len(_ADD):]
    extra = "".join(ldif.line(MEMBER_OF, g) for g in member_of)
    if uuid is not None:
        extra += ldif.line("entryUUID", uuid)
    return record[:-1] + extra + "\n" if extra else record


def plan(parts: list[str], base: str) -> Plan:
    """Split a change set into its adds, loaded offline with the memberOf values the overlay
    would have written, and the records left to ldapmodify afterwards.

    A group added whose members are not all added in the same load stays online: the overlay
    then writes memberOf on the members that were already there.
    """
    groups_suffix = f",ou=groups,{base}".lower()
    adds = [(i, dn_of(p).lower()) for i, p in enumerate(parts) if is_add(p)]
    loaded = {dn for _i, dn in adds}
    member_of: dict[str, list[str]] = {}
    online_groups: set[int] = set()
    for i, dn in adds:
        if not dn.endswith(groups_suffix):
            continue
        entry = next(iter(ldif.parse(parts[i].encode("utf-8"), ("member",)).items()))
        members = entry[1].get("member", [])
        if all(m.lower() in loaded for m in members):
            for m in members:
                member_of.setdefault(m.lower(), []).append(entry[0])
        else:
            online_groups.add(i)
    load = [i for i, _dn in adds if i not in online_groups]
    as_add = set(load)
    online = [p for i, p in enumerate(parts) if i not in as_add]
    return Plan(parts, load, member_of, online)


def _database_directory(transport: Transport, base: str) -> str:
    """olcDbDirectory of the database holding ``base``, read from cn=config over ldapi."""
    out = transport.run(["ldapsearch", "-LLL", "-Q", "-Y", "EXTERNAL", "-H", transport.uri,
                         "-o", "ldif-wrap=no", "-b", "cn=config", "-s", "one",
                         "(olcSuffix=*)", "olcSuffix", "olcDbDirectory"], ok=(0, 32))
    wanted = _dn_key(base)
    best: tuple[int, str] | None = None
    for entry in ldif.parse(out, ("olcSuffix", "olcDbDirectory")).values():
        for suffix in entry.get("olcSuffix", []):
            key = _dn_key(suffix)
            if (wanted == key or wanted.endswith("," + key)) and entry.get("olcDbDirectory"):
                if best is None or len(key) > best[0]:
                    best = (len(key), entry["olcDbDirectory"][0])
    if best is None:
        raise BulkLoadFailed(
            f"bulk load not started: no database of slapd on {transport.describe()} holds "
            f"{base} (searched cn=config for olcSuffix and olcDbDirectory); nothing was "
            "changed. Check the base DN in farm.yml, or import with --online")
    return best[1]


def _dn_key(dn: str) -> str:
    return ",".join(rdn.strip() for rdn in dn.lower().split(","))


def _write_backup(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # password hashes inside
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _wait_ready(transport: Transport, base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            transport.run(["ldapsearch", "-LLL", "-Q", "-Y", "EXTERNAL", "-H", transport.uri,
                           "-s", "base", "-b", base, "1.1"], ok=(0, 32))
            return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class _Offline:
    """slapd stopped and the database backed up: what a load, or its restoration, needs."""

    target: BulkTarget
    base: str
    db_dir: str
    slapadd: list[str]
    backup: Path
    entries: int  # in the backup
    progress: Progress
    timings: dict[str, float]

    def fail(self, step: str, exc: BaseException) -> BulkLoadFailed:
        """Restore the backup after ``step`` failed; the error to raise, saying so."""
        what = str(exc) or type(exc).__name__
        _restore(self.target, self.base, self.db_dir, self.slapadd, self.backup, self.entries,
                 self.progress, f"{step}: {what}")
        return BulkLoadFailed(
            f"bulk load failed ({step}): {what}\nThe directory was restored from the backup "
            f"taken before the load ({self.backup}, {self.entries} entries) and "
            f"{self.target.describe()} was started again; nothing of this import was written. "
            "Fix the cause, or import with --online")

    def start_slapd(self) -> None:
        t2 = time.monotonic()
        _settle(self.target, self.db_dir)
        self.timings["bulk settle"] = time.monotonic() - t2
        self.progress(f"bulk load: starting {self.target.describe()}")
        t2 = time.monotonic()
        self.target.start()
        _wait_ready(self.target.transport, self.base)
        self.timings["bulk start"] = time.monotonic() - t2


def _settle(target: BulkTarget, db_dir: str) -> None:
    """Make what slapadd wrote durable, then drop the database file from the page cache.

    ``slapadd -q`` does not sync, so without the first step a crash soon after the load could
    lose part of it under a running slapd. The second matters for every write afterwards: recent
    kernels keep what slapadd wrote in large page-cache folios, and each of slapd's later commits
    dirties 4 KiB pages of such folios, which the kernel then writes back whole at every
    fdatasync (a profile of slapd showed 60 % of its time in ext4's buffered write and
    writeback of those). Measured on the lab (kernel 6.18, ext4): the 3 700 commits of a 1 %
    Delta took 7-12 s after a load and 2.0-2.5 s once the file had been dropped from the cache;
    slapd maps it back page by page as it reads."""
    data = f"{db_dir}/data.mdb"
    target.transport.run([*target.run_as, "sh", "-c",
                          'sync "$1" && dd if="$1" iflag=nocache count=0 status=none', "sh",
                          data])


def _go_offline(base: str, target: BulkTarget, backup_dir: Path, stamp: str,
                progress: Progress) -> _Offline:
    """Stop slapd and back the database up (slapd started again if that fails)."""
    t = target.transport
    db_dir = _database_directory(t, base)
    sbin = target.sbin
    slapcat = [*target.run_as, f"{sbin}/slapcat", "-F", target.config_dir, "-b", base]
    slapadd = [*target.run_as, f"{sbin}/slapadd", "-q", "-w", "-F", target.config_dir,
               "-b", base]
    backup = backup_dir / f"slapcat-{stamp}.ldif"
    n = 1
    while backup.exists():  # an earlier import with the same time stamp: keep its backup
        backup = backup_dir / f"slapcat-{stamp}-{n}.ldif"
        n += 1
    where = target.describe()

    t0 = time.monotonic()
    progress(f"bulk load: stopping {where}")
    try:
        target.stop()
    except UserError as exc:
        raise BulkLoadFailed(f"bulk load not started: stopping {where} failed: {exc}; nothing "
                             "was changed (check slapd, or import with --online)") from exc
    progress(f"bulk load: backing up the database (slapcat) to {backup}")
    try:
        data = t.run(slapcat)
        _write_backup(backup, data)
    except Exception as exc:
        _start_or_say(target, base, f"bulk load not started: the slapcat backup failed: {exc}")
        raise BulkLoadFailed(f"bulk load not started: the slapcat backup failed: {exc}; "
                             f"nothing was changed and {where} was started again") from exc
    entries = data.count(b"\ndn: ") + data.count(b"\ndn:: ") + data.startswith(b"dn")
    del data
    return _Offline(target, base, db_dir, slapadd, backup, entries, progress,
                    {"bulk backup": time.monotonic() - t0})


def load(parts: list[str], base: str, target: BulkTarget, backup_dir: Path, *,
         stamp: str, progress: Progress = lambda _line: None) -> BulkReport:
    """Load the adds of ``parts`` offline; return the other records, for ldapmodify."""
    todo = plan(parts, base)
    off = _go_offline(base, target, backup_dir, stamp, progress)
    t1 = time.monotonic()
    step = "slapadd"
    try:
        progress(f"bulk load: slapadd of {len(todo.load)} entries (offline, -q)")
        target.transport.run(off.slapadd,
                             stdin=b"".join(r.encode("utf-8") for r in todo.records()))
        off.timings["bulk slapadd"] = time.monotonic() - t1
        step = "starting slapd"
        off.start_slapd()
    except BaseException as exc:
        # Whatever stopped the load (a tool, a start that does not come up, an interrupt), the
        # database may be half loaded and slapd down: restore before anything else.
        raise off.fail(step, exc) from exc
    return BulkReport(off.backup, len(todo.load), todo.online, off.timings)


class StreamingLoad:
    """A first import's bulk load fed while its change set is being computed, so that slapadd
    writes entries while the next ones are built (two cores, instead of one after the other).

    Only for a base without persons, where every group added has only members added by the same
    load (so their memberOf values are known when each person is fed). The caller feeds every
    change record in order: :meth:`add` for the persons, with the memberOf values the overlay
    would write, :meth:`feed` for the others (adds loaded as they are, the rest kept for
    ldapmodify afterwards). Then
    :meth:`finish`, or :meth:`abandon` when computing failed: the backup is restored either way
    if anything went wrong.
    """

    _BATCH = 2000  # records per write to slapadd's input

    def __init__(self, base: str, target: BulkTarget, backup_dir: Path, *, stamp: str,
                 people: int, progress: Progress = lambda _line: None):
        self._off = _go_offline(base, target, backup_dir, stamp, progress)
        self.online: list[str] = []
        self.loaded = 0
        self._batch: list[str] = []
        self._t1 = time.monotonic()
        progress(f"bulk load: slapadd of {people} persons and the structures and groups added "
                 "with them (offline, -q), fed as their entries are built")
        try:
            self._running = target.transport.start(self._off.slapadd)
        except BaseException as exc:
            raise self._off.fail("slapadd", exc) from exc
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._write_error: OSError | None = None
        self._writer = threading.Thread(target=self._write, name="slapadd-input", daemon=True)
        self._writer.start()
        self.ended = False  # finish() or abandon() ran: the directory is online again

    def add(self, part: str, member_of: Iterable[str] = (), uuid: str | None = None) -> None:
        self._batch.append(offline_record(part, member_of, uuid))
        self.loaded += 1
        if len(self._batch) >= self._BATCH:
            self._flush()

    def keep_online(self, part: str) -> None:
        self.online.append(part)

    def feed(self, part: str) -> None:
        """An add without memberOf to load, any other record to keep for ldapmodify."""
        if is_add(part):
            self.add(part)
        else:
            self.keep_online(part)

    def _flush(self) -> None:
        if self._batch:
            self._queue.put("".join(self._batch).encode("utf-8"))
            self._batch = []

    def _write(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._write_error is None:
                try:
                    self._running.stdin.write(chunk)
                except OSError as exc:  # slapadd stopped reading: its exit status says why
                    self._write_error = exc

    def _end_input(self) -> None:
        self._flush()
        self._queue.put(None)
        self._writer.join()

    def finish(self) -> BulkReport:
        self.ended = True
        step = "slapadd"
        try:
            self._end_input()
            self._running.wait()
            if self._write_error is not None:
                raise self._write_error
            self._off.timings["bulk slapadd"] = time.monotonic() - self._t1
            step = "starting slapd"
            self._off.start_slapd()
        except BaseException as exc:
            raise self._off.fail(step, exc) from exc
        return BulkReport(self._off.backup, self.loaded, self.online, self._off.timings)

    def abandon(self, why: BaseException) -> BulkLoadFailed:
        """Computing the change set failed after the load began: end slapadd's input, wait
        for it, restore the backup; the error to raise."""
        self.ended = True
        self._queue.put(None)
        self._writer.join()
        self._running.abandon()
        return self._off.fail("computing the change set", why)


def _start_or_say(target: BulkTarget, base: str, why: str) -> None:
    try:
        target.start()
        _wait_ready(target.transport, base)
    except Exception as exc:
        raise BulkLoadFailed(f"{why}; starting {target.describe()} again failed too: {exc}. "
                             "Start slapd by hand (systemctl start slapd)") from exc


def _restore(target: BulkTarget, base: str, db_dir: str, slapadd: list[str], backup: Path,
             entries: int, progress: Progress, why: str) -> None:
    t = target.transport
    progress(f"bulk load failed ({why.splitlines()[0][:200]}); restoring the backup")
    try:
        try:
            target.stop()  # in case the failure came after slapd started
        except Exception:  # already stopped; otherwise the steps below fail and say so
            pass
        t.run([*target.run_as, "rm", "-f", f"{db_dir}/data.mdb", f"{db_dir}/lock.mdb"])
        t.run(slapadd, stdin=backup.read_bytes())
        _settle(target, db_dir)
        target.start()
        _wait_ready(t, base)
    except Exception as exc:
        raise BulkLoadFailed(
            f"bulk load failed ({why}), and restoring the directory failed too: {exc}.\n"
            f"The backup taken before the load is {backup} ({entries} entries). Restore it "
            f"on {target.describe()}: stop slapd, remove {db_dir}/data.mdb and lock.mdb, "
            f"run `{' '.join(slapadd)} -l <backup>` as slapd's user, start slapd") from exc
    progress(f"bulk load: directory restored from {backup}")
