"""``entfarm wave report N``: for the Département and auditors, who went live when, with which
versions, and the evidence. JSON for tools, one self-contained HTML file (inline CSS, no script,
French) readable offline. Both are built from the ledger only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from ..model import Farm
from .ledger import Ledger, ledger_path
from .plan import wave_of
from .timeline import STATUS_COLOURS, STATUS_LABELS

OUTCOME_LABELS = {"passed": "vérifié", "failed": "échec", "not_verifiable": "non vérifiable",
                  "skipped": "sans objet"}
FORMAT = "entfarm-wave-report/1"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path


def report_data(farm: Farm, ledger: Ledger, wave_id: str) -> dict[str, Any]:
    wave = wave_of(farm, wave_id)
    rows = ledger.rows()
    etabs: list[dict[str, Any]] = []
    for e in farm.etablissements_of_wave(wave.id):
        row = rows.get(e.uai)
        etabs.append({
            "uai": e.uai, "name": e.name, "commune": e.commune, "departement": e.departement,
            "school_server": e.school_server_host if e.school_server else None,
            "status": row.status if row else "planned",
            "onboarding_at": row.onboarding_at if row else None,
            "live_at": row.live_at if row else None,
            "failed_at": row.failed_at if row else None,
            "rolled_back_at": row.rolled_back_at if row else None,
            "error": row.error if row else None,
            "versions": row.versions if row else {},
            "evidence": row.evidence if row else [],
            "events": [_event(ev) for ev in ledger.events(uai=e.uai)],
        })
    counts: dict[str, int] = {}
    for item in etabs:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    return {
        "format": FORMAT,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "farm": farm.name,
        "academie": farm.spec.academie.name,
        "ledger": str(ledger_path(farm)),
        "ledger_schema": ledger.version,
        "wave": {"id": wave.id, "name": wave.name, "canary": wave.canary,
                 "failure_threshold": wave.failure_threshold,
                 "size": len(etabs)},
        "counts": counts,
        "etablissements": etabs,
        "runs": ledger.runs(wave.id),
    }


def _event(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: ev[k] for k in ("at", "run_id", "kind", "name", "from_status", "to_status",
                               "outcome", "detail", "evidence", "actor")}


def write_report(farm: Farm, ledger: Ledger, wave_id: str,
                 out_dir: Path | None = None) -> ReportFiles:
    data = report_data(farm, ledger, wave_id)
    folder = out_dir or farm.state_dir / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = folder / f"wave-{data['wave']['id']}-{stamp}"
    json_path = base.with_suffix(".json")
    html_path = base.with_suffix(".html")
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    html_path.write_text(render_html(data), encoding="utf-8")
    return ReportFiles(html_path, json_path)


_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:2em;color:#1d2733;max-width:72em}
h1{color:#1f3f66;font-size:1.5em}h2{color:#1f3f66;border-bottom:2px solid #1f3f66;
font-size:1.2em;margin-top:2em}h3{font-size:1em;margin:1.4em 0 .3em}
table{border-collapse:collapse;width:100%;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #c9d1da;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef2f6}.status{display:inline-block;padding:0 .5em;border-radius:.6em;color:#fff}
.muted{color:#5b6775;font-size:.85em}code{font-size:.9em}
.passed{color:#1e6b40;font-weight:bold}.failed{color:#a52a1f;font-weight:bold}
.not_verifiable{color:#8a6d00;font-weight:bold}.skipped{color:#5b6775}
details{margin:.3em 0}@media print{details{display:block}}
"""


