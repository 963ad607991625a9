"""Read-only checks of the postgresql role, runnable against any inventory.

    pytest roles/postgresql/verify --hosts=ansible://all \
        --ansible-inventory=inventories/lab/farm.yml

Databases, owners and client hosts come from /etc/ansible/facts.d/postgresql.fact, written by
the role. "Reachable from its consumers only" is checked from the hosts themselves (through the
same inventory), with pgprobe.py, a PostgreSQL client made of Python's standard library:
a consumer host gets a SCRAM-SHA-256 challenge, other hosts of the farm are refused by
pg_hba.conf before any password, and with the service's password from the controller's secrets
directory the consumer logs in over TLS. Nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from entfarm.verifylib import inventory_vars, name_check, other_host, q, read_fact, role_suite

PROBE = (Path(__file__).parent / "pgprobe.py").read_text()
PSQL = "cd / && runuser -u postgres -- psql -XAtq -d postgres -c"

_hosts_only, fact = role_suite("postgresql", group="postgresql")


def sql(host: Any, query: str) -> str:
    out: str = host.check_output(f"{PSQL} {q(query)}")
    return out


def probe(client: Any, server: dict[str, Any], user: str, database: str,
          password: str | None = None) -> dict[str, Any]:
    """Run pgprobe.py on the client host against the server's farm address."""
    ca = read_fact(client, "pki")["ca"]
    args = " ".join(q(a) for a in (server["address"], server["port"], user, database, ca))
    if password is None:
        cmd = client.run(f"python3 -c {q(PROBE)} {args}")
    else:
        cmd = client.run(
            f"printf '%s\\n' {q(password)} | python3 -c {q(PROBE)} --password-stdin {args}"
        )
    assert cmd.rc == 0, f"pgprobe failed on the client: {cmd.stderr[-500:]}"
    result: dict[str, Any] = json.loads(cmd.stdout)
    return result


def password_of(host: Any, owner: str) -> str:
    secrets = inventory_vars(host).get("entfarm_secrets_dir")
    path = Path(str(secrets)) / "postgresql" / f"{owner}.password" if secrets else None
    if path is None or not path.is_file():
        pytest.skip("not verifiable: the role passwords are not on this controller")
    return path.read_text().strip()


def client_entries(host: Any) -> list[dict[str, Any]]:
    """pg_hba.conf entries whose client is an inventory host."""
    entries = [e for e in fact(host)["hba"] if e["addresses"]]
    if not entries:
        pytest.skip("not verifiable: no database client on this server (no app exports one)")
    known = set(inventory_vars(host)["groups"].get("all", []))
    entries = [e for e in entries if e["host"] in known]
    if not entries:
        pytest.skip("not verifiable: the database clients are not hosts of this inventory")
    return entries


# -- the server ----------------------------------------------------------------------------


def test_fact_present(host: Any) -> None:
    data = fact(host)
    assert data["version"], "postgresql.fact has no version: the role did not finish"


def test_cluster_running(host: Any) -> None:
    unit = host.service(fact(host)["unit"])
    assert unit.is_running
    assert unit.is_enabled
    assert sql(host, "SELECT 1") == "1"


def test_listens_on_loopback_and_farm_address_only(host: Any) -> None:
    data = fact(host)
    port = data["port"]
    assert "0.0.0.0" not in data["listen_addresses"] and "*" not in data["listen_addresses"]
    assert sql(host, "SHOW listen_addresses") == ",".join(data["listen_addresses"])
    for address in data["listen_addresses"]:
        assert host.socket(f"tcp://{address}:{port}").is_listening, f"not on {address}:{port}"
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert not host.socket(f"tcp://:::{port}").is_listening


