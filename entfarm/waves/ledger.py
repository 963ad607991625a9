"""The wave ledger: ``<state>/waves.sqlite``, what happened to each établissement and the proof.

Three tables (schema version in ``PRAGMA user_version``, see :data:`MIGRATIONS`):

- ``etablissements``: one row per établissement ever onboarded: its status, the wave it was
  onboarded with, the times of each status, the versions deployed and the evidence of its last
  gate run. A CHECK constraint refuses ``live`` without evidence, so no code path (nor a crash
  between two statements) can leave an établissement live without its proof.
- ``events``: append-only (triggers refuse UPDATE and DELETE): every transition, step, gate and
  note, with who, when, which run and the evidence as JSON.
- ``runs``: one row per apply / resume / rollback / re-verification, with its outcome.

Every change of status is one transaction with its event: either both are written or neither.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import runlock
from ..errors import UserError
from ..model import Farm

LEDGER_FILE = "waves.sqlite"
LOCK_FILE = "waves.lock"

PLANNED = "planned"
ONBOARDING = "onboarding"
LIVE = "live"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
STATUSES = (PLANNED, ONBOARDING, LIVE, FAILED, ROLLED_BACK)

# The only changes of status the ledger accepts. failed -> rolled_back is allowed besides the
# issue's list: an établissement that cannot be fixed soon must be taken out like a live one.
TRANSITIONS: dict[str, frozenset[str]] = {
    PLANNED: frozenset({ONBOARDING}),
    ONBOARDING: frozenset({LIVE, FAILED}),
    FAILED: frozenset({ONBOARDING, ROLLED_BACK}),
    LIVE: frozenset({ROLLED_BACK}),
    ROLLED_BACK: frozenset({ONBOARDING}),
}
# Statuses whose accounts the AAF import provisions (a failed établissement keeps what it got,
# so that the next batch's import does not deactivate it), and those it keeps deactivated.
IMPORTED = frozenset({ONBOARDING, LIVE, FAILED})
HELD = frozenset({ROLLED_BACK})

_SCHEMA_V1 = """
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    wave        TEXT NOT NULL,
    command     TEXT NOT NULL,             -- apply, resume, reverify, rollback
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    outcome     TEXT NOT NULL,             -- running, completed, stopped, preflight_failed,
                                           -- interrupted, crashed
    actor       TEXT NOT NULL,             -- user@host
    options     TEXT NOT NULL DEFAULT '{}',
    versions    TEXT NOT NULL DEFAULT '{}',
    summary     TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE etablissements (
    uai            TEXT PRIMARY KEY,
    wave           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN
                       ('planned', 'onboarding', 'live', 'failed', 'rolled_back')),
    updated_at     TEXT NOT NULL,
    onboarding_at  TEXT,
    live_at        TEXT,
    failed_at      TEXT,
    rolled_back_at TEXT,
    run_id         INTEGER REFERENCES runs(id),
    versions       TEXT,
    evidence       TEXT,
    error          TEXT,
    CHECK (status != 'live' OR (evidence IS NOT NULL AND live_at IS NOT NULL))
);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    run_id      INTEGER REFERENCES runs(id),
    wave        TEXT,
    uai         TEXT,
    kind        TEXT NOT NULL,             -- transition, step, gate, preflight, note
    name        TEXT,                      -- step or gate name
    from_status TEXT,
    to_status   TEXT,
    outcome     TEXT,                      -- passed, failed, not_verifiable, applied, skipped …
    detail      TEXT,
    evidence    TEXT,
    actor       TEXT NOT NULL
);
CREATE INDEX events_uai ON events(uai, id);
CREATE INDEX events_wave ON events(wave, id);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"""


def _script(db: sqlite3.Connection, sql: str) -> None:
    """Run statements one by one: executescript would COMMIT the migration's transaction."""
    statement = ""
    for line in sql.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""


def _migrate_to_1(db: sqlite3.Connection) -> None:
    _script(db, _SCHEMA_V1)


# MIGRATIONS[n] takes a ledger from version n to n + 1. A new schema version appends a function
# here; opening an older ledger applies the missing ones in order, each in its transaction.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1]
SCHEMA_VERSION = len(MIGRATIONS)


class LedgerError(UserError):
    """The ledger cannot be used as asked (newer schema, locked, unknown établissement)."""


