"""Helpers shared by the lab tests that log people in: the AAF-imported accounts (fixture
`imported`), a loopback HTTPS client that presents the public *.test names (Browser), a CAS
client (Cas, fixture `cas`) and docker exec on the lab's hosts.

Test modules import what they use; a module-scoped fixture imported into a test module is that
module's fixture (`from identity_helpers import imported`).
"""

from __future__ import annotations

import csv
import json
import shlex
import ssl
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from entfarm import casclient

# Re-exported: the lab tests and the portal benchmark take them from here with the rest.
from entfarm.casclient import CAS_NS as CAS_NS
from entfarm.casclient import Response as Response
from entfarm.casclient import attributes as attributes
from entfarm.casclient import portal_message as portal_message
from entfarm.casclient import ticket_of as ticket_of
from entfarm.model import Farm, load_farm

ROOT = Path(__file__).resolve().parents[2]


def _directory_container() -> str:
    """The lab container of the directory host, as farm.yml names it (entfarm-<farm>-<host>)."""
    farm = load_farm(ROOT / "inventories" / "lab")
    return farm.container_name(farm.spec.services["directory"].hosts[0])


IDP = _directory_container()
PROFILES = {"élève": "National_ELV", "parent": "National_TUT", "enseignant": "National_ENS"}


def on_host(container: str, command: str, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A shell command inside a lab container (docker exec)."""
    return subprocess.run(
        ["docker", "exec", "-i", container, "sh", "-c", command],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
    )


def on_idp(command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return on_host(IDP, command, stdin)


def read_fact(role: str) -> dict[str, Any]:
    out = on_idp(f"cat /etc/ansible/facts.d/{role}.fact")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def entfarm_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "entfarm.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )


# -- the people: a generated export for the lab's établissements, imported -----------------------


@dataclass(frozen=True)
class Account:
    login: str
    code: str
    profil: str
    uai: str
    display_name: str


def _distributed_accounts(farm: Farm, uais: list[str]) -> dict[str, Account]:
    """login -> account, from every distribution CSV of these UAIs: a login's latest CSV holds
    the code its password was set to (a re-import of the same export distributes nothing)."""
    accounts: dict[str, Account] = {}
    root = farm.state_dir / "aaf" / "distribution"
    paths = sorted((p for uai in uais for p in (root / uai).glob("comptes-*.csv")),
                   key=lambda p: p.name)
    for path in paths:
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                accounts[row["login"]] = Account(
                    row["login"], row["code_activation"], row["profil"], path.parent.name,
                    f"{row['prenom']} {row['nom']}".strip())
    return accounts


@pytest.fixture(scope="module")
def imported(deployed_lab: Any, lab_farm: Farm,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Account]]:
    """Import a small export; the imported accounts per profile label, first wave first."""
    out = tmp_path_factory.mktemp("aaf")
    generated = entfarm_cli("aaf", "generate", str(out), "-i", str(lab_farm.inventory_dir),
                            "--seed", "3", "--eleves-per-college", "10")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    result = entfarm_cli("aaf", "import", str(out), "-i", str(lab_farm.inventory_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    first_wave = lab_farm.spec.waves[0].id
    uais = [e.uai for e in lab_farm.spec.etablissements if e.wave == first_wave]
    uais += [e.uai for e in lab_farm.spec.etablissements if e.wave and e.uai not in uais]
    accounts = _distributed_accounts(lab_farm, uais)
    present = set(ldap_root_search(f"ou=people,{lab_farm.spec.academie.base_dn}",
                                   "(ENTPersonEtat=ACTIF)", "uid").get("uid", []))
    by_profile: dict[str, list[Account]] = {}
    for account in sorted(accounts.values(), key=lambda a: (uais.index(a.uai), a.login)):
        if account.login in present:
            by_profile.setdefault(account.profil, []).append(account)
    for label in PROFILES:
        assert by_profile.get(label), f"no imported {label} with a distributed code"
    return by_profile


def ldap_root_search(base: str, filt: str, *attrs: str) -> dict[str, list[str]]:
    """Attribute values (all entries merged) of a search as root of the directory host."""
    out = on_idp(f"ldapsearch -Q -LLL -o ldif-wrap=no -Y EXTERNAL -H ldapi:/// "
                 f"-b {shlex.quote(base)} {shlex.quote(filt)} " + " ".join(attrs))
    assert out.returncode == 0, out.stderr
    values: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            values.setdefault(key, []).append(value)
    return values


# -- a browser, reaching every *.test name at 127.0.0.1 -----------------------------------------
# The package's CAS client (entfarm/casclient.py, used by the wave gates), pointed at the edge
# published on loopback; the names the tests use are kept.


class Browser(casclient.Browser):
    """Cookies and HTTPS to 127.0.0.1, presenting the URL's name (SNI and Host)."""

    def __init__(self, ctx: ssl.SSLContext, keep_alive: bool = False) -> None:
        super().__init__(ctx, connect_to="127.0.0.1", keep_alive=keep_alive)


class Cas(casclient.CasClient):
    """The lab's CAS; ``validate`` gives the raw ``serviceResponse`` the tests inspect."""

    def __init__(self, portal: str, ctx: ssl.SSLContext) -> None:
        super().__init__(portal, ctx, connect_to="127.0.0.1")

    @property
    def portal(self) -> str:  # https://cas.ent.test:8443/
        return self.base_url

    def validate(self, service: str, ticket: str) -> ET.Element:  # type: ignore[override]
        return self.validate_xml(service, ticket)


@pytest.fixture(scope="module")
def cas(deployed_lab: Any, lab_farm: Farm) -> Cas:
    ca = lab_farm.secrets_dir / "pki" / "ca.crt"
    assert ca.is_file(), f"farm CA certificate missing at {ca}"
    return Cas(str(read_fact("cas")["portal_url"]), ssl.create_default_context(cafile=str(ca)))
