"""The farm model: what derives from farm.yml (hosts, groups' inputs, public names), the committed
JSON Schema, and the example inventories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from entfarm.model import (
    SCHOOL_SERVER_GROUP,
    SERVICE_CATALOGUE,
    Farm,
    json_schema,
    load_farm,
    schema_text,
)
from entfarm.uai import is_valid_uai

if TYPE_CHECKING:
    from conftest import FarmCopy

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab"
LOIRET = REPO / "inventories" / "example-loiret"


@pytest.fixture(scope="module")
def lab() -> Farm:
    return load_farm(LAB)


def test_lab_farm_validates(lab: Farm) -> None:
    assert lab.name == "lab" and lab.kind == "lab"
    assert lab.file == LAB / "farm.yml"
    assert [d.code for d in lab.spec.departements] == ["036", "045"]
    assert [w.id for w in lab.spec.waves] == ["1", "2"]


def test_load_farm_accepts_the_file_itself() -> None:
    assert load_farm(LAB / "farm.yml").inventory_dir == LAB


def test_hosts_are_declared_hosts_then_school_servers(lab: Farm) -> None:
    hosts = {h.name: h for h in lab.hosts()}
    assert list(hosts) == ["edge", "idp", "data", "apps", "portal-1", "portal-2",
                           "se-0360005k", "se-0450040z"]
    assert hosts["idp"].services == ("directory", "cas")
    assert hosts["se-0360005k"].services == (SCHOOL_SERVER_GROUP,)
    assert hosts["se-0360005k"].etablissement == "0360005K"
    assert hosts["edge"].etablissement is None
    # an établissement without school_server has no host
    assert "se-0360010r" not in hosts


def test_school_server_takes_declared_address_and_replicas(lab_copy: FarmCopy) -> None:
    lab_copy.replace("  - name: portal-2",
                     "  - name: portal-2\n  - name: se-0360005k\n    address: 198.51.100.5")
    lab_copy.replace("  directory:\n    hosts: [idp]",
                     "  directory:\n    hosts: [idp]\n    replicas: [se-0360005k]")
    farm = load_farm(lab_copy.dir)
    hosts = {h.name: h for h in farm.hosts()}
    assert len([h for h in farm.hosts() if h.name == "se-0360005k"]) == 1
    school = hosts["se-0360005k"]
    assert school.address == "198.51.100.5"
    assert school.services == (SCHOOL_SERVER_GROUP, "directory")
    assert school.etablissement == "0360005K"


def test_public_names(lab: Farm) -> None:
    assert lab.public_names("cas") == ["cas.ent.test"]
    assert lab.public_names("portal") == ["portail.ent.test", "indre.ent.test", "loiret.ent.test"]
    assert lab.public_names("postgresql") == []
    services = lab.public_services()
    assert set(services) == {"cas", "portal", "etherpad", "moodle", "nextcloud", "onlyoffice"}
    assert services["portal"]["backends"] == ["portal-1", "portal-2"]
    assert services["etherpad"] == {"names": ["pad.ent.test"], "backends": ["apps"], "port": 9001}
    assert len(lab.all_public_names()) == len(set(lab.all_public_names())) == 8


def test_public_name_override(lab_copy: FarmCopy) -> None:
    lab_copy.replace("  etherpad:\n    hosts: [apps]",
                     "  etherpad:\n    hosts: [apps]\n    public_name: pads")
    assert load_farm(lab_copy.dir).public_names("etherpad") == ["pads.ent.test"]


def test_container_name_and_lab_defaults(lab: Farm, lab_copy: FarmCopy) -> None:
    assert lab.container_name("edge") == "entfarm-lab-edge"
    assert lab.lab.publish.https == 8443
    text = lab_copy.text
    lab_copy.file.write_text(text[: text.index("\nlab:")] + "\n", encoding="utf-8")
    farm = load_farm(lab_copy.dir)
    assert farm.spec.lab is None and farm.lab.network == "entfarm-lab"


def test_numbers_are_taken_as_written(lab_copy: FarmCopy) -> None:
    # 4.10 is not 4.1; an unquoted 2 is the wave "2".
    lab_copy.replace('debian: "12"', "debian: 12\n  moodle: 4.10")
    lab_copy.replace('id: "2"', "id: 2")
    farm = load_farm(lab_copy.dir)
    assert farm.spec.versions == {"debian": "12", "moodle": "4.10"}
    assert [w.id for w in farm.spec.waves] == ["1", "2"]
    assert farm.spec.waves[0].failure_threshold == 0.25


def test_every_catalogue_service_placed_in_lab(lab: Farm) -> None:
    assert set(lab.spec.services) == set(SERVICE_CATALOGUE)


# -- the JSON Schema ----------------------------------------------------------------------


def test_committed_schema_is_generated_from_the_model() -> None:
    committed = (REPO / "schema" / "farm.schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), (
        "schema/farm.schema.json is stale: entfarm schema > "
        "schema/farm.schema.json")


def test_schema_command_prints_the_committed_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "entfarm.cli", "schema"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out == schema_text()


def test_schema_accepts_the_examples_and_knows_the_rules() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for inventory in (LAB, LOIRET):
        jsonschema.validate(yaml.safe_load((inventory / "farm.yml").read_text()), schema)
    assert schema["properties"]["services"]["propertyNames"]["enum"] == list(SERVICE_CATALOGUE)
    assert schema["$defs"]["Etablissement"]["properties"]["uai"]["pattern"] == "^[0-9]{7}[A-Z]$"
    assert schema["$defs"]["Etablissement"]["additionalProperties"] is False


def test_lab_farm_references_the_schema() -> None:
    first = (LAB / "farm.yml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=../../schema/farm.schema.json"
    target = (LAB / "../../schema/farm.schema.json").resolve()
    assert json.loads(target.read_text())["title"] == "entfarm farm.yml"


# -- the Loiret example -------------------------------------------------------------------


def test_loiret_example_validates() -> None:
    farm = load_farm(LOIRET)
    spec = farm.spec
    assert farm.kind == "production"
    assert [d.code for d in spec.departements] == ["045"]
    assert len(spec.etablissements) == 57
    assert all(is_valid_uai(e.uai) and e.uai.startswith("045") for e in spec.etablissements)
    assert len({e.uai for e in spec.etablissements}) == 57
    assert [len(farm.etablissements_of_wave(w.id)) for w in spec.waves] == [6, 15, 36]
    assert all(w.canary >= 1 and 0 < w.failure_threshold < 1 for w in spec.waves)
    assert spec.farm.apt_mirror and spec.farm.ntp_servers
    for host in spec.hosts:
        assert host.address and host.address.startswith(("192.0.2.", "198.51.100."))
    schools = [h for h in farm.hosts() if h.etablissement]
    assert len(schools) == 21
    assert all(h.name == f"se-{h.etablissement.lower()}" for h in schools if h.etablissement)
