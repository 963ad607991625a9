"""Benchmark of onboarding by waves (issue 7, deliverable 6). A measurement, not a test.

Onboards synthetic collèges into the lab's central services (no school servers) with the real
wave engine, as ``entfarm wave apply`` builds it: preflight (the central services' verify
suites), canary, batches, the AAF import restricted to the ledger's scope, the CAS login gate and
the portal gate of every établissement. Three waves of 5, 15 and 30 collèges (50 in all, by
default) show whether the cost per établissement stays flat as the farm grows.

Reference, measured in the same run on the same directory: one plain ``entfarm aaf import``
of the same collèges without waves (empty directory, every account at once) — the cheapest
way to provision the accounts, so that what the waves add (scoped imports per batch, gates)
is visible.

The farm is a temporary copy of the lab's farm.yml with the synthetic collèges added (same
hosts and containers, the lab's secrets and artifact store, its own state directory: ledger,
distribution files and runs stay out of the lab's). The portal and Etherpad's list of open
établissements are redeployed from that copy, as a deploy of a real farm's farm.yml would,
and from the lab's farm.yml again at the end. The AAF
data the benchmark creates is deleted at the end: re-import the lab's export afterwards
(the lab tests do it themselves).

    .venv/bin/python benchmarks/wave_onboarding.py                    # 5 + 15 + 30 collèges
    .venv/bin/python benchmarks/wave_onboarding.py --waves 2,3 --eleves-per-college 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from entfarm import cli  # noqa: E402
from entfarm.aaf import ldif  # noqa: E402
from entfarm.aaf.importer import Directory, run_import  # noqa: E402
from entfarm.aaf.mapping import AAF_GROUP  # noqa: E402
from entfarm.aaf.transport import for_farm  # noqa: E402
from entfarm.model import Farm, load_farm  # noqa: E402
from entfarm.uai import check_letter  # noqa: E402
from entfarm.waves.engine import ProgressEvent  # noqa: E402
from entfarm.waves.ledger import Ledger  # noqa: E402

LAB = REPO / "inventories" / "lab"
TARGET_PER_ETAB_S = 5.0
# "Flat": the last wave's cost per établissement within this factor of the first wave's.
FLAT_FACTOR = 1.5


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def make_inventory(target: Path, sizes: list[int]) -> dict[str, list[str]]:
    """The lab's farm.yml plus sum(sizes) synthetic collèges in waves b1, b2 …; returns the
    UAIs per benchmark wave."""
    text = (LAB / "farm.yml").read_text(encoding="utf-8")
    existing = set(re.findall(r"uai: ([0-9]{7}[A-Z])", text))
    waves_yaml = "".join(
        f"  - id: b{n}\n    name: Banc d'essai {n} ({size} collèges)\n    canary: 1\n"
        f"    failure_threshold: 0.1\n" for n, size in enumerate(sizes, 1))
    etabs_yaml: list[str] = []
    per_wave: dict[str, list[str]] = {}
    serial = 0
    for n, size in enumerate(sizes, 1):
        for _ in range(size):
            while True:
                dep = ("036", "045")[serial % 2]
                stem = f"{dep}{8000 + serial:04d}"
                serial += 1
                uai = stem + check_letter(stem)
                if uai not in existing:
                    break
            per_wave.setdefault(f"b{n}", []).append(uai)
            etabs_yaml.append(
                f"  - uai: {uai}\n    name: Collège de banc d'essai {serial}\n"
                f"    type: college\n    commune: Banc\n    departement: \"{dep}\"\n"
                f"    wave: b{n}\n    school_server: false\n")
    text = text.replace("\nwaves:\n", "\nwaves:\n" + waves_yaml, 1)
    text = text.replace("\netablissements:\n", "\netablissements:\n" + "".join(etabs_yaml), 1)
    target.mkdir(parents=True)
    (target / "farm.yml").write_text(text, encoding="utf-8")
    for sub in ("logos", "news", "secrets"):
        if (LAB / sub).exists():
            (target / sub).symlink_to(LAB / sub)
    # The lab's artifact store (the portal redeploy installs from it); own state otherwise.
    (target / "state").mkdir()
    (target / "state" / "artifacts").symlink_to(LAB / "state" / "artifacts")
    return per_wave


def entfarm(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "entfarm.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"entfarm {' '.join(args)} failed:\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")


def clear_aaf_data(farm: Farm) -> int:
    base = farm.spec.academie.base_dn
    d = Directory(for_farm(farm), base)
    doomed = list(d.search(f"ou=people,{base}", "(ENTPersonJointure=*)", ("dn",)))
    doomed += [dn for dn, e in d.search(f"ou=groups,{base}", "(objectClass=groupOfNames)",
                                        ("cn",)).items()
               if AAF_GROUP.match((e.get("cn") or [""])[0])]
    doomed += list(d.search(f"ou=structures,{base}", "(objectClass=ENTStructure)", ("dn",)))
    d.apply_parts([ldif.delete(dn) for dn in doomed])
    return len(doomed)


def onboard(farm: Farm, export: Path, wave: str, batch_size: int | None) -> dict[str, Any]:
    marks: dict[str, float] = {}
    live: list[float] = []

    def progress(event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.phase == "step" and "onboarding" not in marks:
            marks["onboarding"] = now  # the preflight is over
        if event.phase == "etab":
            live.append(now)
            _say(event.line())

    with Ledger.open(farm) as ledger:
        engine = cli._wave_engine(farm, ledger, str(export), "apply", wave, progress)
        t0 = time.monotonic()
        result = engine.apply(wave, batch_size=batch_size)
        end = time.monotonic()
    n = len(farm.etablissements_of_wave(wave))
    start = marks.get("onboarding", end)
    out = {
        "wave": wave, "etablissements": n, "outcome": result.outcome, "reason": result.reason,
        "live": len(result.live), "failed": result.failed, "batches": len(result.batches),
        "preflight_s": round(start - t0, 1), "onboarding_s": round(end - start, 1),
        "per_etab_s": round((end - start) / n, 2) if n else None,
        "per_etab_with_preflight_s": round((end - t0) / n, 2) if n else None,
    }
    _say(f"wave {wave}: {json.dumps(out, ensure_ascii=False)}")
    return out


def reference(farm: Farm, export: Path, uais: list[str]) -> dict[str, Any]:
    """One plain import of the same collèges, into a directory without AAF data."""
    clear_aaf_data(farm)
    directory = Directory(for_farm(farm), farm.spec.academie.base_dn)
    t0 = time.monotonic()
    result = run_import(export, farm, directory, scope=set(uais), progress=_say)
    seconds = time.monotonic() - t0
    return {"etablissements": len(uais), "import_s": round(seconds, 1),
            "per_etab_s": round(seconds / len(uais), 2),
            "changes": result.changes.changes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--waves", default="5,15,30", help="collèges per wave, in order")
    parser.add_argument("--eleves-per-college", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="after the canary (default: the engine's, max(canary, 5))")
    parser.add_argument("--out", type=Path, default=REPO / "test-artifacts" / "wave-onboarding")
    parser.add_argument("--keep", action="store_true",
                        help="keep the benchmark's data and portal (no clean-up)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.waves.split(",")]
    work = Path(tempfile.mkdtemp(prefix="entfarm-wave-bench-"))
    inventory = work / "inventory"
    per_wave = make_inventory(inventory, sizes)
    farm = load_farm(inventory)
    lab_farm = load_farm(LAB)
    cli._require_lab_up(lab_farm)
    load_before = os.getloadavg()
    _say(f"{sum(sizes)} synthetic collèges in waves {sizes}; inventory {inventory}")
    export = work / "aaf"
    entfarm("aaf", "generate", str(export), "-i", str(inventory), "--seed", "7",
            "--eleves-per-college", str(args.eleves_per_college))
    # What a deploy renders from farm.yml's établissements, as for a real farm's next wave:
    # the portal's list and Etherpad's open établissements (the waves' steps find them done).
    _say("portal, etherpad tenants: redeploying with the benchmark's collèges")
    entfarm("deploy", "-i", str(inventory), "--tags", "portal,etherpad:tenants",
            "--limit", "portal:etherpad")
    removed = clear_aaf_data(farm)
    _say(f"directory: {removed} AAF entries removed")
    results: list[dict[str, Any]] = []
    ref: dict[str, Any] = {}
    try:
        for wave in per_wave:
            results.append(onboard(farm, export, wave, args.batch_size))
        all_uais = [u for uais in per_wave.values() for u in uais]
        _say("reference: one plain import of the same collèges")
        ref = reference(farm, export, all_uais)
    finally:
        if not args.keep:
            _say("clean-up: AAF data removed, portal and etherpad tenants redeployed from the "
                 "lab's farm.yml")
            clear_aaf_data(farm)
            entfarm("deploy", "-i", str(LAB), "--tags", "portal,etherpad:tenants",
                    "--limit", "portal:etherpad")
    load_after = os.getloadavg()
    per_etab = [r["per_etab_s"] for r in results if r["per_etab_s"] is not None]
    verdict = {
        "max_per_etab_s": max(per_etab) if per_etab else None,
        "target_per_etab_s": TARGET_PER_ETAB_S,
        "flat_ratio_last_to_first": round(per_etab[-1] / per_etab[0], 2) if per_etab else None,
        "flat_factor": FLAT_FACTOR,
        "all_live": all(r["live"] == r["etablissements"] for r in results),
    }
    verdict["met"] = bool(
        per_etab and verdict["all_live"] and max(per_etab) <= TARGET_PER_ETAB_S
        and per_etab[-1] <= FLAT_FACTOR * per_etab[0])
    report = {
        "machine": {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in load_after]},
        "eleves_per_college": args.eleves_per_college, "waves": results, "reference": ref,
        "median_per_etab_s": statistics.median(per_etab) if per_etab else None,
        "verdict": verdict,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wave_onboarding.json").write_text(json.dumps(report, indent=2,
                                                              ensure_ascii=False))
    print("| wave | collèges | batches | preflight | onboarding | per collège | with preflight "
          "| live |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['wave']} | {r['etablissements']} | {r['batches']} | {r['preflight_s']} s "
              f"| {r['onboarding_s']} s | {r['per_etab_s']} s | {r['per_etab_with_preflight_s']}"
              f" s | {r['live']} |")
    if ref:
        print(f"| reference: one import | {ref['etablissements']} | — | — | {ref['import_s']} s "
              f"| {ref['per_etab_s']} s | — | — |")
    print(json.dumps({"verdict": verdict, "machine": report["machine"]}, indent=2))
    return 0 if verdict["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
