"""Read-only checks of the pki role, runnable against any inventory.

    pytest roles/pki/verify --hosts='docker://entfarm-lab-edge'

Paths and expected names come from /etc/ansible/facts.d/pki.fact, written by the role.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from entfarm.verifylib import role_suite

FACT = "/etc/ansible/facts.d/pki.fact"


_, fact = role_suite("pki")


def q(path: str) -> str:
    return shlex.quote(path)


def test_fact_present(host: Any) -> None:
    assert host.file(FACT).exists, f"{FACT} missing: the pki role has not run on this host"


def test_files_present(host: Any) -> None:
    data = fact(host)
    for key in ("key", "cert", "fullchain", "ca"):
        assert host.file(data[key]).is_file, f"{key}: {data[key]} missing"


def test_key_not_world_readable(host: Any) -> None:
    data = fact(host)
    key = host.file(data["key"])
    assert key.user == "root"
    assert key.group in (data["key_group"], "root")
    assert key.mode & 0o007 == 0, f"{data['key']} mode {oct(key.mode)}"
    assert key.mode & 0o022 == 0


def test_certificate_matches_key(host: Any) -> None:
    data = fact(host)
    cert_pub = host.check_output(f"openssl x509 -in {q(data['cert'])} -noout -pubkey")
    key_pub = host.check_output(f"openssl pkey -in {q(data['key'])} -pubout")
    assert cert_pub == key_pub


def test_certificate_chains_to_the_ca(host: Any) -> None:
    data = fact(host)
    cmd = host.run(f"openssl verify -CAfile {q(data['ca'])} {q(data['cert'])}")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr


def test_ca_in_system_trust_store(host: Any) -> None:
    data = fact(host)
    # The system bundle, built by update-ca-certificates, must hold the CA.
    cmd = host.run(f"openssl verify -CAfile {q(data['ca_bundle'])} {q(data['cert'])}")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr


def test_fullchain_starts_with_the_certificate(host: Any) -> None:
    data = fact(host)
    fingerprint = "openssl x509 -noout -fingerprint -sha256 -in"
    leaf = host.check_output(f"{fingerprint} {q(data['cert'])}")
    first = host.check_output(f"{fingerprint} {q(data['fullchain'])}")
    assert leaf == first


def test_certificate_names(host: Any) -> None:
    data = fact(host)
    if not data["sans"]:
        pytest.skip("not verifiable: external certificate, its names are not ours to check")
    text = host.check_output(f"openssl x509 -in {q(data['cert'])} -noout -ext subjectAltName")
    present = {
        entry.strip().split(":", 1)[1] for entry in text.splitlines()[-1].split(",") if ":" in entry
    }
    missing = [n for n in data["sans"] if n not in present]
    assert not missing, f"names missing from the certificate: {missing}"


def test_certificate_not_expiring(host: Any) -> None:
    data = fact(host)
    # Valid for at least 14 more days (the role renews 30 days ahead).
    cmd = host.run(f"openssl x509 -in {q(data['cert'])} -noout -checkend {14 * 86400}")
    assert cmd.rc == 0, cmd.stdout


def test_certificate_is_for_tls_servers(host: Any) -> None:
    data = fact(host)
    text = host.check_output(f"openssl x509 -in {q(data['cert'])} -noout -ext extendedKeyUsage")
    assert "TLS Web Server Authentication" in text
