"""Apply, resume and roll back a wave: preflight, canary, batches, gates, threshold, ledger.

The rules (docs/operations.md, "Waves"):

- Preflight first (the central services' verify suites and each step's own check); if any
  fails, the run stops before any change.
- Batches: the canary batch (``wave.canary`` établissements, the first of the wave in farm.yml
  order) when nothing of the wave is live yet, then batches of ``batch_size``. Each batch is
  marked onboarding, its steps applied, then every établissement of it passes its gates before
  the next batch starts.
- Live needs every gate not failed and at least one passed; "not verifiable" and "skipped" are
  recorded as such and never count as passed.
- Stop: after a batch, when any canary failed, or when the établissements of the wave in
  status failed exceed ``wave.failure_threshold`` of the wave's size in farm.yml
  (``failed / size > threshold``: 0.25 of 4 tolerates one failure; 0 tolerates none).
- ``apply`` onboards the planned établissements; it refuses when some are failed or were
  interrupted (that is ``resume``'s job, after a fix). When nothing is left to onboard, it
  re-runs the gates of the live ones (read-only, recorded as "reverify") and changes nothing.
- ``resume`` retries the failed and interrupted ones, then the planned ones; live and rolled
  back établissements are left alone (name a rolled-back one with ``only`` to re-onboard it).
- An exception inside a step or gate fails that établissement; an interruption (Ctrl-C, kill)
  leaves it onboarding, which the next ``resume`` records as failed ("interrupted") and retries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserError
from ..model import Etablissement, Farm, Wave
from .ledger import FAILED, LIVE, ONBOARDING, PLANNED, ROLLED_BACK, Ledger, now_iso
from .plan import batch_size_for, make_batches, wave_of
from .steps import FAILED_GATE, NOT_BUILT, PASSED, SKIPPED, Evidence, Step


class WaveStopped(Exception):
    """Internal: the threshold or a canary stopped the wave."""


@dataclass(frozen=True)
class ProgressEvent:
    """What the engine is doing, for live rendering ("batch 2/5 · 0450022E · gate: CAS logins")."""

    phase: str  # preflight, batch, step, gate, etab, stop, done
    batch: int = 0
    batches: int = 0
    uai: str | None = None
    what: str = ""
    outcome: str | None = None

    def line(self) -> str:
        parts = []
        if self.batches:
            parts.append(f"batch {self.batch}/{self.batches}")
        if self.uai:
            parts.append(self.uai)
        parts.append(self.what + (f": {self.outcome}" if self.outcome else ""))
        return " · ".join(parts)


Progress = Callable[[ProgressEvent], None]


@dataclass
class WaveResult:
    wave: str
    command: str
    run_id: int
    outcome: str  # completed, stopped, preflight_failed, nothing_to_do, reverified
    reason: str
    batches: list[list[str]] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # UAI -> why
    skipped: list[str] = field(default_factory=list)  # already live, left alone
    not_reached: list[str] = field(default_factory=list)  # after a stop
    preflight: list[dict[str, Any]] = field(default_factory=list)
    reverify: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("completed", "nothing_to_do", "reverified") and not self.failed

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir) if self.run_dir else None
        return data


@dataclass
class RollbackResult:
    uai: str
    run_id: int
    actions: list[dict[str, Any]]
    previous: str


class Engine:
    """Runs waves of one farm against its ledger, with the given steps."""

    def __init__(self, farm: Farm, ledger: Ledger, steps: Sequence[Step], *,
                 preflight: Callable[[], list[Evidence]] = lambda: [],
                 versions: Callable[[], dict[str, Any]] = lambda: {},
                 progress: Progress = lambda _event: None,
                 run_dir: Path | None = None):
        self.farm = farm
        self.ledger = ledger
        self.steps = list(steps)
        self.central_preflight = preflight
        self.collect_versions = versions
        self.progress = progress
        self.run_dir = run_dir
        self._log: TextIO | None = None

    # -- public -------------------------------------------------------------------------------
    def apply(self, wave_id: str, *, batch_size: int | None = None,
              resume: bool = False, only: Sequence[str] = ()) -> WaveResult:
        wave = wave_of(self.farm, wave_id)
        etabs = self.farm.etablissements_of_wave(wave.id)
        if only:
            unknown = sorted(set(only) - {e.uai for e in etabs})
            if unknown:
                raise UserError(f"not in wave {wave.id}: {', '.join(unknown)}")
            etabs = [e for e in etabs if e.uai in set(only)]
        statuses = {e.uai: self.ledger.status(e.uai) for e in etabs}
        stale = [e for e in etabs if statuses[e.uai] in (FAILED, ONBOARDING)]
        command = "resume" if resume else "apply"
        if not resume and stale:
            raise UserError(
                f"wave {wave.id} has {len(stale)} établissement(s) failed or interrupted "
                f"({', '.join(e.uai for e in stale)}): fix the cause, then "
                f"`entfarm wave resume {wave.id}`")
        wanted = {PLANNED, FAILED, ONBOARDING} if resume else {PLANNED}
        if only:
            wanted.add(ROLLED_BACK)  # re-onboarding is asked by name only
        pending = [e for e in etabs if statuses[e.uai] in wanted]
        # Retried ones first: they were due before the planned ones.
        pending.sort(key=lambda e: statuses[e.uai] == PLANNED)
        already = [e.uai for e in etabs if statuses[e.uai] == LIVE]
        options = {"batch_size": batch_size, "only": list(only)}
        with self.ledger.exclusive():
            run_id = self.ledger.start_run(wave.id, command if pending else "reverify", options)
            result = WaveResult(wave.id, command, run_id, "running", "", skipped=already,
                                run_dir=self.run_dir)
            try:
                self._open_log()
                if not pending:
                    self._reverify(wave, [e for e in etabs if statuses[e.uai] == LIVE], result)
                else:
                    self._run(wave, pending, statuses, batch_size, result)
            except BaseException as exc:
                outcome = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
                result.outcome, result.reason = outcome, f"{type(exc).__name__}: {exc}"
                self.ledger.finish_run(run_id, outcome, result.summary())
                self._close_log(result)
                raise
            self.ledger.finish_run(run_id, result.outcome, result.summary())
            self._close_log(result)
        return result

    def rollback(self, uai: str, reason: str = "") -> RollbackResult:
        etab = next((e for e in self.farm.spec.etablissements if e.uai == uai), None)
        if etab is None:
            raise UserError(f"no établissement {uai} in {self.farm.file}")
        row = self.ledger.row(uai)
        status = row.status if row else PLANNED
        if status not in (LIVE, FAILED):
            raise UserError(f"{uai} is {status}: only a live or failed établissement can be "
                            "rolled back")
        wave = row.wave if row else etab.wave
        with self.ledger.exclusive():
            run_id = self.ledger.start_run(wave, "rollback", {"uai": uai, "reason": reason})
            actions: list[dict[str, Any]] = []
            try:
                for step in reversed(self.steps):
                    if not step.applicable(etab):
                        actions.append({"step": step.name, "outcome": SKIPPED,
                                        "detail": step.skip_reason(etab)})
                    elif not step.built:
                        actions.append({"step": step.name, "outcome": "not_built",
                                        "detail": "nothing was applied: step not built yet"})
                    else:
                        self._emit(ProgressEvent("step", uai=uai, what=f"disable {step.name}"))
                        actions.append({"step": step.name, "outcome": "disabled",
                                        "detail": step.disable(etab)})
                    self.ledger.record("step", run_id=run_id, wave=wave, uai=uai,
                                       name=f"disable {step.name}",
                                       outcome=actions[-1]["outcome"],
                                       detail=actions[-1]["detail"])
            except BaseException as exc:
                # The status stays as it was: the établissement is not known to be out.
                self.ledger.finish_run(run_id, "failed", {"uai": uai, "error": str(exc),
                                                          "actions": actions})
                raise
            self.ledger.transition(uai, wave, ROLLED_BACK, run_id=run_id,
                                   detail=reason or "rolled back", evidence=actions)
            self.ledger.finish_run(run_id, "completed", {"uai": uai, "actions": actions})
        return RollbackResult(uai, run_id, actions, status)

    # -- one run ------------------------------------------------------------------------------
    def _run(self, wave: Wave, pending: list[Etablissement], statuses: dict[str, str],
             batch_size: int | None, result: WaveResult) -> None:
        run_id = result.run_id
        self._emit(ProgressEvent("preflight", what="preflight"))
        checks = list(self.central_preflight())
        for step in self.steps:
            evidence = step.preflight()
            if evidence is not None:
                checks.append(evidence)
        result.preflight = [c.as_dict() for c in checks]
        for c in checks:
            self.ledger.record("preflight", run_id=run_id, wave=wave.id, name=c.gate,
                               outcome=c.outcome, detail=c.detail, evidence=c.data)
        bad = [c for c in checks if c.outcome == FAILED_GATE]
        if bad:
            result.outcome = "preflight_failed"
            result.reason = "; ".join(f"{c.gate}: {c.detail}" for c in bad)
            result.not_reached = [e.uai for e in pending]
            self._emit(ProgressEvent("stop", what="preflight failed", outcome=result.reason))
            return
        versions = self.collect_versions()
        self.ledger.set_run_versions(run_id, versions)

        # Établissements left onboarding by an interrupted run: recorded as such, then retried.
        for e in pending:
            if statuses[e.uai] == ONBOARDING:
                self.ledger.transition(e.uai, wave.id, FAILED, run_id=run_id,
                                       error="interrupted", detail="interrupted: retried")
        any_live = any(self.ledger.status(e.uai) == LIVE
                       for e in self.farm.etablissements_of_wave(wave.id))
        canary = 0 if any_live else wave.canary
        batches = make_batches(pending, canary, batch_size_for(wave, batch_size))
        result.batches = [[e.uai for e in b] for b in batches]
        size = len(self.farm.etablissements_of_wave(wave.id))
        for index, batch in enumerate(batches, 1):
            self._batch(wave, batch, index, len(batches), versions, result)
            failed_now = sum(1 for e in self.farm.etablissements_of_wave(wave.id)
                             if self.ledger.status(e.uai) == FAILED)
            reason = None
            if index == 1 and canary and any(e.uai in result.failed for e in batch):
                reason = f"canary failed ({', '.join(u for u in result.failed)})"
            elif size and failed_now / size > wave.failure_threshold:
                reason = (f"{failed_now} of {size} établissements failed "
                          f"({failed_now / size:.0%}), more than the threshold "
                          f"{wave.failure_threshold:.0%}")
            if reason:
                result.outcome, result.reason = "stopped", reason
                result.not_reached = [e.uai for b in batches[index:] for e in b]
                self.ledger.record("note", run_id=run_id, wave=wave.id, name="stop",
                                   detail=reason)
                self._emit(ProgressEvent("stop", index, len(batches), what="stopped",
                                         outcome=reason))
                return
        result.outcome = "completed"
        result.reason = (f"{len(result.live)} live, {len(result.failed)} failed"
                         if result.failed else f"{len(result.live)} live")
        self._emit(ProgressEvent("done", what="wave done", outcome=result.reason))

    def _batch(self, wave: Wave, batch: list[Etablissement], index: int, count: int,
               versions: dict[str, Any], result: WaveResult) -> None:
        run_id = result.run_id
        for e in batch:
            self.ledger.transition(e.uai, wave.id, ONBOARDING, run_id=run_id,
                                   detail=f"batch {index}/{count}")
        alive = list(batch)
        errors: dict[str, str] = {}
        for step in self.steps:
            todo: list[Etablissement] = []
            for e in alive:
                note: str | None = None
                outcome = "to_apply"
                if not step.applicable(e):
                    outcome, note = SKIPPED, step.skip_reason(e)
                elif not step.built:
                    outcome, note = "not_built", "step not built yet: nothing applied"
                else:
                    try:
                        if step.check(e):
                            outcome, note = "already_done", "already in place"
                    except Exception as exc:
                        errors[e.uai] = f"{step.name} check: {exc}"
                        outcome, note = "failed", str(exc)
                if outcome == "to_apply":
                    todo.append(e)
                else:
                    self.ledger.record("step", run_id=run_id, wave=wave.id, uai=e.uai,
                                       name=step.name, outcome=outcome, detail=note)
            if todo:
                self._emit(ProgressEvent("step", index, count,
                                         uai=todo[0].uai if len(todo) == 1 else None,
                                         what=f"step: {step.name} ({len(todo)})"))
                try:
                    failures = step.apply_batch(todo)
                except Exception as exc:
                    failures = {e.uai: exc for e in todo}
                for e in todo:
                    exc_ = failures.get(e.uai)
                    if exc_ is not None:
                        errors[e.uai] = f"{step.name}: {exc_}"
                    self.ledger.record("step", run_id=run_id, wave=wave.id, uai=e.uai,
                                       name=step.name,
                                       outcome="failed" if exc_ is not None else "applied",
                                       detail=str(exc_) if exc_ is not None else None)
            alive = [e for e in alive if e.uai not in errors]
        for e in batch:
            if e.uai in errors:
                self._fail(wave, e, errors[e.uai], [], run_id, result, index, count)
                continue
            evidence = self._gates(wave, e, index, count, run_id)
            failed = [ev for ev in evidence if ev["outcome"] == FAILED_GATE]
            if failed:
                why = "; ".join(f"{ev['gate']}: {ev['detail']}" for ev in failed)
                self._fail(wave, e, why, evidence, run_id, result, index, count)
            elif not any(ev["outcome"] == PASSED for ev in evidence):
                self._fail(wave, e, "no gate passed (nothing could be verified)", evidence,
                           run_id, result, index, count)
            else:
                self.ledger.transition(e.uai, wave.id, LIVE, run_id=run_id, evidence=evidence,
                                       versions=versions)
                result.live.append(e.uai)
                self._emit(ProgressEvent("etab", index, count, e.uai, "live"))

    def _gates(self, wave: Wave, e: Etablissement, index: int, count: int,
               run_id: int) -> list[dict[str, Any]]:
        evidence: list[dict[str, Any]] = []
        for step in self.steps:
            if not step.applicable(e):
                ev = Evidence(step.gate, SKIPPED, step.skip_reason(e))
            else:
                self._emit(ProgressEvent("gate", index, count, e.uai, f"gate: {step.gate}"))
                try:
                    ev = step.verify(e)
                except Exception as exc:  # a gate that crashes proves nothing: failed
                    ev = Evidence(step.gate, FAILED_GATE, f"error: {type(exc).__name__}: {exc}")
                if not step.built and ev.outcome == PASSED:
                    ev = Evidence(step.gate, "not_verifiable", NOT_BUILT)
            self.ledger.record("gate", run_id=run_id, wave=wave.id, uai=e.uai,
                               name=ev.gate, outcome=ev.outcome, detail=ev.detail,
                               evidence=ev.data)
            evidence.append({"step": step.name, **ev.as_dict(), "at": now_iso()})
        return evidence

    def _fail(self, wave: Wave, e: Etablissement, why: str, evidence: list[dict[str, Any]],
              run_id: int, result: WaveResult, index: int, count: int) -> None:
        self.ledger.transition(e.uai, wave.id, FAILED, run_id=run_id, error=why,
                               evidence=evidence or None)
        result.failed[e.uai] = why
        self._emit(ProgressEvent("etab", index, count, e.uai, "failed", why))

    def _reverify(self, wave: Wave, live: list[Etablissement], result: WaveResult) -> None:
        """Nothing to onboard: the gates again, recorded, no status changed."""
        for n, e in enumerate(live, 1):
            result.reverify[e.uai] = self._gates(wave, e, n, len(live), result.run_id)
        bad = {u: [ev for ev in evs if ev["outcome"] == FAILED_GATE]
               for u, evs in result.reverify.items()}
        bad = {u: evs for u, evs in bad.items() if evs}
        result.outcome = "reverified" if live else "nothing_to_do"
        result.reason = (f"nothing to onboard; {len(live)} live établissement(s) re-verified, "
                         f"{len(bad)} with a failed gate (status unchanged)"
                         if live else "nothing to onboard")
        self._emit(ProgressEvent("done", what="wave done", outcome=result.reason))

    # -- progress and the run directory --------------------------------------------------------
    def _emit(self, event: ProgressEvent) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"at": now_iso(), **asdict(event)},
                                       ensure_ascii=False) + "\n")
            self._log.flush()
        self.progress(event)

    def _open_log(self) -> None:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = (self.run_dir / "events.jsonl").open("a", encoding="utf-8")

    def _close_log(self, result: WaveResult) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(
                json.dumps(result.summary(), indent=2, ensure_ascii=False, default=str),
                encoding="utf-8")
