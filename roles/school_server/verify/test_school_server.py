"""Read-only checks of the school_server role, runnable against any inventory.

    pytest roles/school_server/verify --hosts=ansible://school_server \
        --ansible-inventory=inventories/lab/farm.yml

What the server is set to serve comes from /etc/ansible/facts.d/school_server.fact. The replica
is compared with the central directory when the inventory reaches it (root over ldapi there too);
nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from entfarm.replication import wait_in_sync
from entfarm.verifylib import inventory_vars, other_host, q, role_suite

ROOT_SEARCH = "ldapsearch -Q -LLL -Y EXTERNAL -H ldapi:/// -o ldif-wrap=no"

_hosts_only, fact = role_suite("school_server", group="school_server")


def people_of(host: Any, base_dn: str, uai: str, attribute: str = "ENTPersonEtablissements"
              ) -> list[str]:
    """DNs of the people of an établissement in the directory a host serves."""
    structure = f"ENTStructureUAI={uai},ou=structures,{base_dn}"
    out = host.check_output(f"{ROOT_SEARCH} -b {q('ou=people,' + base_dn)} "
                            f"{q(f'({attribute}={structure})')} 1.1")
    return sorted(line[4:] for line in out.splitlines() if line.startswith("dn: "))


def test_services_run(host: Any) -> None:
    fact(host)
    for unit in ("slapd", "smbd", "squid", "dnsmasq", "entfarm-school-accounts.timer"):
        assert host.service(unit).is_running or host.service(unit).is_enabled, unit
    for unit in ("slapd", "smbd", "squid", "dnsmasq"):
        assert host.service(unit).is_running, unit
    assert not host.service("nmbd").is_running


def test_replica_is_a_starttls_consumer_of_the_directory(host: Any) -> None:
    info = fact(host)
    config = host.check_output(f"{ROOT_SEARCH} -b olcDatabase={{1}}mdb,cn=config -s base "
                               "olcSyncrepl olcUpdateRef olcSuffix")
    assert f"olcSuffix: {info['base_dn']}" in config
    assert "starttls=critical" in config and "tls_reqcert=demand" in config
    assert f'binddn="{info["replica_dn"]}"' in config
    assert "olcUpdateRef" not in config, "a read-only replica has no update referral"


def test_replica_holds_only_its_etablissement(host: Any) -> None:
    info = fact(host)
    base, uai = info["base_dn"], info["uai"]
    mine = people_of(host, base, uai)
    everyone = host.check_output(f"{ROOT_SEARCH} -b {q('ou=people,' + base)} "
                                 "'(objectClass=ENTPerson)' 1.1").count("dn: ")
    if everyone == 0:
        pytest.skip("not verifiable: the replica holds no people yet (no AAF import)")
    assert everyone == len(mine), f"{everyone - len(mine)} people of other établissements"
    structures = host.check_output(f"{ROOT_SEARCH} -b {q('ou=structures,' + base)} "
                                   "ENTStructureUAI")
    assert set(re.findall(r"ENTStructureUAI: (\S+)", structures)) == {uai}


def _directory_host(host: Any) -> Any:
    """The farm's directory host, seen from this school server's inventory, or skip."""
    directory_hosts = inventory_vars(host).get("entfarm_services", {}).get(
        "directory", {}).get("hosts", [])
    if not directory_hosts:
        pytest.skip("not verifiable: no directory host in the inventory")
    return other_host(host, directory_hosts[0])


def test_replica_is_in_sync_with_the_directory(host: Any) -> None:
    """Every entry the replica's filter selects on the directory, and nothing else, at the
    directory's contextCSN. A replica can believe itself in sync and still be wrong (deletes
    it never received: entfarm/replication.py); only comparing the entries shows it. A
    replica still catching up gets 30 s."""
    info = fact(host)
    central = _directory_host(host)
    state, _ = wait_in_sync(central.check_output, host.check_output, timeout=30)
    assert state.consumer.searchbase == info["base_dn"]
    assert state.in_sync, f"the replica of {info['uai']} {state.describe()}"
    assert people_of(host, info["base_dn"], info["uai"]) == people_of(
        central, info["base_dn"], info["uai"])


def _sdet_schemas(host: Any) -> set[str]:
    out = host.check_output(f"{ROOT_SEARCH} -b cn=schema,cn=config -s one "
                            "'(cn=*entfarm-sdet*)' cn")
    return set(re.findall(r"(?m)^cn: \{\d+\}(\S+)$", out))


def test_replica_knows_every_schema_evolution_of_the_directory(host: Any) -> None:
    """A replica that lacks a schema evolution the directory has cannot store the entries that
    use it: its syncrepl stops at the first one ("invalid per syntax") and retries for ever,
    while the replica keeps serving what it had."""
    fact(host)
    missing = _sdet_schemas(_directory_host(host)) - _sdet_schemas(host)
    assert not missing, (f"the replica lacks the schema {', '.join(sorted(missing))}: converge "
                         "the school server (entfarm deploy --tags school_server:replica)")


def test_accounts_and_passwords_are_local(host: Any) -> None:
    fact(host)
    assert "extrausers" in host.file("/etc/nsswitch.conf").content_string
    smbpasswd = host.file("/var/lib/entfarm-school/smbpasswd")
    assert smbpasswd.exists and smbpasswd.mode == 0o600 and smbpasswd.user == "root"
    users = host.file("/var/lib/entfarm-school/squid/users")
    assert users.mode == 0o640 and users.group == "proxy"


def test_samba_serves_the_shares(host: Any) -> None:
    info = fact(host)
    dump = host.check_output("testparm --suppress-prompt -s 2>/dev/null")
    for share in ("[homes]", "[enseignants]", "[commun]"):
        assert share in dump
    assert "passdb backend = smbpasswd:/var/lib/entfarm-school/smbpasswd" in dump
    assert "map to guest = Never" in dump or "map to guest" not in dump
    assert host.socket(f"tcp://{info['lan']['address']}:445").is_listening


def test_dnsmasq_serves_the_lan(host: Any) -> None:
    info = fact(host)
    assert host.run("dnsmasq --test").rc == 0
    assert host.socket(f"udp://{info['lan']['address']}:53").is_listening
    assert host.socket("udp://0.0.0.0:67").is_listening
    conf = host.file("/etc/dnsmasq.d/entfarm-school.conf").content_string
    assert f"dhcp-range={info['lan']['dhcp'][0]},{info['lan']['dhcp'][1]}" in conf


def test_proxy_filters_with_the_store_blocklist(host: Any) -> None:
    info = fact(host)
    assert host.run("squid -k parse -f /etc/squid/squid.conf").rc == 0
    assert host.socket(f"tcp://{info['lan']['address']}:{info['proxy']['port']}").is_listening
    conf = host.file("/etc/squid/squid.conf").content_string
    assert "http_access deny pupils blocklist" in conf
    on_host = host.file("/etc/squid/entfarm/blocklist.txt")
    store = Path(str(inventory_vars(host)["entfarm_artifacts"]["store"])) / "blocklist"
    if not (store / "blocklist.txt").is_file():
        pytest.skip("not verifiable: the artifact store is not on this controller")
    assert on_host.sha256sum == hashlib.sha256((store / "blocklist.txt").read_bytes()).hexdigest()


def test_proxy_logs_are_kept_the_retention_and_no_longer(host: Any) -> None:
    days = fact(host)["proxy"]["log_retention_days"]
    rotation = host.file("/etc/logrotate.d/squid").content_string
    assert re.search(rf"^\s*rotate {days}$", rotation, re.M)
    assert re.search(rf"^\s*maxage {days}$", rotation, re.M)
    assert host.run("logrotate --debug /etc/logrotate.d/squid").rc == 0


def test_backup_is_scheduled_daily_to_its_repository(host: Any) -> None:
    fact(host)
    env = host.file("/etc/entfarm-school/restic.env")
    if not env.exists:
        pytest.skip("not verifiable: no backup host in farm.yml (services.backup)")
    assert env.mode == 0o600 and host.file("/etc/entfarm-school/restic.password").mode == 0o600
    assert host.service("entfarm-school-backup.timer").is_enabled
    probe = host.run("/usr/local/sbin/entfarm-school-backup --probe")
    assert probe.rc == 0, probe.stderr
