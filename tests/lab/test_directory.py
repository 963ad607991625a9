"""The ENT directory on the deployed lab, seen from the controller through docker exec."""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Any

import pytest
from identity_helpers import IDP

from entfarm.model import Farm

pytestmark = pytest.mark.lab

# The directory host's container, as farm.yml names it.
HOST = IDP


def on_idp(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "exec", HOST, "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def directory(deployed_lab: Any) -> dict[str, Any]:
    out = on_idp("cat /etc/ansible/facts.d/directory.fact /etc/ansible/facts.d/pki.fact")
    assert out.returncode == 0, out.stderr
    decoder = json.JSONDecoder()
    fact, end = decoder.raw_decode(out.stdout)
    pki, _ = decoder.raw_decode(out.stdout[end:].lstrip())
    fact["ca"] = pki["ca"]
    return dict(fact)


def as_service(
    directory: dict[str, Any], farm: Farm, account: str, uri: str, args: str, starttls: bool
) -> subprocess.CompletedProcess[str]:
    secret = farm.secrets_dir / "directory" / f"{account}.password"
    password = secret.read_text().strip()
    dn = directory["services"][account]
    command = (
        f"LDAPTLS_CACERT={shlex.quote(directory['ca'])} ldapsearch -x {'-ZZ ' if starttls else ''}"
        f"-H {shlex.quote(uri)} -D {shlex.quote(dn)} -y /dev/stdin -LLL {args}"
    )
    return subprocess.run(
        ["docker", "exec", "-i", HOST, "sh", "-c", command],
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_anonymous_search_refused(directory: dict[str, Any]) -> None:
    base = shlex.quote(directory["base_dn"])
    for bind in ("-x", ""):
        out = on_idp(f"ldapsearch {bind} -LLL -H ldap://localhost/ -b {base} '(objectClass=*)' dn")
        assert out.returncode != 0, "anonymous search was not refused"
        assert "dn:" not in out.stdout


@pytest.mark.parametrize("transport", ["ldaps", "starttls"])
def test_cas_account_reads_people_but_not_passwords(
    directory: dict[str, Any], lab_farm: Farm, transport: str
) -> None:
    uri = directory["uri"] if transport == "ldaps" else directory["uri_starttls"]
    base = directory["base_dn"]
    people = as_service(
        directory, lab_farm, "cas", uri, f"-b ou=people,{base} -s base dn", transport == "starttls"
    )
    assert people.returncode == 0, people.stderr
    assert f"dn: ou=people,{base}" in people.stdout.replace("\n ", "")
    hashes = as_service(
        directory,
        lab_farm,
        "cas",
        uri,
        f"-b {base} '(objectClass=*)' userPassword ENTPersonCodeActivation",
        transport == "starttls",
    )
    assert hashes.returncode in (0, 4), hashes.stderr
    assert "userPassword" not in hashes.stdout
    assert "ENTPersonCodeActivation" not in hashes.stdout


def test_simple_bind_in_clear_refused(directory: dict[str, Any], lab_farm: Farm) -> None:
    out = as_service(directory, lab_farm, "cas", directory["uri_starttls"], "-b '' -s base", False)
    assert out.returncode != 0, "a simple bind without TLS was accepted"