def _status(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#777")
    return (f'<span class="status" style="background:{colour}">'
            f"{escape(STATUS_LABELS.get(status, status))}</span>")


def _when(value: str | None) -> str:
    return escape(value.replace("T", " ")[:19] + " UTC") if value else "—"


def render_html(data: dict[str, Any]) -> str:
    wave = data["wave"]
    counts = ", ".join(f"{n} {STATUS_LABELS.get(s, s)}" for s, n in sorted(data["counts"].items()))
    out = [
        "<!DOCTYPE html>",
        '<html lang="fr"><head><meta charset="utf-8">',
        f"<title>Rapport de la vague {escape(wave['id'])} — {escape(data['farm'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Rapport de déploiement — {escape(wave['name'])}</h1>",
        f"<p>Ferme <strong>{escape(data['farm'])}</strong>, académie "
        f"{escape(data['academie'])}. Vague {escape(wave['id'])} : {wave['size']} "
        f"établissement(s) ; {escape(counts)}.<br>Canari : {wave['canary']} ; seuil d'échec : "
        f"{wave['failure_threshold']:.0%} des établissements de la vague.</p>",
        f'<p class="muted">Généré le {_when(data["generated_at"])} à partir du registre '
        f"<code>{escape(data['ledger'])}</code> (schéma {data['ledger_schema']}). "
        "Un contrôle « non vérifiable » n'a pas pu être fait : il n'est jamais compté comme "
        "réussi.</p>",
        "<h2>Synthèse</h2>",
        "<table><tr><th>UAI</th><th>Établissement</th><th>Commune</th><th>État</th>"
        "<th>Mise en service</th><th>Contrôles</th><th>Versions</th></tr>",
    ]
    for e in data["etablissements"]:
        gates = ", ".join(
            f'<span class="{escape(g["outcome"])}">{escape(g["gate"])} : '
            f'{escape(OUTCOME_LABELS.get(g["outcome"], g["outcome"]))}</span>'
            for g in e["evidence"] if g.get("outcome") in OUTCOME_LABELS
            and g.get("gate")) or "—"
        deployed = e["versions"].get("deployed", {}) if isinstance(e["versions"], dict) else {}
        versions = ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in sorted(deployed.items()))
        if isinstance(e["versions"], dict) and e["versions"].get("entfarm"):
            versions = f"entfarm {escape(str(e['versions']['entfarm']))}" + (
                f", {versions}" if versions else "")
        out.append(
            f"<tr><td><code>{escape(e['uai'])}</code></td><td>{escape(e['name'])}</td>"
            f"<td>{escape(e['commune'])}</td><td>{_status(e['status'])}</td>"
            f"<td>{_when(e['live_at'])}</td><td>{gates}</td><td>{versions or '—'}</td></tr>")
    out.append("</table>")
    out.append("<h2>Preuves par établissement</h2>")
    for e in data["etablissements"]:
        out.append(f"<h3 id=\"{escape(e['uai'])}\"><code>{escape(e['uai'])}</code> "
                   f"{escape(e['name'])} — {_status(e['status'])}</h3>")
        if e["error"]:
            out.append(f"<p class=\"failed\">Cause : {escape(e['error'])}</p>")
        if e["evidence"]:
            out.append("<table><tr><th>Contrôle</th><th>Résultat</th><th>Détail</th>"
                       "<th>Données</th></tr>")
            for g in e["evidence"]:
                outcome = str(g.get("outcome", ""))
                label = OUTCOME_LABELS.get(outcome, outcome)
                payload = {k: v for k, v in g.items()
                           if k not in ("gate", "outcome", "detail", "step")}
                out.append(
                    f"<tr><td>{escape(str(g.get('gate') or g.get('step') or ''))}</td>"
                    f'<td class="{escape(outcome)}">{escape(label)}</td>'
                    f"<td>{escape(str(g.get('detail', '')))}</td>"
                    f"<td><code>{escape(json.dumps(payload, ensure_ascii=False))}</code></td>"
                    "</tr>")
            out.append("</table>")
        if e["events"]:
            out.append(f"<details><summary>Journal ({len(e['events'])} événements)</summary>"
                       "<table><tr><th>Date</th><th>Par</th><th>Quoi</th><th>Résultat</th>"
                       "<th>Détail</th></tr>")
            for ev in e["events"]:
                what = ev["kind"] + (f" {ev['name']}" if ev["name"] else "")
                if ev["kind"] == "transition":
                    what = f"{ev['from_status']} → {ev['to_status']}"
                out.append(f"<tr><td>{_when(ev['at'])}</td><td>{escape(ev['actor'])}</td>"
                           f"<td>{escape(what)}</td><td>{escape(ev['outcome'] or '')}</td>"
                           f"<td>{escape(ev['detail'] or '')}</td></tr>")
            out.append("</table></details>")
    out.append("<h2>Exécutions</h2><table><tr><th>N°</th><th>Commande</th><th>Début</th>"
               "<th>Fin</th><th>Résultat</th><th>Par</th></tr>")
    for run in data["runs"]:
        reason = run["summary"].get("reason", "") if isinstance(run["summary"], dict) else ""
        out.append(f"<tr><td>{run['id']}</td><td>{escape(run['command'])}</td>"
                   f"<td>{_when(run['started_at'])}</td><td>{_when(run['finished_at'])}</td>"
                   f"<td>{escape(run['outcome'])}"
                   f"{(' : ' + escape(str(reason))) if reason else ''}</td>"
                   f"<td>{escape(run['actor'])}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"
