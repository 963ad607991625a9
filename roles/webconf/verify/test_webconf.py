"""Read-only checks of the webconf role, runnable against any inventory.

    pytest roles/webconf/verify --hosts=ansible://all \
        --ansible-inventory=inventories/lab/farm.yml

Addresses, ports and the realm come from /etc/ansible/facts.d/webconf.fact, written by the role.
The TURN checks run on the webconf host itself against its farm address, with coturn's own
client (turnutils_uclient): the shared secret is read from /etc/turnserver.conf inside the
command on the host, never by this suite. An allocation is transient state of the server, not
a change of its configuration; no packet is relayed: the only peers given are in ranges the
server must refuse.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest

from entfarm.verifylib import name_check, q, read_fact, role_suite

CONF = "/etc/turnserver.conf"
# The secret, read on the host by the shell that runs the client.
SECRET = f"\"$(sed -n 's/^static-auth-secret=//p' {CONF})\""
# Peers the relay must refuse: loopback and a private range (never contacted: refused first).
DENIED_PEERS = ["127.0.0.1", "10.255.255.1"]

_hosts_only, fact = role_suite("webconf", group="webconf")


def conf_lines(host: Any) -> list[str]:
    text: str = host.check_output(f"grep -v '^#' {CONF}")
    return [line.strip() for line in text.splitlines() if line.strip()]


def uclient(host: Any, *args: str, secret: str = SECRET, peer: str = "127.0.0.1",
            attempts: int = 1) -> str:
    """turnutils_uclient against the farm address; output (stdout and stderr) for matching.

    With attempts > 1 the client is run again until an allocation is received: its TLS mode
    hangs now and then in its own SSL_connect loop while the server answers every other TLS
    client (coturn issue 376: the test client's TLS support is its weak point).

    Each call authenticates as a user of its own: coturn counts ``user-quota`` per name (the
    part after the REST API timestamp), the client makes two UDP allocations per run and leaves
    them to expire (10 minutes). Under one fixed name, two verification runs within ten minutes
    reached the quota (486 Allocation Quota Reached) and failed for that reason alone.
    """
    if not host.exists("turnutils_uclient"):
        pytest.skip("not verifiable: turnutils_uclient (coturn) is missing on this host")
    user = f"entfarm-verify-{secrets.token_hex(4)}"
    client = (f"timeout 10 turnutils_uclient -v -n 1 -c -u {user} -W {secret} "
              f"-e {q(peer)} {' '.join(args)} 2>&1")
    cmd = host.run(
        f"cd /tmp && for i in $(seq {attempts}); do out=$({client}); "
        "case $out in *'Received relay addr'*) break ;; esac; done; printf '%s\\n' \"$out\""
    )
    out: str = cmd.stdout
    return out


def test_fact_present(host: Any) -> None:
    assert fact(host)["version"], "webconf.fact has no version: the role did not finish"


def test_coturn_running(host: Any) -> None:
    svc = host.service("coturn")
    assert svc.is_running and svc.is_enabled


def test_listens_on_the_farm_address_only(host: Any) -> None:
    data = fact(host)
    ip = data["listening_ip"]
    assert ip not in ("0.0.0.0", "::")
    for port in (data["listening_port"], data["tls_listening_port"]):
        assert host.socket(f"tcp://{ip}:{port}").is_listening, f"not on tcp {ip}:{port}"
        assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert host.socket(f"udp://{ip}:{data['listening_port']}").is_listening


def test_no_admin_cli(host: Any) -> None:
    assert "no-cli" in conf_lines(host)
    assert not host.socket("tcp://127.0.0.1:5766").is_listening


def test_configuration_file_private(host: Any) -> None:
    conf = host.file(CONF)
    assert conf.user == "root" and conf.group == "turnserver"
    assert conf.mode & 0o007 == 0, f"{CONF} readable by everyone: it holds the secret"


def test_rest_api_secret_and_hardening(host: Any) -> None:
    lines = conf_lines(host)
    assert "use-auth-secret" in lines
    secrets = [x for x in lines if x.startswith("static-auth-secret=")]
    assert len(secrets) == 1 and len(secrets[0].split("=", 1)[1]) >= 32
    assert f"realm={fact(host)['realm']}" in lines
    for flag in ("fingerprint", "no-multicast-peers", "no-tlsv1", "no-tlsv1_1", "syslog"):
        assert flag in lines, f"{flag} missing"
    # No static users: credentials only come from the shared secret.
    assert not any(x.startswith(("user=", "lt-cred-mech", "oauth")) for x in lines)


@pytest.mark.parametrize("start", ["10.0.0.0", "172.16.0.0", "192.168.0.0", "127.0.0.0",
                                   "169.254.0.0", "100.64.0.0", "fc00::", "fe80::"])
def test_private_ranges_denied(host: Any, start: str) -> None:
    denied = [x.split("=", 1)[1] for x in conf_lines(host) if x.startswith("denied-peer-ip=")]
    assert any(d.startswith(start + "-") for d in denied), f"{start} range not denied"


def test_tls_chain_verifies_with_the_farm_ca(host: Any) -> None:
    data = fact(host)
    pki = read_fact(host, "pki")
    target = f"{data['listening_ip']}:{data['tls_listening_port']}"
    cmd = host.run(
        f"timeout 15 openssl s_client -connect {q(target)} -CAfile {q(pki['ca'])} "
        f"-verify_return_error {name_check(data['address'])} </dev/null 2>&1"
    )
    assert "Verify return code: 0 (ok)" in cmd.stdout, cmd.stdout[-800:]


def test_tls_1_1_refused(host: Any) -> None:
    data = fact(host)
    target = f"{data['listening_ip']}:{data['tls_listening_port']}"
    cmd = host.run(
        f"timeout 10 openssl s_client -connect {q(target)} -tls1_1 -cipher DEFAULT@SECLEVEL=0 "
        "-brief </dev/null 2>&1"
    )
    assert "Protocol version: TLSv1.1" not in cmd.stdout, "TLS 1.1 was accepted"


def test_allocation_with_the_secret_succeeds(host: Any) -> None:
    data = fact(host)
    out = uclient(host, "-p", str(data["listening_port"]), q(data["listening_ip"]))
    assert re.search(r"Received relay addr: \S+", out), out[-1500:]


def test_allocation_over_tls_with_the_secret_succeeds(host: Any) -> None:
    data = fact(host)
    ca = read_fact(host, "pki")["ca"]
    # By name, so that the client checks the certificate against it.
    out = uclient(host, "-t", "-S", "-E", q(ca), "-p", str(data["tls_listening_port"]),
                  q(data["address"]), attempts=8)
    if not re.search(r"Received relay addr: \S+", out) and not re.search(
            r"error [0-9]{3}|Cannot complete Allocation", out):
        # No TURN answer at all: the client never finished its own TLS set-up (its known hang,
        # see uclient); the TLS listener itself is checked with openssl by the tests above.
        pytest.skip("not verifiable: turnutils_uclient did not complete a TLS exchange in "
                    f"8 attempts: {out[-300:]!r}")
    assert re.search(r"Received relay addr: \S+", out), out[-1500:]
    assert "TLSv1.2" in out or "TLSv1.3" in out


@pytest.mark.parametrize("secret", ["not-the-secret", "''"], ids=["wrong", "empty"])
def test_allocation_without_the_secret_fails(host: Any, secret: str) -> None:
    data = fact(host)
    out = uclient(host, "-p", str(data["listening_port"]), q(data["listening_ip"]),
                  secret=secret)
    assert "Received relay addr" not in out, "an allocation succeeded without the secret"
    assert "Cannot complete Allocation" in out or "error 401" in out, out[-1500:]


@pytest.mark.parametrize("peer", DENIED_PEERS)
def test_relay_to_private_peers_refused(host: Any, peer: str) -> None:
    data = fact(host)
    if peer in data.get("allowed_peer_ips", []):
        pytest.skip(f"not verifiable: {peer} is explicitly allowed (webconf__allowed_peer_ips)")
    out = uclient(host, "-p", str(data["listening_port"]), q(data["listening_ip"]), peer=peer)
    assert re.search(r"Received relay addr: \S+", out), "no allocation to test the peer with"
    assert "403 (Forbidden IP)" in out, f"relaying to {peer} was not refused: {out[-1500:]}"


def test_bigbluebutton_endpoint_answers(host: Any) -> None:
    data = fact(host)
    if not data["bbb_configured"]:
        pytest.skip("not verifiable: no BigBlueButton / Scalelite endpoint configured "
                    "(webconf__bbb_url is empty)")
    url = data["bbb_url"].rstrip("/") + "/"
    cmd = host.run(f"curl -sS --max-time 15 {q(url)}")
    assert cmd.rc == 0, cmd.stderr
    assert "<returncode>SUCCESS</returncode>" in cmd.stdout, cmd.stdout[:500]


def test_portal_tile_exported(host: Any) -> None:
    data = fact(host)
    if not data["bbb_configured"]:
        pytest.skip("not verifiable: no virtual classroom endpoint, so no portal tile")
    tiles = data["portal_tiles"]
    assert [t["label"] for t in tiles] == ["Classe virtuelle"]
    assert tiles[0]["url"].startswith("https://")
    assert set(tiles[0]["profiles"]) == {"enseignant", "eleve", "direction"}
