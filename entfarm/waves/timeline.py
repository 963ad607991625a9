"""The rollout as a picture: an SVG written by hand (no plotting dependency).

One swimlane per wave, stacked top to bottom and shifted right so that the rollout reads left to
right; in each lane the établissements in onboarding order, grouped by batch (canary first), one
mark each, coloured by their ledger status. Each mark has a tooltip (SVG ``title``).
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from ..model import Farm
from .plan import plan_wave

STATUS_COLOURS = {
    "planned": "#c8ced6",
    "onboarding": "#f2b705",
    "live": "#2e8b57",
    "failed": "#c0392b",
    "rolled_back": "#7f5aa2",
}
STATUS_LABELS = {"planned": "prévu", "onboarding": "en cours", "live": "en service",
                 "failed": "en échec", "rolled_back": "retiré"}
MARK = 14
STEP = 18  # horizontal pitch of marks
BATCH_GAP = 8
LANE = 96
LABEL_W = 330
TOP = 56
FONT = "font-family=\"DejaVu Sans, Arial, sans-serif\""


def _short(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"


def _attr(value: object) -> str:
    return escape(str(value), {'"': "&quot;"})


def timeline_svg(farm: Farm, statuses: dict[str, str] | None = None,
                 batch_size: int | None = None) -> str:
    """The SVG document (text) for every wave of the farm."""
    statuses = statuses or {}
    lanes = []
    x = LABEL_W
    for wave in farm.spec.waves:
        plan = plan_wave(farm, wave.id, [], statuses, batch_size)
        # farm.yml order (the plan puts what is left to do first): a wave reads as declared.
        order = {e.uai: i for i, e in enumerate(farm.etablissements_of_wave(wave.id))}
        plan.rows.sort(key=lambda r: order[r.uai])
        marks = []
        previous = None
        cx = x
        for row in plan.rows:
            if previous is not None and row.batch != previous:
                cx += BATCH_GAP
            marks.append((cx, row))
            previous = row.batch
            cx += STEP
        lanes.append((wave, marks, x, max(cx, x + STEP)))
        x = max(cx, x + STEP) + BATCH_GAP * 2
    width = x + 20
    legend_y = TOP + LANE * len(lanes) + 24
    height = legend_y + 24
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Calendrier de déploiement de {_attr(farm.name)}">',
        f"<title>Vagues de déploiement — {escape(farm.spec.academie.name)}</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="12" y="28" {FONT} font-size="18" font-weight="bold" fill="#1f3f66">'
        f"Vagues de déploiement — {escape(farm.name)} "
        f"({len(farm.spec.etablissements)} établissements)</text>",
    ]
    for i, (wave, marks, x0, x1) in enumerate(lanes):
        y = TOP + i * LANE
        out.append(f'<g class="wave" id="wave-{_attr(wave.id)}">')
        out.append(f'<rect x="4" y="{y}" width="{width - 8}" height="{LANE - 6}" '
                   f'fill="{"#f6f8fa" if i % 2 == 0 else "#ffffff"}" stroke="#d9dee4"/>')
        counts: dict[str, int] = {}
        for _cx, row in marks:
            counts[row.status] = counts.get(row.status, 0) + 1
        summary = ", ".join(f"{n} {STATUS_LABELS.get(s, s)}" for s, n in sorted(counts.items()))
        out.append(f'<text x="12" y="{y + 22}" {FONT} font-size="13" font-weight="bold" '
                   f'fill="#222">{escape(_short(wave.name, 42))}</text>')
        out.append(f'<text x="12" y="{y + 40}" {FONT} font-size="11" fill="#444">'
                   f"vague {escape(wave.id)} · {len(marks)} étab. · canari {wave.canary} · "
                   f"seuil {wave.failure_threshold:.0%}</text>")
        out.append(f'<text x="12" y="{y + 56}" {FONT} font-size="11" fill="#444">'
                   f"{escape(summary)}</text>")
        out.append(f'<line x1="{x0 - 4}" y1="{y + 30}" x2="{x1}" y2="{y + 30}" '
                   'stroke="#9aa5b1" stroke-width="1"/>')
        for cx, row in marks:
            colour = STATUS_COLOURS.get(row.status, "#999999")
            tip = (f"{row.uai} — {row.name} ({row.commune}) · "
                   f"{STATUS_LABELS.get(row.status, row.status)}"
                   + (f" · lot {row.batch}" if row.batch else "")
                   + (f" · serveur {row.school_server}" if row.school_server else ""))
            shape = (f'<rect x="{cx}" y="{y + 23}" width="{MARK}" height="{MARK}" rx="3" '
                     f'fill="{colour}" stroke="#333" stroke-width="0.5">'
                     if not row.school_server else
                     f'<circle cx="{cx + MARK / 2}" cy="{y + 30}" r="{MARK / 2}" '
                     f'fill="{colour}" stroke="#333" stroke-width="0.5">')
            end = "</rect>" if not row.school_server else "</circle>"
            out.append(f'<g class="etab" data-uai="{_attr(row.uai)}" '
                       f'data-status="{_attr(row.status)}">{shape}<title>{escape(tip)}</title>'
                       f"{end}"
                       f'<text transform="translate({cx + MARK / 2 + 3},{y + 42}) rotate(90)" '
                       f'{FONT} font-size="8" fill="#333">{escape(row.uai)}</text></g>')
        out.append("</g>")
    lx = 12
    out.append(f'<g class="legend" {FONT} font-size="11">')
    for status, colour in STATUS_COLOURS.items():
        out.append(f'<rect x="{lx}" y="{legend_y - 10}" width="12" height="12" rx="2" '
                   f'fill="{colour}"/><text x="{lx + 16}" y="{legend_y}" fill="#222">'
                   f"{STATUS_LABELS[status]}</text>")
        lx += 110
    out.append(f'<text x="{lx}" y="{legend_y}" fill="#222">carré : sans serveur '
               "d'établissement · rond : avec</text>")
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_timeline(farm: Farm, path: Path, statuses: dict[str, str] | None = None,
                   batch_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(timeline_svg(farm, statuses, batch_size), encoding="utf-8")
    return path
