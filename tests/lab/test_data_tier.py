"""The data tier (PostgreSQL, Redis) on the deployed lab, with clients.

No app role exports a database or a Redis user yet, so the site deploy converges both roles
with empty lists. This module gives them one of each, as an app role will (a database and a
Redis user for a consumer host), through playbooks/data.yml with extra variables, and checks:
converge, idempotence and check mode with clients; the verify suites with nothing left "not
verifiable"; reachable from the consumer only (from the containers themselves, passwords on
stdin); the dump commands; and the guards against a broken configuration. It puts the lab back
as the site deploy left it afterwards (lists emptied, test database, role and secrets removed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from entfarm.model import Farm
from entfarm.runner import RunResult, project_root, run_playbook

pytestmark = pytest.mark.lab

ROOT = project_root()
PGPROBE = (ROOT / "roles" / "postgresql" / "verify" / "pgprobe.py").read_text()
REDISPROBE = (ROOT / "roles" / "redis" / "verify" / "redisprobe.py").read_text()
CA = "/usr/local/share/ca-certificates/entfarm-ca.crt"
NAME = "entfarm_labcheck"  # database and PostgreSQL role
REDIS_USER = "entfarm-labcheck"


def _hosts(farm: Farm, service: str) -> list[str]:
    placement = farm.spec.services.get(service)
    return list(placement.hosts) if placement else []


@pytest.fixture(scope="module")
def topology(lab_farm: Farm) -> dict[str, Any]:
    data = _hosts(lab_farm, "postgresql")
    redis = _hosts(lab_farm, "redis")
    if not data or not redis:
        pytest.skip("not verifiable: the lab farm places no postgresql or redis")
    central = [h.name for h in lab_farm.hosts() if not h.etablissement]
    consumer = next((h for h in _hosts(lab_farm, "etherpad") + central
                     if h not in (data[0], redis[0])), None)
    if consumer is None:
        pytest.skip("not verifiable: no central host besides the data hosts")
    others = [h for h in central if h != consumer]
    return {"postgresql": data[0], "redis": redis[0], "consumer": consumer, "others": others}


def _extravars(topology: dict[str, Any]) -> dict[str, Any]:
    return {
        "postgresql__databases": [
            {"name": NAME, "owner": NAME, "hosts": [topology["consumer"]],
             "extensions": ["pg_trgm"]},
        ],
        "redis__clients": [{"name": REDIS_USER, "hosts": [topology["consumer"]]}],
    }


def _describe(result: RunResult) -> str:
    return "\n".join([f"run directory {result.run_dir}"]
                     + [f"{f['host']} | {f['task']}: {f['message']}" for f in result.failures])


def _exec(farm: Farm, host: str, argv: list[str], stdin: str | None = None,
          timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "exec", *(["-i"] if stdin is not None else []), farm.container_name(host),
         *argv],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
    )


def _secret(farm: Farm, *parts: str) -> str:
    return farm.secrets_dir.joinpath(*parts).read_text().strip()


def _cleanup(farm: Farm, topology: dict[str, Any]) -> None:
    result = run_playbook(farm, "playbooks/data.yml", tags="postgresql,redis")
    assert result.exit_code == 0, _describe(result)
    for statement in (f"DROP DATABASE IF EXISTS {NAME}", f"DROP ROLE IF EXISTS {NAME}"):
        _exec(farm, topology["postgresql"],
              ["sh", "-c", f"cd / && runuser -u postgres -- psql -XAtqc '{statement}'"])
    for path in (farm.secrets_dir / "postgresql" / f"{NAME}.password",
                 farm.secrets_dir / "redis" / f"{REDIS_USER}.password"):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def with_clients(deployed_lab: RunResult, lab_farm: Farm,
                 topology: dict[str, Any]) -> Iterator[dict[str, RunResult]]:
    runs: dict[str, RunResult] = {}
    runs["first"] = run_playbook(lab_farm, "playbooks/data.yml", tags="postgresql,redis",
                                 extravars=_extravars(topology))
    try:
        yield runs
    finally:
        _cleanup(lab_farm, topology)


def _run(runs: dict[str, RunResult], key: str, farm: Farm, topology: dict[str, Any],
         **kwargs: Any) -> RunResult:
    if key not in runs:
        runs[key] = run_playbook(farm, "playbooks/data.yml", tags="postgresql,redis",
                                 extravars=_extravars(topology), **kwargs)
    return runs[key]


# -- converge with clients ----------------------------------------------------------------------


def test_converges_with_a_database_and_a_redis_user(with_clients: dict[str, RunResult],
                                                     topology: dict[str, Any]) -> None:
    first = with_clients["first"]
    assert first.exit_code == 0, _describe(first)
    assert first.hosts[topology["postgresql"]].changed > 0


def test_second_converge_with_clients_changes_nothing(
        with_clients: dict[str, RunResult], lab_farm: Farm, topology: dict[str, Any]) -> None:
    second = _run(with_clients, "second", lab_farm, topology)
    assert second.exit_code == 0, _describe(second)
    assert second.changed_hosts == [], f"second converge changed {second.changed_hosts}"


def test_check_mode_with_clients_reports_no_change(
        with_clients: dict[str, RunResult], lab_farm: Farm, topology: dict[str, Any]) -> None:
    check = _run(with_clients, "check", lab_farm, topology, check=True, diff=True)
    assert check.exit_code == 0, _describe(check)
    assert check.changed_hosts == [], f"check mode reports changes on {check.changed_hosts}"


# -- the verify suites, as an auditor runs them -------------------------------------------------


@pytest.mark.parametrize("role", ["postgresql", "redis"])
def test_verify_suite_passes_with_nothing_unverifiable(
        with_clients: dict[str, RunResult], lab_farm: Farm, role: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(lab_farm.inventory_dir), role],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    assert "not verifiable" not in proc.stdout, proc.stdout[-4000:]


# -- PostgreSQL: reachable from its consumer only -----------------------------------------------


def _pg(farm: Farm, client: str, server: str, password: str | None) -> dict[str, Any]:
    argv = ["python3", "-c", PGPROBE, *(["--password-stdin"] if password is not None else []),
            server, "5432", NAME, NAME, CA]
    out = _exec(farm, client, argv, stdin=None if password is None else password + "\n")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_postgresql_consumer_logs_in_over_tls(with_clients: dict[str, RunResult], lab_farm: Farm,
                                              topology: dict[str, Any]) -> None:
    password = _secret(lab_farm, "postgresql", f"{NAME}.password")
    result = _pg(lab_farm, topology["consumer"], topology["postgresql"], password)
    assert result["stage"] == "ok", result
    assert (result["user"], result["database"], result["ssl"]) == (NAME, NAME, "true")
    assert result["tls"] in ("TLSv1.2", "TLSv1.3")


def test_postgresql_refuses_other_hosts_even_with_the_password(
        with_clients: dict[str, RunResult], lab_farm: Farm, topology: dict[str, Any]) -> None:
    password = _secret(lab_farm, "postgresql", f"{NAME}.password")
    for other in topology["others"]:
        result = _pg(lab_farm, other, topology["postgresql"], password)
        assert result["stage"] == "refused" and result["sqlstate"] == "28000", (other, result)


def test_postgresql_refuses_plain_tcp(with_clients: dict[str, RunResult], lab_farm: Farm,
                                      topology: dict[str, Any]) -> None:
    script = (
        "import socket,struct\n"
        f"s=socket.create_connection(({topology['postgresql']!r},5432),timeout=10)\n"
        f"body=struct.pack('!I',196608)+b'user\\0{NAME}\\0database\\0{NAME}\\0\\0'\n"
        "s.sendall(struct.pack('!I',len(body)+4)+body)\n"
        "print(s.recv(512))\n"
    )
    out = _exec(lab_farm, topology["consumer"], ["python3", "-c", script])
    assert "C28000" in out.stdout, out.stdout + out.stderr


# -- Redis: usable by its client only -------------------------------------------------------------


def _redis(farm: Farm, client: str, server: str, user: str | None, password: str | None,
           *commands: str) -> dict[str, Any]:
    argv = ["python3", "-c", REDISPROBE, *(["--password-stdin"] if password is not None else []),
            server, "6379", CA, *([user] if user else []), "--", *commands]
    out = _exec(farm, client, argv, stdin=None if password is None else password + "\n")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    assert "error" not in result, result
    return result


def test_redis_client_works_within_its_prefix_only(with_clients: dict[str, RunResult],
                                                   lab_farm: Farm,
                                                   topology: dict[str, Any]) -> None:
    password = _secret(lab_farm, "redis", f"{REDIS_USER}.password")
    result = _redis(lab_farm, topology["consumer"], topology["redis"], REDIS_USER, password,
                    "PING", f"SET {REDIS_USER}:probe 1 EX 60", f"GET {REDIS_USER}:probe",
                    "GET moodle:probe", "SET other:probe 1", "FLUSHALL", "CONFIG GET dir")
    assert result["auth"] == "OK"
    ping, wrote, read, foreign_read, foreign_write, flush, config = result["replies"]
    assert (ping, wrote, read) == ("PONG", "OK", "1")
    for reply in (foreign_read, foreign_write, flush, config):
        assert str(reply).startswith("-NOPERM"), result


def test_redis_answers_nothing_without_a_password(with_clients: dict[str, RunResult],
                                                  lab_farm: Farm,
                                                  topology: dict[str, Any]) -> None:
    for host in [topology["consumer"], *topology["others"]]:
        result = _redis(lab_farm, host, topology["redis"], None, None, "PING", "GET x")
        assert all(str(r).startswith("-NOAUTH") for r in result["replies"]), (host, result)
        default = _redis(lab_farm, host, topology["redis"], "default", "", "PING")
        assert str(default["auth"]).startswith("-WRONGPASS"), (host, default)


def test_redis_plain_port_closed(with_clients: dict[str, RunResult], lab_farm: Farm,
                                 topology: dict[str, Any]) -> None:
    script = (
        "import socket\n"
        f"s=socket.create_connection(({topology['redis']!r},6379),timeout=10)\n"
        "s.sendall(b'PING\\r\\n')\n"
        "try:\n    print(s.recv(64))\nexcept OSError as e:\n    print('closed', e)\n"
    )
    out = _exec(lab_farm, topology["consumer"], ["python3", "-c", script])
    assert "PONG" not in out.stdout, out.stdout


# -- the dump commands of the backup tier ---------------------------------------------------------


def test_pgdump_writes_a_restorable_dump_per_database(with_clients: dict[str, RunResult],
                                                      lab_farm: Farm,
                                                      topology: dict[str, Any]) -> None:
    host = topology["postgresql"]
    out = _exec(lab_farm, host, ["sh", "-c", "d=$(mktemp -d) && /usr/local/sbin/entfarm-pgdump "
                                             f"-o $d {NAME}"])
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    try:
        dump = next(f for f in files if f.endswith(".dump") and f"/{NAME}-" in f)
        assert any("/globals-" in f for f in files), files
        listing = _exec(lab_farm, host, ["pg_restore", "-l", dump])
        assert listing.returncode == 0, listing.stderr
        assert "EXTENSION - pg_trgm" in listing.stdout, listing.stdout[-800:]
    finally:
        if files:
            _exec(lab_farm, host, ["rm", "-rf", str(Path(files[0]).parent)])


def test_redis_dump_copies_a_fresh_snapshot(with_clients: dict[str, RunResult], lab_farm: Farm,
                                            topology: dict[str, Any]) -> None:
    host = topology["redis"]
    out = _exec(lab_farm, host, ["sh", "-c", "d=$(mktemp -d) && /usr/local/sbin/entfarm-redis-dump"
                                             " -o $d"], timeout=300)
    assert out.returncode == 0, out.stderr
    snapshot = out.stdout.strip()
    try:
        check = _exec(lab_farm, host, ["redis-check-rdb", snapshot])
        assert check.returncode == 0 and "RDB looks OK" in check.stdout, check.stdout[-800:]
    finally:
        _exec(lab_farm, host, ["rm", "-rf", str(Path(snapshot).parent)])


# -- the guards: a broken configuration never reaches the running servers ----------------------


def test_invalid_postgresql_setting_stops_the_play_before_the_reload(
        with_clients: dict[str, RunResult], lab_farm: Farm, topology: dict[str, Any]) -> None:
    extravars = _extravars(topology) | {"postgresql__settings": {"shared_buffers": "lots"}}
    broken = run_playbook(lab_farm, "playbooks/data.yml", tags="postgresql", extravars=extravars)
    try:
        assert broken.exit_code != 0, "an invalid setting was accepted"
        assert any("keeps its running configuration" in f["message"] for f in broken.failures), (
            _describe(broken))
        alive = _exec(lab_farm, topology["postgresql"],
                      ["sh", "-c", "cd / && runuser -u postgres -- psql -XAtqc 'SELECT 1'"])
        assert alive.stdout.strip() == "1", alive.stderr
    finally:
        fixed = run_playbook(lab_farm, "playbooks/data.yml", tags="postgresql",
                             extravars=_extravars(topology))
        assert fixed.exit_code == 0, _describe(fixed)


def test_invalid_redis_directive_never_replaces_the_live_file(
        with_clients: dict[str, RunResult], lab_farm: Farm, topology: dict[str, Any]) -> None:
    host = topology["redis"]
    before = _exec(lab_farm, host, ["sha256sum", "/etc/redis/redis.conf"]).stdout
    extravars = _extravars(topology) | {"redis__settings": {"maxmemory-policy": "sometimes"}}
    broken = run_playbook(lab_farm, "playbooks/data.yml", tags="redis", extravars=extravars)
    assert broken.exit_code != 0, "an invalid directive was accepted"
    assert _exec(lab_farm, host, ["sha256sum", "/etc/redis/redis.conf"]).stdout == before
    ping = _exec(lab_farm, host, ["/usr/local/sbin/entfarm-redis-cli", "PING"])
    assert ping.stdout.strip() == "PONG"


def test_secrets_are_private_to_the_controller_user(with_clients: dict[str, RunResult],
                                                     lab_farm: Farm) -> None:
    for path in [lab_farm.secrets_dir / "postgresql", lab_farm.secrets_dir / "redis",
                 *Path(lab_farm.secrets_dir / "postgresql").glob("*.password"),
                 *Path(lab_farm.secrets_dir / "redis").glob("*.password")]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