def test_configuration_files_valid(host: Any) -> None:
    data = fact(host)
    conf = f"/etc/postgresql/{data['major']}/{data['cluster']}/postgresql.conf"
    datadir = sql(host, "SHOW data_directory")
    check = host.run(
        f"cd / && runuser -u postgres -- /usr/lib/postgresql/{data['major']}/bin/postgres "
        f"-D {q(datadir)} -c config_file={q(conf)} -C data_directory"
    )
    assert check.rc == 0, check.stderr
    errors = sql(host, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL")
    assert errors == "0", "pg_hba.conf has lines PostgreSQL rejects"


def test_nothing_waits_for_a_restart(host: Any) -> None:
    assert sql(host, "SELECT string_agg(name, ',') FROM pg_settings WHERE pending_restart") == ""


def test_tls_and_scram_settings(host: Any) -> None:
    assert sql(host, "SHOW ssl") == "on"
    assert sql(host, "SHOW password_encryption") == "scram-sha-256"
    assert sql(host, "SHOW ssl_min_protocol_version") in ("TLSv1.2", "TLSv1.3")


def test_pg_hba_accepts_tcp_only_over_tls_with_scram(host: Any) -> None:
    rows = sql(host, "SELECT type, array_to_string(database, ','), "
                     "array_to_string(user_name, ','), auth_method "
                     "FROM pg_hba_file_rules ORDER BY line_number")
    for line in rows.splitlines():
        kind, database, user, method = line.split("|")
        if kind == "local":
            assert (user, method) in (("postgres", "peer"), ("all", "reject")), line
        elif kind == "hostssl":
            assert method == "scram-sha-256", line
            assert "all" not in (database, user), f"a TLS rule open to every {line}"
        else:  # host, hostnossl …: only refusals
            assert method == "reject", f"a non-TLS rule that accepts: {line}"
    last = rows.splitlines()[-1].split("|")
    assert last[-1] == "reject", "pg_hba.conf does not end by refusing everything else"


def test_served_certificate_is_the_pki_certificate(host: Any) -> None:
    data = fact(host)
    pki = read_fact(host, "pki")
    target = f"{data['address']}:{data['port']}"
    cmd = host.run(
        f"openssl s_client -starttls postgres -connect {q(target)} -CAfile {q(pki['ca'])} "
        f"-verify_return_error {name_check(data['address'])} </dev/null 2>&1"
    )
    assert cmd.rc == 0 and "Verify return code: 0 (ok)" in cmd.stdout, cmd.stdout[-800:]
    served = host.run(
        f"openssl s_client -starttls postgres -connect {q(target)} </dev/null 2>/dev/null"
        " | openssl x509 -noout -fingerprint -sha256"
    )
    fingerprint = served.stdout.strip().split("=", 1)[-1].lower()
    assert fingerprint == str(pki["fingerprint_sha256"]).lower()


def test_tls_1_1_refused(host: Any) -> None:
    data = fact(host)
    target = f"{data['address']}:{data['port']}"
    cmd = host.run(
        f"openssl s_client -starttls postgres -connect {q(target)} -tls1_1 "
        "-cipher DEFAULT@SECLEVEL=0 </dev/null 2>&1"
    )
    assert cmd.rc != 0 or "Cipher is (NONE)" in cmd.stdout, "TLS 1.1 was accepted"


def test_databases_belong_to_their_owner_only(host: Any) -> None:
    databases = fact(host)["databases"]
    if not databases:
        pytest.skip("not verifiable: no database on this server (no app exports one)")
    for db in databases:
        row = sql(host, "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), "
                        f"coalesce(array_to_string(datacl, ','), '') FROM pg_database "
                        f"WHERE datname = '{db['name']}'")
        assert row, f"database {db['name']} missing"
        owner, encoding, acl = row.split("|")
        assert owner == db["owner"]
        assert encoding == "UTF8"
        # No "=c…" entry: PUBLIC may not connect (nor create temporary tables).
        assert not any(entry.startswith("=") for entry in acl.split(",") if entry), acl
        role = sql(host, "SELECT rolsuper, rolcreaterole, rolcreatedb, rolcanlogin, rolbypassrls "
                         f"FROM pg_roles WHERE rolname = '{db['owner']}'")
        assert role == "f|f|f|t|f", f"role {db['owner']}: {role}"


def test_extensions_present(host: Any) -> None:
    wanted = [(db["name"], ext) for db in fact(host)["databases"]
              for ext in db.get("extensions", [])]
    if not wanted:
        pytest.skip("not verifiable: no extension asked for")
    for database, extension in wanted:
        out = host.check_output(
            f"cd / && runuser -u postgres -- psql -XAtq -d {q(database)} -c "
            + q(f"SELECT count(*) FROM pg_extension WHERE extname = '{extension}'")
        )
        assert out == "1", f"extension {extension} missing from {database}"


def test_dump_command_and_timer(host: Any) -> None:
    dump = fact(host)["dump"]
    script = host.file(dump["command"])
    assert script.is_file and script.user == "root" and script.mode & 0o100
    assert not script.mode & 0o002
    assert host.file(dump["dir"]).is_directory
    assert host.file(dump["dir"]).mode & 0o077 == 0, "dumps readable beyond root"
    timer = host.service(dump["timer"])
    assert timer.is_enabled and timer.is_running


# -- reachable from its consumers only ------------------------------------------------------


def test_consumer_hosts_are_asked_for_their_password(host: Any) -> None:
    server = fact(host)
    for entry in client_entries(host):
        result = probe(other_host(host, entry["host"]), server, entry["user"], entry["database"])
        assert result["stage"] == "authentication", f"from {entry['host']}: {result}"
        assert "SCRAM-SHA-256" in result["mechanisms"]
        assert result["tls"] in ("TLSv1.2", "TLSv1.3")


def test_consumer_logs_in_over_tls_with_its_password(host: Any) -> None:
    server = fact(host)
    for entry in client_entries(host):
        password = password_of(host, entry["user"])
        result = probe(other_host(host, entry["host"]), server, entry["user"],
                       entry["database"], password)
        assert result["stage"] == "ok", (
            f"{entry['user']}@{entry['database']} from {entry['host']}: "
            f"{result.get('sqlstate')} {result.get('error')}"
        )
        assert (result["user"], result["database"]) == (entry["user"], entry["database"])
        assert result["ssl"] == "true"


def test_consumer_is_refused_a_wrong_password(host: Any) -> None:
    server = fact(host)
    entry = client_entries(host)[0]
    result = probe(other_host(host, entry["host"]), server, entry["user"], entry["database"],
                   "not-the-password")
    assert result["stage"] == "refused" and result["sqlstate"] == "28P01", result


def test_other_farm_hosts_are_refused_by_pg_hba(host: Any) -> None:
    """Every central host that is not a client of a database is refused at the startup
    message, before any password (SQLSTATE 28000), for every database."""
    server = fact(host)
    entries = client_entries(host)
    central = inventory_vars(host)["groups"].get("central", [])
    databases = {(e["database"], e["user"]) for e in entries}
    checked = 0
    for name in central:
        for database, user in sorted(databases):
            allowed = {e["host"] for e in entries if e["database"] == database}
            if name in allowed:
                continue
            result = probe(other_host(host, name), server, user, database)
            assert result["stage"] == "refused" and result["sqlstate"] == "28000", (
                f"{user}@{database} from {name}: {result}"
            )
            checked += 1
    if not checked:
        pytest.skip("not verifiable: every central host is a client of every database")
