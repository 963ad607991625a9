"""School servers on the deployed lab, seen from their collège's LAN: a "classroom" container
on each school network (entfarm/lab.py) takes a DHCP lease, resolves the farm's names, uses the
file server with directory credentials and browses through the filtering proxy. The replica is
compared with the central directory, and the file server is used while the directory is down.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import identity_helpers as helpers
import pytest
from identity_helpers import Account, ldap_root_search, on_host, on_idp

from entfarm.lab import school_lan
from entfarm.model import Farm
from entfarm.replication import replica_state, wait_in_sync

pytestmark = pytest.mark.lab
imported = helpers.imported


@dataclass(frozen=True)
class School:
    uai: str
    server: str  # container
    classroom: str  # container
    address: str  # the school server's LAN address
    dhcp: tuple[str, str]


def schools_of(farm: Farm) -> list[School]:
    found = []
    for host in farm.hosts():
        lan = school_lan(farm, host)
        etab = next((e for e in farm.spec.etablissements if e.uai == host.etablissement), None)
        if lan is None or etab is None or etab.lan is None:
            continue
        found.append(School(etab.uai, farm.container_name(host.name),
                            farm.container_name(lan.classroom), lan.server, etab.lan.leases()))
    return found


def run(container: str, command: str, timeout: float = 60) -> Any:
    return on_host(container, command, timeout=timeout)


def replica_people(school: School, base_dn: str) -> list[str]:
    out = run(school.server, "ldapsearch -Q -LLL -o ldif-wrap=no -Y EXTERNAL -H ldapi:/// "
              f"-b ou=people,{base_dn} '(objectClass=ENTPerson)' uid")
    assert out.returncode == 0, out.stderr
    return sorted(line[5:] for line in out.stdout.splitlines() if line.startswith("uid: "))


@pytest.fixture(scope="module")
def schools(lab_farm: Farm, imported: dict[str, list[Account]]) -> list[School]:
    """The lab's school servers, their accounts synchronised from the replica after the
    import (the timer would do it within minutes)."""
    found = schools_of(lab_farm)
    assert found, "no school server with a LAN in the lab's farm.yml"
    base = lab_farm.spec.academie.base_dn
    for school in found:
        structure = f"ENTStructureUAI={school.uai},ou=structures,{base}"
        central = ldap_root_search(f"ou=people,{base}", f"(ENTPersonEtablissements={structure})",
                                   "uid").get("uid", [])
        deadline = time.monotonic() + 60
        while sorted(central) != replica_people(school, base) and time.monotonic() < deadline:
            time.sleep(2)
        out = run(school.server, "systemctl start entfarm-school-accounts.service")
        assert out.returncode == 0, out.stderr
    return found


@dataclass(frozen=True)
class Person:
    login: str
    password: str
    classes: tuple[str, ...]


def people(school: School, lab_farm: Farm, accounts: dict[str, list[Account]],
           label: str) -> list[Person]:
    """Imported people of a profile in the school, with their classes from the replica."""
    found = []
    for account in accounts.get(label, []):
        if account.uai != school.uai:
            continue
        # the class groups the school server gave the account (from the replica)
        out = run(school.server, f"id -Gn {shlex.quote(account.login)}")
        classes = tuple(sorted(g for g in out.stdout.split() if g.startswith("classe-")))
        found.append(Person(account.login, account.code, classes))
    return found


def smbclient(school: School, person: Person, share: str, command: str) -> Any:
    auth = shlex.quote(f"{person.login}%{person.password}")
    return run(school.classroom, f"smbclient //{school.address}/{share} -U {auth} "
               f"-m SMB3 -c {shlex.quote(command)}")


def teacher_and_outsider(school: School, lab_farm: Farm, accounts: dict[str, list[Account]]
                         ) -> tuple[Person, str, Person]:
    """A teacher with a class, that class's share, and a pupil who is not in it."""
    pupils = people(school, lab_farm, accounts, "élève")
    for teacher in people(school, lab_farm, accounts, "enseignant"):
        for name in teacher.classes:
            outsider = next((p for p in pupils if p.classes and name not in p.classes), None)
            if outsider:
                return teacher, name, outsider
    pytest.fail(f"{school.uai}: no teacher with a class and a pupil of another class")