class InvalidTransition(LedgerError):
    """A change of status the ledger does not allow (e.g. planned -> live)."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Row:
    """One établissement as the ledger knows it."""

    uai: str
    wave: str
    status: str
    updated_at: str
    onboarding_at: str | None
    live_at: str | None
    failed_at: str | None
    rolled_back_at: str | None
    run_id: int | None
    versions: dict[str, Any]
    evidence: list[dict[str, Any]]
    error: str | None


def ledger_path(farm: Farm) -> Path:
    return farm.state_dir / LEDGER_FILE


class Ledger:
    """The ledger of one farm. ``Ledger.open(farm)`` creates or migrates it."""

    def __init__(self, path: Path, who: str | None = None):
        self.path = path
        self.actor = who or actor()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) by _tx.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = FULL")
        self._migrate()

    @classmethod
    def open(cls, farm: Farm, who: str | None = None) -> Ledger:
        return cls(ledger_path(farm), who)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.version
        if current > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema version {current} was written by a newer entfarm "
                f"(this one knows up to {SCHEMA_VERSION}); upgrade entfarm")
        for target in range(current + 1, SCHEMA_VERSION + 1):
            with self._tx():
                MIGRATIONS[target - 1](self.db)
                self.db.execute(f"PRAGMA user_version = {target}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading --------------------------------------------------------------------------
    def row(self, uai: str) -> Row | None:
        found = self.db.execute("SELECT * FROM etablissements WHERE uai = ?", (uai,)).fetchone()
        return None if found is None else _row(found)

    def rows(self, wave: str | None = None) -> dict[str, Row]:
        if wave is None:
            cur = self.db.execute("SELECT * FROM etablissements ORDER BY uai")
        else:
            cur = self.db.execute("SELECT * FROM etablissements WHERE wave = ? ORDER BY uai",
                                  (wave,))
        return {r["uai"]: _row(r) for r in cur}

    def status(self, uai: str) -> str:
        row = self.row(uai)
        return PLANNED if row is None else row.status

    def statuses(self) -> dict[str, str]:
        return {r["uai"]: r["status"]
                for r in self.db.execute("SELECT uai, status FROM etablissements")}

    def events(self, *, uai: str | None = None, wave: str | None = None,
               run_id: int | None = None) -> list[dict[str, Any]]:
        clauses, args = [], []
        for column, value in (("uai", uai), ("wave", wave), ("run_id", run_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        out = []
        for r in self.db.execute(f"SELECT * FROM events{where} ORDER BY id", args):
            event = dict(r)
            event["evidence"] = json.loads(event["evidence"]) if event["evidence"] else None
            out.append(event)
        return out

    def runs(self, wave: str | None = None) -> list[dict[str, Any]]:
        cur = (self.db.execute("SELECT * FROM runs ORDER BY id") if wave is None else
               self.db.execute("SELECT * FROM runs WHERE wave = ? ORDER BY id", (wave,)))
        out = []
        for r in cur:
            run = dict(r)
            for key in ("options", "versions", "summary"):
                run[key] = json.loads(run[key] or "{}")
            out.append(run)
        return out

    def scope(self) -> tuple[set[str], set[str]]:
        """(UAIs the AAF import provisions, UAIs it keeps deactivated), from the statuses."""
        statuses = self.statuses()
        return ({u for u, s in statuses.items() if s in IMPORTED},
                {u for u, s in statuses.items() if s in HELD})

    # -- writing --------------------------------------------------------------------------
    def start_run(self, wave: str, command: str, options: dict[str, Any] | None = None) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (wave, command, started_at, outcome, actor, options) "
                "VALUES (?, ?, ?, 'running', ?, ?)",
                (wave, command, now_iso(), self.actor, _json(options or {})))
            run_id = int(cur.lastrowid or 0)
            self._event(db, run_id, wave, None, "note", command, detail=f"{command} started")
        return run_id

    def set_run_versions(self, run_id: int, versions: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET versions = ? WHERE id = ?", (_json(versions), run_id))

    def finish_run(self, run_id: int, outcome: str, summary: dict[str, Any]) -> None:
        with self._tx() as db:
            wave = db.execute("SELECT wave FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            db.execute("UPDATE runs SET finished_at = ?, outcome = ?, summary = ? WHERE id = ?",
                       (now_iso(), outcome, _json(summary), run_id))
            self._event(db, run_id, wave, None, "note", "run", outcome=outcome,
                        detail=f"run {outcome}", evidence=summary)

    def transition(self, uai: str, wave: str, to: str, *, run_id: int | None,
                   evidence: list[dict[str, Any]] | None = None,
                   versions: dict[str, Any] | None = None, error: str | None = None,
                   detail: str | None = None) -> None:
        """Change the status of one établissement, with its event, in one transaction."""
        if to not in STATUSES:
            raise InvalidTransition(f"unknown status {to!r}")
        with self._tx() as db:
            current = db.execute("SELECT status FROM etablissements WHERE uai = ?",
                                 (uai,)).fetchone()
            before = PLANNED if current is None else str(current[0])
            if to not in TRANSITIONS[before]:
                raise InvalidTransition(
                    f"{uai}: {before} -> {to} is not allowed (from {before}: "
                    f"{', '.join(sorted(TRANSITIONS[before])) or 'nothing'})")
            if to == LIVE and not evidence:
                raise InvalidTransition(f"{uai}: live without gate evidence")
            at = now_iso()
            if current is None:
                db.execute("INSERT INTO etablissements (uai, wave, status, updated_at) "
                           "VALUES (?, ?, ?, ?)", (uai, wave, PLANNED, at))
            sets = ["wave = ?", "status = ?", "updated_at = ?", f"{to}_at = ?", "run_id = ?"]
            args: list[Any] = [wave, to, at, at, run_id]
            if to == ONBOARDING:  # a new attempt: the last one's outcome no longer applies
                sets += ["error = NULL", "evidence = NULL"]
            if evidence is not None:
                sets.append("evidence = ?")
                args.append(_json(evidence))
            if versions is not None:
                sets.append("versions = ?")
                args.append(_json(versions))
            if error is not None:
                sets.append("error = ?")
                args.append(error)
            db.execute(f"UPDATE etablissements SET {', '.join(sets)} WHERE uai = ?",
                       (*args, uai))
            self._event(db, run_id, wave, uai, "transition", None, before=before, after=to,
                        detail=detail or error, evidence=evidence)

    def record(self, kind: str, *, run_id: int | None, wave: str | None, uai: str | None = None,
               name: str | None = None, outcome: str | None = None, detail: str | None = None,
               evidence: Any = None) -> None:
        """Append one event (step, gate, preflight, note)."""
        with self._tx() as db:
            self._event(db, run_id, wave, uai, kind, name, outcome=outcome, detail=detail,
                        evidence=evidence)

    def _event(self, db: sqlite3.Connection, run_id: int | None, wave: str | None,
               uai: str | None, kind: str, name: str | None, *, before: str | None = None,
               after: str | None = None, outcome: str | None = None, detail: str | None = None,
               evidence: Any = None) -> None:
        db.execute(
            "INSERT INTO events (at, run_id, wave, uai, kind, name, from_status, to_status, "
            "outcome, detail, evidence, actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now_iso(), run_id, wave, uai, kind, name, before, after, outcome, detail,
             None if evidence is None else _json(evidence), self.actor))

    # -- one run at a time ----------------------------------------------------------------
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the farm's wave lock: two runs at once would race on the same établissements."""
        lock_path = self.path.with_name(LOCK_FILE)
        with runlock.held(lock_path, self.actor, lambda holder: LedgerError(
                f"{lock_path} is held by {holder}: one wave run at a time")):
            yield


def read_scope(farm: Farm) -> tuple[set[str], set[str]] | None:
    """The ledger's AAF scope (see :meth:`Ledger.scope`), None while no établissement was ever
    onboarded (no ledger, or only runs stopped at preflight): then every établissement of
    farm.yml is imported, as before waves."""
    path = ledger_path(farm)
    if not path.is_file():
        return None
    with Ledger(path) as ledger:
        if not ledger.statuses():
            return None
        return ledger.scope()


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _row(r: sqlite3.Row) -> Row:
    return Row(
        uai=r["uai"], wave=r["wave"], status=r["status"], updated_at=r["updated_at"],
        onboarding_at=r["onboarding_at"], live_at=r["live_at"], failed_at=r["failed_at"],
        rolled_back_at=r["rolled_back_at"], run_id=r["run_id"],
        versions=json.loads(r["versions"]) if r["versions"] else {},
        evidence=json.loads(r["evidence"]) if r["evidence"] else [],
        error=r["error"],
    )
