"""Lab tests run on real systemd containers. The session starts from fresh hosts (lab reset)
so that the first deploy really converges them; set ENTFARM_LAB_KEEP=1 to reuse the running lab
while developing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from entfarm.model import Farm, load_farm
from entfarm.runner import RunResult, run_playbook

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


@pytest.fixture(scope="session")
def deployed_lab(lab_farm: Farm, fresh_lab: None) -> RunResult:
    """The first deploy of the session (playbooks/site.yml on every lab host); it must succeed.

    The artifact store is built first (the portal's wheelhouse, from this checkout): the deploy
    checks it before any host changes. A rebuild with unchanged sources changes nothing."""
    from entfarm import artifacts

    outcomes = artifacts.build(lab_farm, progress=print)
    assert all(o.action in ("built", "updated", "unchanged") for o in outcomes), outcomes
    result = run_playbook(lab_farm)
    details = "\n".join(f"{f['host']} | {f['task']}: {f['message']}" for f in result.failures)
    assert result.exit_code == 0, f"deploy failed, run directory {result.run_dir}\n{details}"
    return result


_MODULE_ORDER = ("test_lab.py", "test_site_deploy.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lab's own tests recreate hosts, so they run before the first deploy; the deploy and
    idempotence tests come next; the service tests, which use the deployed lab, after them."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _MODULE_ORDER.index(name) if name in _MODULE_ORDER else len(_MODULE_ORDER)

    items.sort(key=rank)  # stable: keeps the order within a module
