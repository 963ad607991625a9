"""Read-only checks of the redis role, runnable against any inventory.

    pytest roles/redis/verify --hosts=ansible://all \
        --ansible-inventory=inventories/lab/farm.yml

ACL users and their client hosts come from /etc/ansible/facts.d/redis.fact, written by the role.
The server is inspected as root over its Unix socket (entfarm-redis-cli, the administration
user); clients are checked from their own hosts (through the same inventory) with
redisprobe.py, a Redis client made of Python's standard library, and only read commands.

Redis cannot refuse a connection by the client's address: what keeps a host that is not a
client out is that it holds no password (the default user is disabled). The checks say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from entfarm.verifylib import inventory_vars, name_check, other_host, q, read_fact, role_suite

PROBE = (Path(__file__).parent / "redisprobe.py").read_text()
CLI = "/usr/local/sbin/entfarm-redis-cli"

_hosts_only, fact = role_suite("redis", group="redis")


def admin(host: Any, command: str) -> str:
    out: str = host.check_output(f"{CLI} {command}")
    return out


def probe(client: Any, server: dict[str, Any], commands: list[str], user: str | None = None,
          password: str | None = None) -> dict[str, Any]:
    ca = read_fact(client, "pki")["ca"]
    args = " ".join(q(a) for a in (server["address"], server["tls_port"], ca))
    if user is not None:
        args += f" {q(user)}"
    words = " ".join(q(c) for c in commands)
    if password is None:
        cmd = client.run(f"python3 -c {q(PROBE)} {args} -- {words}")
    else:
        cmd = client.run(f"printf '%s\\n' {q(password)} | python3 -c {q(PROBE)} "
                         f"--password-stdin {args} -- {words}")
    assert cmd.rc == 0, f"redisprobe failed on the client: {cmd.stderr[-500:]}"
    result: dict[str, Any] = json.loads(cmd.stdout)
    assert "error" not in result, result["error"]
    return result


def password_of(host: Any, user: str) -> str:
    secrets = inventory_vars(host).get("entfarm_secrets_dir")
    path = Path(str(secrets)) / "redis" / f"{user}.password" if secrets else None
    if path is None or not path.is_file():
        pytest.skip("not verifiable: the Redis passwords are not on this controller")
    return path.read_text().strip()


def clients(host: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = fact(host)["clients"]
    if not found:
        pytest.skip("not verifiable: no Redis client on this server (no app exports one)")
    return found


def client_hosts(host: Any) -> list[tuple[dict[str, Any], str]]:
    known = set(inventory_vars(host)["groups"].get("all", []))
    pairs = [(c, h) for c in clients(host) for h in c["hosts"] if h in known]
    if not pairs:
        pytest.skip("not verifiable: the Redis clients are not hosts of this inventory")
    return pairs


def own_prefix(client: dict[str, Any]) -> str:
    keys = [r[1:] for r in client["rules"].split() if r.startswith("~")]
    return keys[0].rstrip("*") if keys else f"{client['name']}:"


# -- the server ----------------------------------------------------------------------------


def test_fact_present(host: Any) -> None:
    assert fact(host)["version"], "redis.fact has no version: the role did not finish"


def test_redis_running(host: Any) -> None:
    svc = host.service("redis-server")
    assert svc.is_running and svc.is_enabled
    assert admin(host, "PING") == "PONG"


def test_tls_only_on_loopback_and_farm_address(host: Any) -> None:
    data = fact(host)
    port = data["tls_port"]
    assert admin(host, "CONFIG GET port").splitlines()[-1] == "0", "the plain TCP port is open"
    assert admin(host, "CONFIG GET tls-port").splitlines()[-1] == str(port)
    assert "0.0.0.0" not in data["listen_addresses"]
    for address in data["listen_addresses"]:
        assert host.socket(f"tcp://{address}:{port}").is_listening, f"not on {address}:{port}"
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert not host.socket(f"tcp://:::{port}").is_listening


def test_plain_text_gets_no_answer(host: Any) -> None:
    data = fact(host)
    cmd = host.run(
        "python3 -c " + q(
            "import socket,sys\n"
            f"s=socket.create_connection(({data['address']!r},{data['tls_port']}),timeout=5)\n"
            "s.sendall(b'PING\\r\\n')\n"
            "try:\n    print(s.recv(64))\nexcept OSError as e:\n    print('closed', e)\n"
        )
    )
    assert "PONG" not in cmd.stdout, "Redis answered a plain-text PING"


def test_served_certificate_is_the_pki_certificate(host: Any) -> None:
    data = fact(host)
    pki = read_fact(host, "pki")
    target = f"{data['address']}:{data['tls_port']}"
    cmd = host.run(
        f"openssl s_client -connect {q(target)} -CAfile {q(pki['ca'])} -verify_return_error "
        f"{name_check(data['address'])} </dev/null 2>&1"
    )
    assert cmd.rc == 0 and "Verify return code: 0 (ok)" in cmd.stdout, cmd.stdout[-800:]
    served = host.run(
        f"openssl s_client -connect {q(target)} </dev/null 2>/dev/null"
        " | openssl x509 -noout -fingerprint -sha256"
    )
    assert served.stdout.strip().split("=", 1)[-1].lower() == str(pki["fingerprint_sha256"]).lower()


def test_tls_1_1_refused(host: Any) -> None:
    data = fact(host)
    cmd = host.run(
        f"openssl s_client -connect {q(data['address'] + ':' + str(data['tls_port']))} "
        "-tls1_1 -cipher DEFAULT@SECLEVEL=0 </dev/null 2>&1"
    )
    assert cmd.rc != 0 or "Cipher is (NONE)" in cmd.stdout, "TLS 1.1 was accepted"


def test_default_user_disabled(host: Any) -> None:
    rules = admin(host, "ACL LIST").splitlines()
    default = [r for r in rules if r.startswith("user default ")]
    assert default and " off " in f"{default[0]} ", f"default user: {default}"
    assert not any("nopass" in r.split() for r in rules), "a user without password"


def test_each_client_is_kept_to_its_prefix(host: Any) -> None:
    rules = {r.split()[1]: r for r in admin(host, "ACL LIST").splitlines()}
    for client in clients(host):
        live = rules.get(client["name"])
        assert live is not None, f"ACL user {client['name']} missing"
        words = live.split()
        assert "on" in words
        keys = [w for w in words if w.startswith("~") or w == "allkeys"]
        assert keys and "~*" not in keys and "allkeys" not in keys, live
        assert keys == [r for r in client["rules"].split() if r.startswith("~")], live
        flush = host.run(f"{CLI} ACL DRYRUN {q(client['name'])} FLUSHALL")
        assert "OK" not in flush.stdout, f"{client['name']} may FLUSHALL"


def test_dump_command_and_timer(host: Any) -> None:
    dump = fact(host)["dump"]
    script = host.file(dump["command"])
    assert script.is_file and script.user == "root" and script.mode & 0o100
    assert host.file(dump["dir"]).is_directory
    assert host.file(dump["dir"]).mode & 0o077 == 0, "snapshots readable beyond root"
    timer = host.service(dump["timer"])
    assert timer.is_enabled and timer.is_running
    assert admin(host, "CONFIG GET dir").splitlines()[-1]


def test_admin_password_file_private(host: Any) -> None:
    secret = host.file("/etc/entfarm/redis-admin.secret")
    assert secret.is_file and secret.user == "root" and secret.mode & 0o077 == 0


# -- reachable by its clients only ----------------------------------------------------------


def test_client_host_without_password_gets_nothing(host: Any) -> None:
    server = fact(host)
    for _client, name in client_hosts(host):
        result = probe(other_host(host, name), server, ["PING", "GET entfarm:verify"])
        assert result["tls"] in ("TLSv1.2", "TLSv1.3")
        assert all(str(r).startswith("-NOAUTH") for r in result["replies"]), result


def test_client_reads_its_keys_only(host: Any) -> None:
    server = fact(host)
    for client, name in client_hosts(host):
        password = password_of(host, client["name"])
        other = next((own_prefix(c) for c in clients(host) if c["name"] != client["name"]),
                     "entfarm-verify-elsewhere:")
        result = probe(other_host(host, name), server,
                       ["PING", "ACL WHOAMI", f"GET {own_prefix(client)}entfarm-verify",
                        f"GET {other}entfarm-verify"],
                       user=client["name"], password=password)
        assert result["auth"] == "OK", f"{client['name']} from {name}: {result['auth']}"
        ping, whoami, own, foreign = result["replies"]
        assert (ping, whoami) == ("PONG", client["name"])
        assert own is None or not str(own).startswith("-"), own
        assert str(foreign).startswith("-NOPERM"), f"{client['name']} read {other}*: {foreign}"


def test_wrong_password_refused(host: Any) -> None:
    server = fact(host)
    client, name = client_hosts(host)[0]
    result = probe(other_host(host, name), server, ["PING"], user=client["name"],
                   password="not-the-password")
    assert str(result["auth"]).startswith("-WRONGPASS"), result


def test_other_farm_hosts_cannot_use_redis(host: Any) -> None:
    """Central hosts that are no client of Redis: TLS connects (Redis cannot filter by
    address), but without a password nothing is answered, and the default user is off."""
    server = fact(host)
    allowed = {h for c in clients(host) for h in c["hosts"]}
    others = [n for n in inventory_vars(host)["groups"].get("central", []) if n not in allowed]
    if not others:
        pytest.skip("not verifiable: every central host is a Redis client")
    for name in others:
        result = probe(other_host(host, name), server, ["PING", "GET entfarm:verify"],
                       user="default", password="")
        assert str(result["auth"]).startswith("-WRONGPASS"), f"from {name}: {result}"
        assert all(str(r).startswith("-NOAUTH") for r in result["replies"]), f"from {name}"
