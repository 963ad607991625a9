"""Waves on the real lab (issue 7, deliverable 5): a host stopped in the middle of a wave.

The wave is the lab's wave 1 (two collèges, a canary of one). It runs through the engine the CLI
builds (``entfarm wave apply``: the central services' verify suites as preflight, the AAF import
restricted to the ledger's scope, the CAS login gate with a distributed account, the portal
gate). As soon as the canary is live, the directory and CAS host (idp) is stopped: the next
batch must fail, the wave must stop at its threshold, and nothing half-done may be marked live.
After the host is started again, ``resume`` completes the wave without redoing the canary;
applying the finished wave again changes nothing.

The module starts from a directory without AAF data and without a ledger (the other modules
import every établissement, which a first wave would have to deactivate); afterwards it puts
the ledger that was there back and imports every établissement again.
"""

from __future__ import annotations

import json
import shutil
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from identity_helpers import entfarm_cli

from entfarm import cli, lab
from entfarm.aaf import ldif
from entfarm.aaf.importer import Directory
from entfarm.aaf.mapping import AAF_GROUP
from entfarm.aaf.transport import for_farm
from entfarm.casclient import CasClientError
from entfarm.errors import UserError
from entfarm.model import Farm
from entfarm.waves.engine import ProgressEvent, WaveResult
from entfarm.waves.ledger import FAILED, LIVE, ONBOARDING, Ledger, ledger_path
from entfarm.waves.report import write_report

pytestmark = pytest.mark.lab

WAVE = "1"
STOPPED_HOST = "idp"
HOST_BACK_TIMEOUT = 240.0


@dataclass
class WaveLab:
    farm: Farm
    export: Path
    canary: str
    second: str
    stops: list[str] = field(default_factory=list)  # the UAI live when the host was stopped
    runs: dict[str, WaveResult] = field(default_factory=dict)


def _directory(farm: Farm) -> Directory:
    return Directory(for_farm(farm), farm.spec.academie.base_dn)


def _clear_aaf_data(farm: Farm) -> None:
    """Delete what AAF imports create (people, structures, their groups), nothing else."""
    base = farm.spec.academie.base_dn
    d = _directory(farm)
    doomed = list(d.search(f"ou=people,{base}", "(ENTPersonJointure=*)", ("dn",)))
    doomed += [dn for dn, e in d.search(f"ou=groups,{base}", "(objectClass=groupOfNames)",
                                        ("cn",)).items()
               if AAF_GROUP.match((e.get("cn") or [""])[0])]
    doomed += list(d.search(f"ou=structures,{base}", "(objectClass=ENTStructure)", ("dn",)))
    d.apply("".join(ldif.delete(dn) for dn in doomed))


def _distribution_files(farm: Farm) -> list[Path]:
    return sorted((farm.state_dir / "aaf" / "distribution").glob("*/comptes-*.csv"))


def _run(wl: WaveLab, command: str, progress: Any = lambda _event: None) -> WaveResult:
    with Ledger.open(wl.farm) as ledger:
        engine = cli._wave_engine(wl.farm, ledger, str(wl.export), command, WAVE, progress)
        result = engine.apply(WAVE, resume=command == "resume")
    wl.runs[command] = result
    return result


def _statuses(farm: Farm) -> dict[str, str]:
    with Ledger.open(farm) as ledger:
        return ledger.statuses()


