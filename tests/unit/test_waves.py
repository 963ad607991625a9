"""Waves: the ledger's rules, the engine's orchestration (with in-test steps), the plan on the
Loiret example, the SVG timeline, the report, and the ledger-driven AAF import (real slapd)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aaf_conftest import REPO, Slapd, slapd

from entfarm.aaf.generate import generate
from entfarm.aaf.importer import Directory, run_import
from entfarm.aaf.mapping import UNTAGGED
from entfarm.errors import UserError
from entfarm.model import Etablissement, Farm, load_farm
from entfarm.uai import is_valid_uai
from entfarm.waves.engine import Engine, ProgressEvent
from entfarm.waves.ledger import (
    SCHEMA_VERSION,
    InvalidTransition,
    Ledger,
    LedgerError,
    read_scope,
)
from entfarm.waves.plan import make_batches, plan_wave
from entfarm.waves.report import write_report
from entfarm.waves.steps import (
    FAILED_GATE,
    NOT_VERIFIABLE,
    PASSED,
    AppTenantStep,
    DirectoryStep,
    Evidence,
    Step,
    default_steps,
)
from entfarm.waves.timeline import timeline_svg

__all__ = ["slapd"]
LOIRET = REPO / "inventories" / "example-loiret"
LAB = REPO / "inventories" / "lab"


def _farm(tmp_path: Path, source: Path = LOIRET, *edits: tuple[str, str]) -> Farm:
    inv = tmp_path / "inventory"
    inv.mkdir()
    text = (source / "farm.yml").read_text(encoding="utf-8")
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (inv / "farm.yml").write_text(text, encoding="utf-8")
    return load_farm(inv)


class FakeStep(Step):
    """Records what it is asked; fails, crashes or interrupts for the UAIs it is told to."""

    name = "fake"
    title = "Fake"
    gate = "fake gate"

    def __init__(self) -> None:
        self.applied: list[list[str]] = []
        self.disabled: list[str] = []
        self.fail_apply: set[str] = set()
        self.fail_gate: set[str] = set()
        self.crash_gate: set[str] = set()
        self.interrupt_gate: set[str] = set()
        self.verified: list[str] = []

    def plan(self, etab: Etablissement) -> str:
        return "fake"

    def apply_batch(self, etabs: Sequence[Etablissement]) -> dict[str, Exception]:
        self.applied.append([e.uai for e in etabs])
        return {e.uai: RuntimeError("apply broke") for e in etabs if e.uai in self.fail_apply}

    def verify(self, etab: Etablissement) -> Evidence:
        self.verified.append(etab.uai)
        if etab.uai in self.interrupt_gate:
            raise KeyboardInterrupt
        if etab.uai in self.crash_gate:
            raise RuntimeError("gate crashed half-way")
        if etab.uai in self.fail_gate:
            return Evidence(self.gate, "failed", "login refused", {"account": "x"})
        return Evidence(self.gate, PASSED, "ok", {"account": f"eleve.{etab.uai}"})

    def disable(self, etab: Etablissement) -> str:
        self.disabled.append(etab.uai)
        return "disabled"


class NotBuiltStep(Step):
    name = "future"
    title = "Future"
    gate = "future tenant"
    built = False

    def plan(self, etab: Etablissement) -> str:
        return "later"

    def verify(self, etab: Etablissement) -> Evidence:
        return Evidence(self.gate, PASSED, "claims too much")  # must never count


def _engine(farm: Farm, ledger: Ledger, *steps: Step,
            events: list[ProgressEvent] | None = None) -> Engine:
    sink = events if events is not None else []
    return Engine(farm, ledger, list(steps), versions=lambda: {"deployed": {"cas": "2.0"}},
                  progress=sink.append, run_dir=farm.state_dir / "runs" / "test")


def _uais(farm: Farm, wave: str) -> list[str]:
    return [e.uai for e in farm.etablissements_of_wave(wave)]


# -- ledger -------------------------------------------------------------------------------------


def test_ledger_transitions_are_validated(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    with Ledger.open(farm) as ledger:
        assert ledger.version == SCHEMA_VERSION
        run = ledger.start_run("1", "apply")
        with pytest.raises(InvalidTransition):
            ledger.transition("0450008P", "1", "live", run_id=run, evidence=[{"g": 1}])
        ledger.transition("0450008P", "1", "onboarding", run_id=run)
        with pytest.raises(InvalidTransition, match="without gate evidence"):
            ledger.transition("0450008P", "1", "live", run_id=run)
        ledger.transition("0450008P", "1", "failed", run_id=run, error="x")
        ledger.transition("0450008P", "1", "onboarding", run_id=run)
        ledger.transition("0450008P", "1", "live", run_id=run, evidence=[{"gate": "g"}])
        with pytest.raises(InvalidTransition):
            ledger.transition("0450008P", "1", "onboarding", run_id=run)
        ledger.transition("0450008P", "1", "rolled_back", run_id=run)
        ledger.transition("0450008P", "1", "onboarding", run_id=run)
        assert ledger.status("0450008P") == "onboarding"
        kinds = [(e["from_status"], e["to_status"]) for e in ledger.events(uai="0450008P")]
        assert kinds == [("planned", "onboarding"), ("onboarding", "failed"),
                         ("failed", "onboarding"), ("onboarding", "live"),
                         ("live", "rolled_back"), ("rolled_back", "onboarding")]
        # The database itself refuses a live row without evidence, and edits of the log.
        with pytest.raises(sqlite3.IntegrityError):
            ledger.db.execute("UPDATE etablissements SET status = 'live', live_at = 'now', "
                              "evidence = NULL WHERE uai = '0450008P'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            ledger.db.execute("UPDATE events SET detail = 'forged'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            ledger.db.execute("DELETE FROM events")


def test_ledger_from_a_newer_entfarm_is_refused(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    Ledger.open(farm).close()
    db = sqlite3.connect(farm.state_dir / "waves.sqlite")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="newer entfarm"):
        Ledger.open(farm)


def test_one_run_at_a_time(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    with Ledger.open(farm) as a, Ledger.open(farm) as b, a.exclusive():
        with pytest.raises(LedgerError, match="one wave run at a time"), b.exclusive():
            pass


# -- engine -------------------------------------------------------------------------------------


def test_make_batches() -> None:
    assert make_batches(list(range(15)), 2, 5) == [[0, 1], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11],
                                                   [12, 13, 14]]
    assert make_batches(list(range(3)), 0, None) == [[0, 1, 2]]


def test_canary_then_batches_all_live_with_evidence(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    events: list[ProgressEvent] = []
    with Ledger.open(farm) as ledger:
        result = _engine(farm, ledger, step, NotBuiltStep(), events=events).apply("2")
        uais = _uais(farm, "2")
        assert result.outcome == "completed" and result.ok
        assert [len(b) for b in result.batches] == [2, 5, 5, 3]  # canary 2, then default 5
        assert step.applied == result.batches
        assert sorted(result.live) == sorted(uais)
        for uai in uais:
            row = ledger.row(uai)
            assert row is not None and row.status == "live" and row.live_at
            outcomes = {ev["gate"]: ev["outcome"] for ev in row.evidence}
            # A step whose role is not built is never passed, whatever it answers.
            assert outcomes == {"fake gate": PASSED, "future tenant": NOT_VERIFIABLE}
            assert row.versions == {"deployed": {"cas": "2.0"}}
    # Every gate of batch 1 ran before anything of batch 2 was applied.
    order = [(e.phase, e.batch) for e in events if e.phase in ("gate", "step")]
    first_batch2 = order.index(("step", 2))
    assert all(b == 1 for _p, b in order[:first_batch2])
    assert any(e.line() == f"batch 2/4 · {uais[2]} · gate: fake gate" for e in events)
    summary = json.loads((farm.state_dir / "runs" / "test" / "summary.json").read_text())
    assert summary["outcome"] == "completed"


def test_canary_failure_stops_the_wave(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    step.fail_gate = {_uais(farm, "2")[0]}
    with Ledger.open(farm) as ledger:
        result = _engine(farm, ledger, step).apply("2")
        assert result.outcome == "stopped" and "canary" in result.reason
        assert step.applied == [_uais(farm, "2")[:2]]
        assert len(result.not_reached) == 13
        assert ledger.status(_uais(farm, "2")[5]) == "planned"


def test_threshold_stop_then_resume_skips_live(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    uais = _uais(farm, "2")  # 15, canary 2, threshold 0.1: a second failure stops the wave
    step = FakeStep()
    step.fail_gate = {uais[2]}
    step.fail_apply = {uais[3]}
    with Ledger.open(farm) as ledger:
        result = _engine(farm, ledger, step).apply("2")
        assert result.outcome == "stopped"
        assert "2 of 15" in result.reason and "10%" in result.reason
        assert set(result.failed) == {uais[2], uais[3]}
        assert result.not_reached == uais[7:]
        assert ledger.status(uais[3]) == "failed"
        assert "apply broke" in (ledger.row(uais[3]).error or "")  # type: ignore[union-attr]
        # apply refuses to go on: that is resume's job, after a fix.
        with pytest.raises(UserError, match="wave resume 2"):
            _engine(farm, ledger, step).apply("2")
        step.fail_gate, step.fail_apply, step.applied = set(), set(), []
        resumed = _engine(farm, ledger, step).apply("2", resume=True)
        assert resumed.outcome == "completed"
        applied = [u for batch in step.applied for u in batch]
        assert applied[:2] == [uais[2], uais[3]]  # the failed ones first
        assert set(applied) == {uais[2], uais[3], *uais[7:]}  # live ones not redone
        assert [len(b) for b in resumed.batches] == [5, 5]  # a live one exists: no canary
        assert all(ledger.status(u) == "live" for u in uais)


def test_reapply_of_a_finished_wave_changes_nothing(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    with Ledger.open(farm) as ledger:
        _engine(farm, ledger, step).apply("1")
        before = {u: ledger.row(u) for u in _uais(farm, "1")}
        transitions = len([e for e in ledger.events() if e["kind"] == "transition"])
        step.applied = []
        again = _engine(farm, ledger, step).apply("1")
        assert again.outcome == "reverified" and again.ok
        assert step.applied == []
        assert set(again.reverify) == set(_uais(farm, "1"))
        assert {u: ledger.row(u) for u in _uais(farm, "1")} == before
        assert len([e for e in ledger.events() if e["kind"] == "transition"]) == transitions
        assert ledger.runs("1")[-1]["command"] == "reverify"


def test_a_crashing_gate_fails_the_etablissement_never_live(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    uais = _uais(farm, "1")
    step.crash_gate = {uais[1]}
    with Ledger.open(farm) as ledger:
        result = _engine(farm, ledger, step).apply("1")
        assert ledger.status(uais[1]) == "failed"
        assert "gate crashed half-way" in result.failed[uais[1]]
        assert ledger.status(uais[0]) == "live"


def test_an_interrupted_gate_leaves_onboarding_then_resume_retries(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    uais = _uais(farm, "1")
    step.interrupt_gate = {uais[2]}
    with Ledger.open(farm) as ledger:
        with pytest.raises(KeyboardInterrupt):
            _engine(farm, ledger, step).apply("1")
        assert ledger.status(uais[2]) == "onboarding"  # never live
        assert ledger.runs("1")[-1]["outcome"] == "interrupted"
        step.interrupt_gate = set()
        _engine(farm, ledger, step).apply("1", resume=True)
        assert ledger.status(uais[2]) == "live"
        trail = [(e["from_status"], e["to_status"], e["detail"])
                 for e in ledger.events(uai=uais[2]) if e["kind"] == "transition"]
        assert trail[1] == ("onboarding", "failed", "interrupted: retried")
        assert trail[-1][:2] == ("onboarding", "live")


def test_rollback_records_and_changes_the_aaf_scope(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    uais = _uais(farm, "1")
    with Ledger.open(farm) as ledger:
        _engine(farm, ledger, step).apply("1")
        with pytest.raises(UserError, match="planned"):
            _engine(farm, ledger, step).rollback(_uais(farm, "2")[0])
        result = _engine(farm, ledger, step).rollback(uais[0], "parents' complaint")
        assert result.previous == "live" and step.disabled == [uais[0]]
        row = ledger.row(uais[0])
        assert row is not None and row.status == "rolled_back" and row.rolled_back_at
        last = ledger.events(uai=uais[0])[-1]
        assert (last["to_status"], last["detail"]) == ("rolled_back", "parents' complaint")
        assert ledger.runs()[-1]["command"] == "rollback"
        # Resume leaves it out; naming it re-onboards it.
        assert _engine(farm, ledger, step).apply("1", resume=True).outcome == "reverified"
        assert ledger.status(uais[0]) == "rolled_back"
    assert read_scope(farm) == (set(uais[1:]), {uais[0]})
    with Ledger.open(farm) as ledger:
        _engine(farm, ledger, step).apply("1", only=[uais[0]])
        assert ledger.status(uais[0]) == "live"


def test_preflight_failure_stops_before_any_change(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    with Ledger.open(farm) as ledger:
        engine = Engine(farm, ledger, [step], preflight=lambda: [
            Evidence("central services verified", "failed", "cas: 2 failed")])
        result = engine.apply("1")
        assert result.outcome == "preflight_failed" and "cas: 2 failed" in result.reason
        assert step.applied == [] and ledger.rows() == {}


def test_a_wave_with_nothing_verifiable_does_not_go_live(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    with Ledger.open(farm) as ledger:
        result = _engine(farm, ledger, NotBuiltStep()).apply("1")
        assert result.outcome == "stopped"
        assert all(ledger.status(u) != "live" for u in _uais(farm, "1"))


# -- plan, timeline, report -------------------------------------------------------------------


def test_loiret_plans_three_waves_of_valid_uais(tmp_path: Path) -> None:
    farm = load_farm(LOIRET)
    assert [w.id for w in farm.spec.waves] == ["1", "2", "3"]
    assert len(farm.spec.etablissements) == 57
    assert all(is_valid_uai(e.uai) for e in farm.spec.etablissements)
    steps = default_steps(farm, None, lambda: (set(), set()))
    plans = [plan_wave(farm, w.id, steps) for w in farm.spec.waves]
    assert [len(p.rows) for p in plans] == [6, 15, 36]
    assert plans[2].rows[0].batch == "canary" and plans[2].rows[3].batch == "2"
    titles = plans[0].step_titles
    assert titles[:2] == ["Annuaire (AAF)", "Portail"] and "Moodle" in titles
    first = dict(plans[0].rows[0].steps)
    assert first["Moodle"].endswith("playbooks/apps.yml --tags moodle:tenants")
    assert "(idnumber 0450008P)" in first["Moodle"]
    assert first["Etherpad"].startswith("pads «0450008P.<nom>» open to its people")
    assert plans[0].rows[0].school_server == "se-0450008p"
    wave3 = dict(plans[2].rows[0].steps)
    assert wave3["Serveur d'établissement"].startswith("none declared")


def test_plan_says_not_deployed_when_the_service_is_not_placed(tmp_path: Path) -> None:
    farm = _farm(tmp_path, LAB, ("  moodle:\n    hosts: [apps]\n", ""),
                 ("    - id: moodle\n", "    - id: moodle\n      url: https://moodle.example.test/\n"))
    steps = default_steps(farm, None, lambda: (set(), set()))
    row = plan_wave(farm, "1", steps).rows[0]
    assert dict(row.steps)["Moodle"] == "not deployed (no services.moodle in farm.yml)"


def test_timeline_svg_is_well_formed_with_ledger_colours(tmp_path: Path) -> None:
    farm = load_farm(LOIRET)
    uais = _uais(farm, "1")
    svg = timeline_svg(farm, {uais[0]: "live", uais[1]: "failed"})
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    marks = [g for g in root.iter(f"{ns}g") if g.get("class") == "etab"]
    assert len(marks) == 57
    lanes = [g for g in root.iter(f"{ns}g") if g.get("class") == "wave"]
    assert len(lanes) == 3
    by_uai = {g.get("data-uai"): g for g in marks}
    assert by_uai[uais[0]].get("data-status") == "live"
    shape = next(iter(by_uai[uais[0]]))
    assert shape.get("fill") == "#2e8b57"
    assert "Collège" in (shape.findtext(f"{ns}title") or "")


def test_report_json_and_html(tmp_path: Path) -> None:
    farm = _farm(tmp_path)
    step = FakeStep()
    uais = _uais(farm, "1")
    step.fail_gate = {uais[4]}
    with Ledger.open(farm) as ledger:
        _engine(farm, ledger, step, NotBuiltStep()).apply("1")
        files = write_report(farm, ledger, "1")
    assert files.html.parent == farm.state_dir / "reports"
    assert files.html.name.startswith("wave-1-") and files.json.suffix == ".json"
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert data["wave"]["id"] == "1" and data["counts"] == {"live": 5, "failed": 1}
    live = next(e for e in data["etablissements"] if e["uai"] == uais[0])
    assert live["live_at"] and live["versions"]["deployed"]["cas"] == "2.0"
    assert {g["outcome"] for g in live["evidence"]} == {"passed", "not_verifiable"}
    failed = next(e for e in data["etablissements"] if e["uai"] == uais[4])
    assert failed["status"] == "failed" and "login refused" in failed["error"]
    html = files.html.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and 'lang="fr"' in html
    assert "<script" not in html and "<link" not in html  # self-contained, readable offline
    assert uais[0] in html and "non vérifiable" in html and "en échec" in html
    assert "eleve." + uais[0] in html  # the evidence itself


# -- the ledger drives the AAF import (real slapd) -------------------------------------------


@pytest.fixture
def slapd_farm(tmp_path: Path, slapd: Slapd) -> tuple[Farm, Directory, Path]:
    directory = slapd.new_base()
    farm = _farm(tmp_path, LAB, ("dc=ac-orleans-tours,dc=fr", directory.base))
    export = tmp_path / "export"
    generate([(e.uai, e.name, e.departement) for e in farm.spec.etablissements], export,
             date="20250901", seed=5, eleves_per_college=20)
    return farm, directory, export


def _active(directory: Directory, uai: str) -> int:
    dn = f"ENTStructureUAI={uai},ou=structures,{directory.base}"
    return len(directory.search(f"ou=people,{directory.base}",
                                f"(&(ENTPersonEtat=ACTIF)(ENTPersonStructRattach={dn}))",
                                ("uid",)))


class PassingGate(Step):
    name = "gate"
    title = "Gate"
    gate = "CAS logins (stub)"

    def plan(self, etab: Etablissement) -> str:
        return ""

    def check(self, etab: Etablissement) -> bool:
        return True

    def verify(self, etab: Etablissement) -> Evidence:
        return Evidence(self.gate, PASSED, "stub")


def test_directory_step_imports_wave_by_wave_and_rollback_keeps_data(
        slapd_farm: tuple[Farm, Directory, Path]) -> None:
    farm, directory, export = slapd_farm
    wave1, wave2 = _uais(farm, "1"), _uais(farm, "2")
    with Ledger.open(farm) as ledger:
        class Stubbed(DirectoryStep):
            def verify(self, etab: Etablissement) -> Evidence:
                return Evidence("CAS logins", PASSED, "stub: lab tests log in for real")

        step = Stubbed(farm, export, ledger.scope, directory=lambda: directory)
        assert _engine(farm, ledger, step).apply("1").ok
        assert all(_active(directory, u) > 20 for u in wave1)
        assert all(_active(directory, u) == 0 for u in wave2)  # not onboarded yet
        assert step.check(farm.etablissements_of_wave("1")[0])
        assert _engine(farm, ledger, step).apply("2").ok
        assert all(_active(directory, u) > 20 for u in wave2)
        # Rollback: accounts deactivated (no max-deactivate refusal), entries and groups kept.
        groups_before = directory.search(f"ou=groups,{directory.base}", "(cn=*)", ("cn",))
        _engine(farm, ledger, step).rollback(wave2[0])
        assert _active(directory, wave2[0]) == 0
        assert _active(directory, wave1[0]) > 20
        assert directory.search(f"ou=groups,{directory.base}", "(cn=*)", ("cn",)) == groups_before
    # An import by hand (entfarm aaf import) months later keeps it out and never purges it.
    held_scope = read_scope(farm)
    assert held_scope is not None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=200)
    result = run_import(export, farm, directory, now=later, scope=held_scope[0],
                        held=held_scope[1])
    assert result.changes.counts["people purge"] == 0
    dn = f"ENTStructureUAI={wave2[0]},ou=structures,{directory.base}"
    kept = directory.search(f"ou=people,{directory.base}",
                            f"(ENTPersonStructRattach={dn})", ("ENTPersonEtat",))
    assert kept and all(e["ENTPersonEtat"] == ["DESACTIVE"] for e in kept.values())
    # Its entries, as a directory filled before ENTReplicaAccount (mapping version 3) holds
    # them, get it from the next import although it provisions them no more.
    groups = directory.search(f"ou=groups,{directory.base}", f"(cn={wave2[0]}$*)", ("cn",))
    assert groups
    directory.apply("".join(
        f"dn: {entry}\nchangetype: modify\ndelete: ENTReplicaAccount\n-\n"
        f"delete: objectClass\nobjectClass: ENTReplicated\n\n"
        for entry in [*kept, dn, *groups]))
    tagged = run_import(export, farm, directory, now=later, scope=held_scope[0],
                        held=held_scope[1])
    assert [tagged.changes.counts[k] for k in ("people tag", "structures tag", "groups tag")] \
        == [len(kept), 1, len(groups)]
    assert directory.search(directory.base, UNTAGGED, ("cn",), "sub") == {}
    assert run_import(export, farm, directory, now=later, scope=held_scope[0],
                      held=held_scope[1]).changes.changes == 0


@pytest.mark.parametrize(("tests", "skipped", "rc", "outcome"), [
    (137, 137, 0, "failed"),   # every suite skipped: nothing was checked
    (137, 20, 0, PASSED),
    (137, 20, 1, "failed"),
])
def test_central_preflight_passes_only_when_checks_ran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tests: int, skipped: int, rc: int,
        outcome: str) -> None:
    import entfarm.verify
    from entfarm.waves.steps import central_preflight

    farm = load_farm(LAB)
    seen: dict[str, object] = {}

    def fake_run_verify(farm_: Farm, roles: list[str], limit: str = "all",
                        extra_args: list[str] | None = None,
                        hosts: list[str] | None = None, log: Path | None = None) -> int:
        seen["hosts"] = hosts
        seen["log"] = log
        report = next(a for a in extra_args or [] if a.startswith("--junitxml="))
        Path(report.split("=", 1)[1]).write_text(
            f'<testsuites><testsuite name="pytest" tests="{tests}" skipped="{skipped}" '
            'failures="0" errors="0"/></testsuites>', encoding="utf-8")
        return rc

    monkeypatch.setattr(entfarm.verify, "run_verify", fake_run_verify)
    [evidence] = central_preflight(farm, tmp_path)
    assert evidence.outcome == outcome, evidence
    # The central hosts by name (testinfra matches no "all:!group" pattern), no school server.
    assert seen["hosts"] == [h.name for h in farm.hosts() if not h.name.startswith("se-")]
    # pytest's output goes to the wave's run directory, not over the wave's progress.
    assert seen["log"] == tmp_path / "preflight-verify.log"


def test_directory_step_reads_the_export_once_per_run_unless_it_changes(
        slapd_farm: tuple[Farm, Directory, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from entfarm.aaf import export as export_module

    farm, directory, export = slapd_farm
    reads: list[Path] = []
    real_load = export_module.load

    def counting_load(path: Path, progress: Any = None, **kw: Any) -> Any:
        reads.append(path)
        return real_load(path, progress=progress, **kw)

    monkeypatch.setattr(export_module, "load", counting_load)
    with Ledger.open(farm) as ledger:
        class Stubbed(DirectoryStep):
            def verify(self, etab: Etablissement) -> Evidence:
                return Evidence("CAS logins", PASSED, "stub: lab tests log in for real")

        step = Stubbed(farm, export, ledger.scope, directory=lambda: directory)
        result = _engine(farm, ledger, step).apply("1")
        assert len(result.batches) >= 2, "the wave must have several batches for this test"
        assert reads == [export]  # one read for every batch of the run
        assert all(_active(directory, u) > 20 for u in _uais(farm, "1"))
        # A file of the export rewritten (a new Delta dropped in, a corrected file): read again.
        victim = sorted(f for f in export.iterdir() if f.is_file())[0]
        os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
        assert _engine(farm, ledger, step).apply("2").ok
        assert reads == [export, export]


# -- application tenants (Moodle, Nextcloud): their decisions, on the facts their roles write ----


def _tenant_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str,
                 facts: dict[str, Any], exit_code: int = 0
                 ) -> tuple[AppTenantStep, list[dict[str, Any]], list[dict[str, Any]]]:
    """The default step of ``role`` on the Loiret example, its hosts' facts given, the
    playbook runs and verify suites it starts recorded instead of run."""
    from entfarm.waves import steps as steps_module

    farm = load_farm(LOIRET)
    step = next(s for s in default_steps(farm, None, lambda: (set(), set()))
                if s.name == role)
    assert isinstance(step, AppTenantStep)
    plays: list[dict[str, Any]] = []
    suites: list[dict[str, Any]] = []
    monkeypatch.setattr(steps_module, "read_fact",
                        lambda _farm, host, name: facts.get(host) if name == role else None)

    class Result:
        run_dir = tmp_path / "run"
        failures = [{"task": "tenants | Create", "message": "boom"}] if exit_code else []

    Result.exit_code = exit_code  # type: ignore[attr-defined]

    def run_playbook(_farm: Farm, playbook: str, **kw: Any) -> Any:
        plays.append({"playbook": playbook, **kw})
        return Result()

    def suite_evidence(_farm: Farm, gate: str, roles: list[str], hosts: list[str],
                       report: Path, select: str | None = None) -> Evidence:
        suites.append({"roles": roles, "hosts": hosts, "select": select})
        return Evidence(gate, PASSED, "verify suites: exit 0; tests 1", {"exit": 0})

    import entfarm.runner as runner_module
    monkeypatch.setattr(runner_module, "run_playbook", run_playbook)
    monkeypatch.setattr(runner_module, "new_run_dir", lambda _farm, name: tmp_path / name)
    monkeypatch.setattr(steps_module, "suite_evidence", suite_evidence)
    return step, plays, suites


def test_app_tenant_without_the_release_applies_nothing_and_is_not_verifiable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    farm = load_farm(LOIRET)
    fact = {"state": "artifact missing", "artifact": "moodle-4.5", "tenants": []}
    step, plays, suites = _tenant_step(tmp_path, monkeypatch, "moodle", {
        h: fact for h in farm.spec.services["moodle"].hosts})
    etab = farm.spec.etablissements[0]
    assert step.check(etab) is False
    assert step.apply_batch([etab]) == {} and plays == []
    evidence = step.verify(etab)
    assert evidence.outcome == NOT_VERIFIABLE and "artifact missing" in evidence.detail
    assert suites == []


def test_app_tenant_runs_its_tag_with_the_batch_added_then_checks_that_tenant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    farm = load_farm(LOIRET)
    hosts = farm.spec.services["moodle"].hosts
    assert len(hosts) == 2
    fact = {"state": "installed", "artifact": "moodle-4.5", "tenants": ["0450008P"]}
    step, plays, suites = _tenant_step(tmp_path, monkeypatch, "moodle",
                                       {h: fact for h in hosts})
    etabs = farm.spec.etablissements[1:3]
    assert not step.check(etabs[0])
    assert step.apply_batch(etabs) == {}
    [play] = plays
    assert play["playbook"] == "playbooks/apps.yml" and play["tags"] == "moodle:tenants"
    assert play["limit"] == ",".join(hosts)
    assert play["extravars"] == {"moodle__tenants": sorted(["0450008P", *(e.uai for e in etabs)])}
    # A UAI its role was not given fails the gate without running the suite.
    evidence = step.verify(etabs[0])
    assert evidence.outcome == FAILED_GATE and "not among the moodle tenants" in evidence.detail
    fact["tenants"] = play["extravars"]["moodle__tenants"]
    assert step.check(etabs[0])
    assert step.verify(etabs[0]).outcome == PASSED
    assert suites == [{"roles": ["moodle"], "hosts": list(hosts),
                       "select": "test_etablissements_have_their_category_and_cohort"}]


def test_app_tenant_failed_play_fails_the_batch_and_a_missing_plugin_is_not_verifiable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    farm = load_farm(LOIRET)
    fact = {"state": "installed", "artifact": "nextcloud-30", "tenants": [],
            "apps_missing": ["groupfolders"]}
    step, plays, suites = _tenant_step(tmp_path, monkeypatch, "nextcloud", {
        h: fact for h in farm.spec.services["nextcloud"].hosts}, exit_code=2)
    etabs = farm.spec.etablissements[:2]
    errors = step.apply_batch(etabs)
    assert set(errors) == {e.uai for e in etabs}
    assert "apps play failed (exit 2" in str(errors[etabs[0].uai])
    assert "boom" in str(errors[etabs[0].uai])
    fact["tenants"] = [etabs[0].uai]
    evidence = step.verify(etabs[0])
    assert evidence.outcome == NOT_VERIFIABLE and "groupfolders" in evidence.detail
    assert suites == []
    # Not deployed at all: the batch fails with what to do.
    step, plays, _ = _tenant_step(tmp_path, monkeypatch, "nextcloud", {})
    errors = step.apply_batch(etabs)
    assert "entfarm deploy --tags nextcloud" in str(errors[etabs[0].uai]) and plays == []