def test_replica_holds_exactly_its_etablissement(schools: list[School], lab_farm: Farm) -> None:
    base = lab_farm.spec.academie.base_dn
    for school in schools:
        structure = f"ENTStructureUAI={school.uai},ou=structures,{base}"
        central = ldap_root_search(f"ou=people,{base}", f"(ENTPersonEtablissements={structure})",
                                   "uid").get("uid", [])
        assert central, f"no people of {school.uai} in the central directory"
        assert replica_people(school, base) == sorted(central)
        others = [s for s in schools if s.uai != school.uai]
        for other in others:
            theirs = set(replica_people(other, base)) - set(central)
            assert theirs.isdisjoint(replica_people(school, base))


def test_classroom_gets_a_lease_and_resolves_the_farm(schools: list[School],
                                                      lab_farm: Farm) -> None:
    for school in schools:
        # the LAN interface (its name depends on how often Docker connected it)
        out = run(school.classroom, "dev=$(ls /sys/class/net | grep -vx lo | head -1) && "
                  "ip -4 addr flush dev $dev && "
                  "dhclient -1 -v -lf /var/lib/dhcp/dhclient.leases $dev 2>&1; "
                  "ip -4 -o addr show dev $dev", timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr
        address = out.stdout.split("inet ")[-1].split("/")[0]
        first, last = (tuple(int(x) for x in a.split(".")) for a in school.dhcp)
        assert first <= tuple(int(x) for x in address.split(".")) <= last, out.stdout
        assert f"DHCPACK of {address} from {school.address}" in out.stdout
        name = lab_farm.all_public_names()[0]
        lookup = run(school.classroom, f"host {name} {school.address}")
        assert lookup.returncode == 0 and "has address" in lookup.stdout, lookup.stdout


def test_teacher_writes_the_class_share_and_another_pupil_is_refused(
        schools: list[School], lab_farm: Farm, imported: dict[str, list[Account]]) -> None:
    for school in schools:
        teacher, share, outsider = teacher_and_outsider(school, lab_farm, imported)
        stamp = f"cours-{int(time.time())}.txt"
        wrote = smbclient(school, teacher, share, f"put /etc/hostname {stamp}; ls")
        assert wrote.returncode == 0 and stamp in wrote.stdout, wrote.stdout + wrote.stderr
        refused = smbclient(school, outsider, share, "ls")
        assert refused.returncode != 0
        assert "NT_STATUS_ACCESS_DENIED" in refused.stdout + refused.stderr


def test_proxy_filters_pupils_and_lets_staff_reach_the_farm(
        schools: list[School], lab_farm: Farm, imported: dict[str, list[Account]]) -> None:
    school = schools[0]
    pupil = people(school, lab_farm, imported, "élève")[0]
    teacher = people(school, lab_farm, imported, "enseignant")[0]
    proxy = f"http://{school.address}:3128"

    def through_proxy(person: Person, url: str) -> str:
        auth = shlex.quote(f"{person.login}:{person.password}")
        out = run(school.classroom, f"curl -sk -o /dev/null -w '%{{http_code}}' -m 20 "
                  f"-x {proxy} -U {auth} {shlex.quote(url)}")
        return str(out.stdout)

    assert through_proxy(pupil, "http://jeux-en-ligne.test/") == "403"
    portal = lab_farm.public_names("portal")[0]
    assert through_proxy(teacher, f"https://{portal}/") in ("200", "302")
    anonymous = run(school.classroom, f"curl -s -o /dev/null -w '%{{http_code}}' -m 20 "
                    f"-x {proxy} http://{portal}/")
    assert anonymous.stdout == "407"


@pytest.fixture
def directory_down(lab_farm: Farm) -> Iterator[None]:
    out = on_idp("systemctl stop slapd")
    assert out.returncode == 0, out.stderr
    try:
        yield
    finally:
        on_idp("systemctl start slapd")


def test_teacher_logs_in_while_the_directory_is_down(
        schools: list[School], lab_farm: Farm, imported: dict[str, list[Account]],
        directory_down: None) -> None:
    school = schools[0]
    teacher, _name, _outsider = teacher_and_outsider(school, lab_farm, imported)
    assert on_idp("systemctl is-active slapd").stdout.strip() != "active"
    home = smbclient(school, teacher, teacher.login, "ls")
    assert home.returncode == 0, home.stdout + home.stderr


def test_backup_then_a_deleted_file_comes_back(schools: list[School]) -> None:
    school = schools[0]
    kept = "/srv/ecole/commun/a-garder.txt"
    wrote = run(school.server, f"echo 'cours du lundi' > {kept}")
    assert wrote.returncode == 0, wrote.stderr
    backup = run(school.server, "systemctl start entfarm-school-backup.service", timeout=300)
    assert backup.returncode == 0, run(school.server, "journalctl -u entfarm-school-backup "
                                       "--no-pager -n 20").stdout
    snapshots = run(school.server, "entfarm-school-restore --list")
    assert snapshots.returncode == 0 and "daily" in snapshots.stdout, snapshots.stdout
    assert run(school.server, f"rm {kept}").returncode == 0
    restored = run(school.server, f"entfarm-school-restore {kept}", timeout=300)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert run(school.server, f"cat {kept}").stdout == "cours du lundi\n"


def runner(container: str) -> Any:
    """entfarm.replication's Runner over docker exec; a failed command fails the test."""
    def run_checked(command: str) -> str:
        out = run(container, command)
        assert out.returncode == 0, f"{container}: {command}: {out.stderr}"
        return str(out.stdout)
    return run_checked


def test_a_wrong_replica_that_believes_itself_in_sync_is_caught_then_refilled(
        schools: list[School], lab_farm: Farm) -> None:
    """What dropped deletes left on the lab's replicas (docs/performance.md): an entry the
    provider does not have, added behind slapd's back, so that the replica's contextCSN stays
    the provider's. The verify suite's comparison names it; emptying the replica's
    database and starting slapd again (what the role does when the syncrepl settings change)
    refills it from the directory."""
    school = schools[0]
    base = lab_farm.spec.academie.base_dn
    provider, replica = runner(helpers.IDP), runner(school.server)
    before, waited = wait_in_sync(provider, replica, timeout=90)
    assert before.in_sync, f"not in sync after {waited:.0f} s: {before.describe()}"
    stale = f"cn={school.uai}$stale-by-test,ou=groups,{base}"
    entry = f"dn: {stale}\nobjectClass: organizationalRole\ncn: {school.uai}$stale-by-test\n"
    out = run(school.server, "systemctl stop slapd && slapadd -q -b "
              f"{shlex.quote(base)} -l /dev/stdin <<'LDIF'\n{entry}LDIF\n"
              "systemctl start slapd")
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        time.sleep(5)  # the consumer's reconnect, which sends its cookie
        wrong = replica_state(provider, replica)
        assert wrong.same_csn, wrong.describe()
        assert (wrong.extra_count, wrong.missing_count) == (1, 0), wrong.describe()
        assert wrong.extra == (stale.lower(),)
        assert not wrong.in_sync
        assert "believes itself in sync" in wrong.describe()
        assert wrong.held == before.held + 1 and wrong.expected == before.expected
    finally:
        out = run(school.server, "systemctl stop slapd && rm -f /var/lib/ldap/data.mdb "
                  "/var/lib/ldap/lock.mdb && systemctl start slapd")
        assert out.returncode == 0, out.stdout + out.stderr
    after, waited = wait_in_sync(provider, replica, timeout=120)
    assert after.in_sync, f"not refilled after {waited:.0f} s: {after.describe()}"
    assert after.held == before.held
