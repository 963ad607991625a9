"""``entfarm wave plan N``: what onboarding will do to each établissement of a wave, read-only.

The batches are the engine's (:func:`make_batches`), so the plan shows the order apply follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import UserError
from ..model import Farm, Wave
from .steps import Step

DEFAULT_BATCH_SIZE = 5
T = TypeVar("T")


def wave_of(farm: Farm, wave_id: str) -> Wave:
    wave = next((w for w in farm.spec.waves if w.id == str(wave_id)), None)
    if wave is None:
        raise UserError(f"no wave {wave_id!r} in {farm.file}; waves: "
                        + ", ".join(w.id for w in farm.spec.waves))
    return wave


def batch_size_for(wave: Wave, batch_size: int | None) -> int:
    """The CLI's --batch-size, else the canary size or 5, whichever is larger."""
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: expected at least 1")
        return batch_size
    return max(wave.canary, DEFAULT_BATCH_SIZE)


def make_batches(items: Sequence[T], canary: int, batch_size: int | None) -> list[list[T]]:
    """The canary batch (the first ``canary`` items, alone), then batches of ``batch_size``
    (default: the canary size or 5, whichever is larger)."""
    size = batch_size if batch_size is not None else max(canary, DEFAULT_BATCH_SIZE)
    if size < 1:
        raise UserError(f"--batch-size {size}: expected at least 1")
    out: list[list[T]] = []
    rest = list(items)
    if canary > 0 and rest:
        out.append(rest[:canary])
        rest = rest[canary:]
    out += [rest[i:i + size] for i in range(0, len(rest), size)]
    return out


@dataclass
class PlanRow:
    uai: str
    name: str
    commune: str
    school_server: str | None
    status: str
    batch: str  # "canary", "2" … or "" when not to be onboarded (live, rolled back)
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step title, what it does)


@dataclass
class WavePlan:
    wave: Wave
    batch_size: int
    rows: list[PlanRow]

    @property
    def step_titles(self) -> list[str]:
        return [t for t, _ in self.rows[0].steps] if self.rows else []


def plan_wave(farm: Farm, wave_id: str, steps: Sequence[Step],
              statuses: dict[str, str] | None = None, batch_size: int | None = None) -> WavePlan:
    """One row per établissement of the wave, in the order apply will take them."""
    wave = wave_of(farm, wave_id)
    statuses = statuses or {}
    etabs = farm.etablissements_of_wave(wave.id)
    to_do = [e for e in etabs if statuses.get(e.uai, "planned") in ("planned", "failed",
                                                                      "onboarding")]
    any_live = any(statuses.get(e.uai) == "live" for e in etabs)
    canary = 0 if any_live else wave.canary
    size = batch_size_for(wave, batch_size)
    label: dict[str, str] = {}
    for n, batch in enumerate(make_batches(to_do, canary, size), 1):
        for e in batch:
            label[e.uai] = "canary" if n == 1 and canary else str(n)
    rows = []
    for e in etabs:
        row = PlanRow(e.uai, e.name, e.commune,
                      e.school_server_host if e.school_server else None,
                      statuses.get(e.uai, "planned"), label.get(e.uai, ""))
        for step in steps:
            if not step.applicable(e):
                row.steps.append((step.title, step.skip_reason(e)))
            else:
                row.steps.append((step.title, step.plan(e)))
        rows.append(row)
    order = {e.uai: i for i, e in enumerate(to_do)}
    rows.sort(key=lambda r: order.get(r.uai, len(order)))
    return WavePlan(wave, size, rows)