def _wait_for_identity(farm: Farm) -> None:
    """slapd answers on ldapi and the CAS login page is served again, or fail."""
    deadline = time.monotonic() + HOST_BACK_TIMEOUT
    gate = cli._wave_steps(farm, None, None)[0].gate_impl  # the CAS gate's client settings
    cas = gate.client()
    last = ""
    while time.monotonic() < deadline:
        try:
            _directory(farm).search(farm.spec.academie.base_dn, "(objectClass=*)", ("dn",),
                                    "base")
            page = cas.browser().request("GET", cas.login_url(gate.service()))
            if page.status == 200:
                return
            last = f"CAS login page: HTTP {page.status}"
        except (UserError, CasClientError, OSError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(3)
    pytest.fail(f"{STOPPED_HOST} not back within {HOST_BACK_TIMEOUT:.0f} s: {last}")


@pytest.fixture(scope="module")
def wave_lab(deployed_lab: Any, lab_farm: Farm,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[WaveLab]:
    farm = lab_farm
    wave = next(w for w in farm.spec.waves if w.id == WAVE)
    etabs = farm.etablissements_of_wave(WAVE)
    assert wave.canary == 1 and len(etabs) == 2, "the test expects wave 1: canary 1 of 2"
    assert len(etabs) * wave.failure_threshold < 1, "one failure must stop wave 1"
    export = tmp_path_factory.mktemp("wave-aaf")
    generated = entfarm_cli("aaf", "generate", str(export), "-i", str(farm.inventory_dir),
                            "--seed", "3", "--eleves-per-college", "10")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    saved = tmp_path_factory.mktemp("ledger") / "waves.sqlite"
    had_ledger = ledger_path(farm).is_file()
    if had_ledger:
        shutil.move(ledger_path(farm), saved)
    _clear_aaf_data(farm)
    try:
        yield WaveLab(farm, export, etabs[0].uai, etabs[1].uai)
    finally:
        lab.up(farm)  # whatever happened, the stopped host runs again
        _wait_for_identity(farm)
        ledger_path(farm).unlink(missing_ok=True)
        if had_ledger:
            shutil.move(saved, ledger_path(farm))
        # Back to what the other modules expect: every établissement imported.
        restored = entfarm_cli("aaf", "import", str(export), "-i", str(farm.inventory_dir))
        assert restored.returncode == 0, restored.stdout + restored.stderr


def test_a_host_stopped_mid_wave_halts_it_and_nothing_half_done_is_live(
        wave_lab: WaveLab) -> None:
    wl = wave_lab
    client = lab.docker_client()

    def stop_after_canary(event: ProgressEvent) -> None:
        if event.phase == "etab" and event.what == "live" and not wl.stops:
            wl.stops.append(str(event.uai))
            client.containers.get(wl.farm.container_name(STOPPED_HOST)).stop(timeout=10)

    result = _run(wl, "apply", stop_after_canary)

    assert wl.stops == [wl.canary], f"the canary did not go live first: {result.summary()}"
    assert result.outcome == "stopped", result.summary()
    assert "threshold" in result.reason, result.reason
    assert result.live == [wl.canary]
    assert list(result.failed) == [wl.second]
    # The failure names what broke: the directory host could not be reached.
    assert "directory" in result.failed[wl.second], result.failed
    statuses = _statuses(wl.farm)
    assert statuses[wl.canary] == LIVE
    assert statuses[wl.second] == FAILED
    assert ONBOARDING not in statuses.values(), statuses
    with Ledger.open(wl.farm) as ledger:
        row = ledger.row(wl.second)
        assert row is not None and row.live_at is None and row.error
        files = write_report(wl.farm, ledger, WAVE, wl.export.parent / "report")
    report = json.loads(files.json.read_text(encoding="utf-8"))
    by_uai = {e["uai"]: e for e in report["etablissements"]}
    assert by_uai[wl.canary]["status"] == LIVE
    assert by_uai[wl.second]["status"] == FAILED
    assert by_uai[wl.second]["error"] == row.error
    assert report["runs"][-1]["outcome"] == "stopped"
    html = files.html.read_text(encoding="utf-8")
    assert wl.second in html and row.error.split(":")[0] in html


def test_resume_after_the_host_is_back_completes_the_wave(wave_lab: WaveLab) -> None:
    wl = wave_lab
    assert wl.runs.get("apply") is not None, "the interrupted wave did not run"
    lab.up(wl.farm)
    _wait_for_identity(wl.farm)

    result = _run(wl, "resume")

    assert result.outcome == "completed", result.summary()
    assert result.live == [wl.second] and not result.failed
    assert result.skipped == [wl.canary]  # already live: left alone, not redone
    assert _statuses(wl.farm) == {wl.canary: LIVE, wl.second: LIVE}
    with Ledger.open(wl.farm) as ledger:
        redone = [ev for ev in ledger.events(uai=wl.canary)
                  if ev["run_id"] == result.run_id and ev["kind"] == "step"]
        evidence = ledger.row(wl.second)
    assert redone == []
    assert evidence is not None and any(
        ev["gate"] == "CAS logins" and ev["outcome"] == "passed" for ev in evidence.evidence)


def test_applying_the_finished_wave_again_changes_nothing(wave_lab: WaveLab) -> None:
    wl = wave_lab
    assert wl.runs.get("resume") is not None and wl.runs["resume"].ok, "the wave is not done"
    before = _directory(wl.farm).dump()
    files_before = _distribution_files(wl.farm)

    result = _run(wl, "apply")

    assert result.outcome == "reverified", result.summary()
    assert not result.failed and result.batches == []
    assert sorted(result.reverify) == sorted([wl.canary, wl.second])
    assert _statuses(wl.farm) == {wl.canary: LIVE, wl.second: LIVE}
    assert _directory(wl.farm).dump() == before
    assert _distribution_files(wl.farm) == files_before
