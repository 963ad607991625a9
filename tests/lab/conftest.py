"""Lab tests run on real systemd containers. The session starts from fresh hosts (lab reset)
so that the first deploy really converges them; set ENTFARM_LAB_KEEP=1 to reuse the running lab
while developing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from entfarm.model import Farm, load_farm

ROOT = Path(__file__).resolve().parents[2]
LAB_INVENTORY = ROOT / "inventories" / "lab"


@pytest.fixture(scope="session")
def lab_farm() -> Farm:
    return load_farm(LAB_INVENTORY)


@pytest.fixture(scope="session", autouse=True)
def fresh_lab(lab_farm: Farm) -> Iterator[None]:
    from entfarm import lab

    if os.environ.get("ENTFARM_LAB_KEEP") == "1":
        lab.up(lab_farm, progress=print)
    else:
        lab.reset(lab_farm, progress=print)
    yield
