"""The Ansible inventory derived from farm.yml, as ansible-inventory sees it through the plugin
(cwd = repository root, so ansible.cfg enables plugins/inventory/entfarm_farm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from entfarm.inventory import as_json_inventory, farm_vars, groups, host_vars
from entfarm.model import SERVICE_CATALOGUE, load_farm

if TYPE_CHECKING:
    from conftest import FarmCopy

REPO = Path(__file__).resolve().parents[2]
LAB_FARM = REPO / "inventories" / "lab" / "farm.yml"
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"


def ansible_inventory(*args: str, env: dict[str, str] | None = None,
                      ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", **(env or {})}
    full_env.pop("ANSIBLE_CONFIG", None)  # the project's ansible.cfg, found in cwd
    return subprocess.run([str(ANSIBLE_INVENTORY), *args], cwd=REPO, capture_output=True,
                          text=True, env=full_env, timeout=120, check=False)


def plain(value: Any) -> Any:
    """``--list`` JSON without Ansible's unsafe markers (farm.yml values are never templated)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def listed() -> dict[str, Any]:
    result = ansible_inventory("-i", str(LAB_FARM), "--list", "--export")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = plain(json.loads(result.stdout))
    return data


def test_graph_has_a_group_per_service_departement_and_wave() -> None:
    result = ansible_inventory("-i", str(LAB_FARM), "--graph")
    assert result.returncode == 0, result.stderr
    graph = result.stdout
    for group in [*SERVICE_CATALOGUE, "school_server", "central", "departement_036",
                  "departement_045", "wave_1", "wave_2"]:
        assert f"@{group}:" in graph
    assert "Skipping" not in result.stderr  # the yaml plugin did not read farm.yml


def test_list_groups_and_members(listed: dict[str, Any]) -> None:
    for service in SERVICE_CATALOGUE:
        assert service in listed
    assert listed["portal"]["hosts"] == ["portal-1", "portal-2"]
    assert listed["school_server"]["hosts"] == ["se-0360005k", "se-0450040z"]
    assert listed["departement_036"]["hosts"] == ["se-0360005k"]
    assert listed["departement_045"]["hosts"] == ["se-0450040z"]
    assert listed["wave_1"]["hosts"] == ["se-0360005k"]
    assert listed["wave_2"]["hosts"] == ["se-0450040z"]
    assert set(listed["central"]["hosts"]) == {"edge", "idp", "data", "apps", "portal-1",
                                               "portal-2"}


def test_list_group_vars(listed: dict[str, Any]) -> None:
    assert listed["departement_036"]["vars"]["entfarm_departement"]["name"] == "Indre"
    assert listed["departement_045"]["vars"]["entfarm_departement"]["code"] == "045"
    wave = listed["wave_1"]["vars"]
    assert wave["entfarm_wave"] == {"id": "1", "name": "Vague 1 — collèges pilotes",
                                    "canary": 1, "failure_threshold": 0.25}
    assert wave["entfarm_wave_etablissements"] == ["0360005K", "0450022E"]
    all_vars = listed["all"]["vars"]
    assert all_vars["entfarm_farm_name"] == "lab"
    assert all_vars["entfarm_domain"] == "ent.test"
    assert "pad.ent.test" in all_vars["entfarm_public_names"]


def test_list_host_vars(listed: dict[str, Any]) -> None:
    hostvars = listed["_meta"]["hostvars"]
    edge = hostvars["edge"]
    assert edge["ansible_connection"] == "community.docker.docker"
    assert edge["ansible_host"] == "entfarm-lab-edge"
    assert edge["entfarm_host_services"] == ["proxy"]
    assert "cas.ent.test" in edge["entfarm_host_public_names"]
    school = hostvars["se-0360005k"]
    assert school["entfarm_etablissement"]["uai"] == "0360005K"
    assert school["entfarm_address"] == "se-0360005k"


def test_python_view_matches_ansible(listed: dict[str, Any]) -> None:
    farm = load_farm(LAB_FARM)
    static = as_json_inventory(farm)
    assert set(static["_meta"]["hostvars"]) == set(listed["_meta"]["hostvars"])
    assert set(host_vars(farm)) == {h.name for h in farm.hosts()}
    assert groups(farm)["wave_2"]["hosts"] == listed["wave_2"]["hosts"]
    assert farm_vars(farm)["entfarm_farm_kind"] == "lab"


def test_production_host_vars() -> None:
    farm = load_farm(REPO / "inventories" / "example-loiret")
    hostvars = host_vars(farm)
    assert hostvars["edge-1"]["ansible_host"] == "192.0.2.10"
    assert hostvars["edge-1"]["ansible_user"] == "ansible"
    assert hostvars["edge-1"]["ansible_become"] is True
    assert "ansible_connection" not in hostvars["edge-1"]
    school = next(h for h in farm.hosts() if h.etablissement)
    assert hostvars[school.name]["ansible_host"] == "198.51.100.11"


def _broken(lab_copy: FarmCopy) -> FarmCopy:
    return lab_copy.replace("uai: 0360010R", "uai: 0360010A")


def test_plugin_fails_with_the_located_message(lab_copy: FarmCopy) -> None:
    # The plugin alone, failing hard when the source does not parse.
    _broken(lab_copy)
    result = ansible_inventory(
        "-i", str(lab_copy.file), "--graph",
        env={"ANSIBLE_INVENTORY_ENABLED": "entfarm_farm", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"})
    assert result.returncode != 0
    line = lab_copy.line_of("uai: 0360010A")
    assert f"{lab_copy.file}:{line}: etablissements[1].uai: '0360010A'" in result.stderr


def test_invalid_farm_fails_ansible_inventory_with_project_config(lab_copy: FarmCopy) -> None:
    _broken(lab_copy)
    result = ansible_inventory("-i", str(lab_copy.file), "--graph")
    assert result.returncode != 0
    line = lab_copy.line_of("uai: 0360010A")
    assert f"{lab_copy.file}:{line}: etablissements[1].uai: '0360010A'" in result.stderr
