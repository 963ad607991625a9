"""Read-only checks of the common role, runnable against any inventory.

    pytest roles/common/verify --hosts='docker://entfarm-lab-edge'
    pytest roles/common/verify --hosts='ansible://all' --ansible-inventory=inventories/lab/farm.yml

Expected values come from /etc/ansible/facts.d/common.fact, written by the role from the
inventory: the checks need no inventory of their own and never change the host.
"""

from __future__ import annotations

from typing import Any

import pytest

from entfarm.verifylib import role_suite

FACT = "/etc/ansible/facts.d/common.fact"


_, fact = role_suite("common")


def test_fact_present(host: Any) -> None:
    assert host.file(FACT).exists, f"{FACT} missing: the common role has not run on this host"


# ---- Locale and time ------------------------------------------------------------------------


def test_locale_generated_and_default(host: Any) -> None:
    locale = fact(host)["locale"]
    available = host.check_output("locale -a").split()
    normalized = locale.lower().replace("utf-8", "utf8")
    assert normalized in [a.lower() for a in available]
    assert f"LANG={locale}" in host.file("/etc/default/locale").content_string.splitlines()


def test_locale_effective(host: Any) -> None:
    locale = fact(host)["locale"]
    if not locale.startswith("fr_"):
        pytest.skip(f"not verifiable: day names are checked for French locales, not {locale}")
    day = host.check_output(f"LC_ALL={locale} date -d 2024-01-01 +%A")
    assert day == "lundi"


def test_timezone_effective(host: Any) -> None:
    tz = fact(host)["timezone"]
    assert host.file("/etc/localtime").linked_to == f"/usr/share/zoneinfo/{tz}"
    assert host.file("/etc/timezone").content_string.strip() == tz
    # What programs actually see: the zone's abbreviations at a winter and a summer date.
    expected_winter = host.check_output(f"TZ={tz} date -d 2024-01-15T12:00:00Z +%Z")
    assert host.check_output("date -d 2024-01-15T12:00:00Z +%Z") == expected_winter
    if tz == "Europe/Paris":
        assert expected_winter == "CET"
        assert host.check_output("date -d 2024-07-15T12:00:00Z +%Z") == "CEST"


def test_chrony_running(host: Any) -> None:
    svc = host.service("chrony")
    assert svc.is_enabled
    assert svc.is_running
    # chronyc talks to the running daemon.
    assert host.run("chronyc -n tracking").rc == 0


def test_chrony_sources_are_the_farm_servers(host: Any) -> None:
    servers = fact(host)["ntp_servers"]
    conf = host.file("/etc/chrony/chrony.conf").content_string
    directives = [
        line.split()
        for line in conf.splitlines()
        if line.split() and line.split()[0] in ("server", "pool", "peer", "sourcedir")
    ]
    # Never a public pool, nor DHCP-provided sources: only the farm's servers.
    assert [d[0] for d in directives] == ["server"] * len(servers)
    assert [d[1] for d in directives] == servers
    sources = host.check_output("chronyc -n -c sources")
    assert len([s for s in sources.splitlines() if s.strip()]) == len(servers)


def test_chrony_in_container_without_clock_control(host: Any) -> None:
    if not fact(host)["chrony_container"]:
        pytest.skip("not verifiable: host is not a container (chronyd controls the clock)")
    assert "-x" in host.check_output("ps -o args= -C chronyd").split()


# ---- APT ------------------------------------------------------------------------------------


def test_unattended_upgrades_security_only(host: Any) -> None:
    data = fact(host)
    if not data["unattended_upgrades"]:
        pytest.skip("not verifiable: unattended upgrades disabled for this host")
    assert host.package("unattended-upgrades").is_installed
    periodic = host.check_output("apt-config dump APT::Periodic")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in periodic
    assert 'APT::Periodic::Update-Package-Lists "1";' in periodic
    dump = host.check_output("apt-config dump Unattended-Upgrade::Origins-Pattern")
    patterns = [
        line.split('"')[1]
        for line in dump.splitlines()
        if line.startswith("Unattended-Upgrade::Origins-Pattern::")
    ]
    assert patterns == data["unattended_upgrades_origins"]
    assert all("security" in p.lower() for p in patterns)
    allowed = host.check_output("apt-config dump Unattended-Upgrade::Allowed-Origins")
    assert "Allowed-Origins::" not in allowed


def test_apt_mirror(host: Any) -> None:
    mirror = fact(host)["apt_mirror"]
    if not mirror:
        pytest.skip("not verifiable: no farm mirror set, the host keeps its own sources")
    sources = host.file("/etc/apt/sources.list.d/debian.sources").content_string
    assert f"URIs: {mirror}" in sources


# ---- journald -------------------------------------------------------------------------------


def test_journald_retention(host: Any) -> None:
    retention = fact(host)["journald_max_retention"]
    merged = host.check_output("systemd-analyze cat-config systemd/journald.conf")
    values = [
        line.split("=", 1)[1].strip()
        for line in merged.splitlines()
        if line.startswith("MaxRetentionSec=")
    ]
    # The last assignment wins: ours, from the drop-in.
    assert values and values[-1] == retention
    assert host.service("systemd-journald").is_running


# ---- SSH ------------------------------------------------------------------------------------


def sshd_effective(host: Any) -> dict[str, str]:
    cmd = host.run("/usr/sbin/sshd -T")
    if cmd.rc != 0:
        pytest.skip(f"not verifiable: sshd -T failed ({cmd.stderr.strip()})")
    out: dict[str, str] = {}
    for line in cmd.stdout.splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key, value)
    return out


def test_sshd_running(host: Any) -> None:
    assert host.service("ssh").is_running
    assert host.run("/usr/sbin/sshd -t").rc == 0


def test_sshd_no_passwords(host: Any) -> None:
    conf = sshd_effective(host)
    assert conf["passwordauthentication"] == "no"
    assert conf["kbdinteractiveauthentication"] == "no"
    assert conf["permitemptypasswords"] == "no"
    assert conf["authenticationmethods"] == "publickey"


def test_sshd_root_login(host: Any) -> None:
    wanted = fact(host)["ssh_permit_root_login"]
    # sshd -T prints prohibit-password under its historical name.
    aliases = {"prohibit-password": {"prohibit-password", "without-password"}, "no": {"no"}}
    assert sshd_effective(host)["permitrootlogin"] in aliases[wanted]


def test_sshd_modern_algorithms(host: Any) -> None:
    conf = sshd_effective(host)
    ciphers = conf["ciphers"].split(",")
    macs = conf["macs"].split(",")
    kex = conf["kexalgorithms"].split(",")
    assert not [c for c in ciphers if "cbc" in c or "3des" in c or "arcfour" in c]
    assert not [m for m in macs if "sha1" in m or "md5" in m or not m.endswith("-etm@openssh.com")]
    assert not [k for k in kex if "sha1" in k or k.startswith("ecdh-sha2-nistp")]
