"""roles/directory's access rules on a real slapd: what a service account and a school server's
replication account may read. The rules are rendered from the role's variables, as the role
writes them into cn=config."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest
import yaml
from aaf_conftest import (
    REPO,
    SlapdProcess,
    access_ldif,
    init_slapd,
    replica_filter,
    role_access,
    ssha,
)

from entfarm.model import replica_account_dn
from entfarm.replication import wait_in_sync

BASE = "dc=ac-test,dc=fr"
A, B = "0360005K", "0450022E"
ROOT = f"gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth"
CAS = f"cn=cas,ou=services,{BASE}"
REPLICA = replica_account_dn(A, BASE)
PASSWORD = "secret-of-the-test"


def _tags(uais: list[str]) -> str:
    """What the AAF importer writes for the replica rules (mapping version 3)."""
    return "objectClass: ENTReplicated\n" + "".join(
        f"ENTReplicaAccount: {replica_account_dn(u, BASE)}\n" for u in uais)


def _entries() -> str:
    out = [f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: ac-test\no: t\n"]
    out += [f"dn: ou={ou},{BASE}\nobjectClass: organizationalUnit\nou: {ou}\n"
            for ou in ("people", "structures", "groups", "services", "replicas")]
    out += [f"dn: ENTStructureUAI={u},ou=structures,{BASE}\nobjectClass: organizationalUnit\n"
            f"objectClass: ENTStructure\nobjectClass: ENTEtablissement\nou: {u}\n"
            f"ENTStructureUAI: {u}\nENTStructureJointure: j{u}\n{_tags([u])}" for u in (A, B)]
    out.append(f"dn: {CAS}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
               f"cn: cas\nuserPassword: {ssha(PASSWORD)}\n")
    out.append(f"dn: {REPLICA}\nobjectClass: organizationalRole\n"
               f"objectClass: simpleSecurityObject\ncn: se-{A.lower()}\n"
               f"userPassword: {ssha(PASSWORD)}\n"
               f"seeAlso: ENTStructureUAI={A},ou=structures,{BASE}\n")
    # a of A, b of B, ab of both (a teacher in two collèges)
    for uid, uais in (("a", [A]), ("b", [B]), ("ab", [A, B])):
        out.append(f"dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\n"
                   f"objectClass: ENTPerson\nobjectClass: ENTPersonSamba\nuid: {uid}\n"
                   f"cn: {uid}\nsn: {uid}\nENTPersonJointure: AAF${uid}\n"
                   f"userPassword: {ssha(PASSWORD)}\nENTPersonNTHash: {'0' * 31}{len(uid)}\n"
                   + "".join(f"ENTPersonEtablissements: ENTStructureUAI={u},ou=structures,"
                             f"{BASE}\n" for u in uais) + _tags(uais))
    for cn, members in ((f"{A}$6A", ["a", "ab"]), (f"{B}$6B", ["b"])):
        out.append(f"dn: cn={cn},ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: {cn}\n"
                   + _tags([cn.split("$")[0]])
                   + "".join(f"member: uid={m},ou=people,{BASE}\n" for m in members))
    return "\n".join(out)


@pytest.fixture(scope="module", params=["dnattr", "sets"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[SlapdProcess]:
    """The unit tests' slapd (aaf_conftest: the role's schemas, overlays and indexes under
    dc=fr), with the role's access rules on its database, under each replica mode
    (directory__replica_access): both must give the same access."""
    root = tmp_path_factory.mktemp("acl")
    init_slapd(root)
    process = SlapdProcess(root)
    process.start()
    for text in (access_ldif(role_access(BASE, ROOT, request.param)),
                 "dn: dc=fr\nchangetype: add\nobjectClass: dcObject\nobjectClass: organization\n"
                 "dc: fr\no: fr\n\n" + _entries()):
        subprocess.run(["ldapmodify", "-a", "-Q", "-Y", "EXTERNAL", "-H", process.uri],
                       input=text.encode(), check=True, capture_output=True)
    yield process
    process.stop()
    shutil.rmtree(root / "db", ignore_errors=True)


def _read(server: SlapdProcess, who: str, *attrs: str) -> dict[str, list[str]]:
    """DN -> attribute lines the account sees under the base."""
    done = subprocess.run(["ldapsearch", "-LLL", "-x", "-H", server.uri, "-D", who, "-w",
                           PASSWORD, "-o", "ldif-wrap=no", "-b", BASE, "(objectClass=*)",
                           *attrs], capture_output=True, text=True, check=True)
    out: dict[str, list[str]] = {}
    for record in done.stdout.strip().split("\n\n"):
        lines = record.splitlines()
        if lines and lines[0].startswith("dn: "):
            out[lines[0][4:]] = lines[1:]
    return out


def _people(seen: dict[str, list[str]]) -> set[str]:
    return {dn.split(",")[0][4:] for dn in seen if dn.endswith(f",ou=people,{BASE}")}


def test_service_account_reads_everyone_but_no_secret(server: SlapdProcess) -> None:
    seen = _read(server, CAS, "*")
    assert _people(seen) == {"a", "b", "ab"}
    assert {dn.split(",")[0] for dn in seen if dn.endswith(f",ou=groups,{BASE}")} == {
        f"cn={A}$6A", f"cn={B}$6B"}
    lines = [line for values in seen.values() for line in values]
    assert not [x for x in lines if x.lower().startswith(("userpassword", "entpersonnthash"))]


def test_replication_account_reads_its_etablissement_only(server: SlapdProcess) -> None:
    seen = _read(server, REPLICA, "uid", "ENTPersonNTHash", "member", "userPassword")
    assert _people(seen) == {"a", "ab"}  # b belongs to the other collège
    assert f"cn={A}$6A,ou=groups,{BASE}" in seen
    assert f"cn={B}$6B,ou=groups,{BASE}" not in seen
    assert f"ENTStructureUAI={A},ou=structures,{BASE}" in seen
    assert f"ENTStructureUAI={B},ou=structures,{BASE}" not in seen
    assert CAS not in seen
    for uid in ("a", "ab"):
        entry = seen[f"uid={uid},ou=people,{BASE}"]
        assert any(x.startswith("ENTPersonNTHash: ") for x in entry), entry
        assert not any(x.startswith("userPassword") for x in entry), entry


def _person(uid: str, uais: list[str]) -> str:
    return (f"dn: uid={uid},ou=people,{BASE}\nchangetype: add\nobjectClass: inetOrgPerson\n"
            f"objectClass: ENTPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
            f"ENTPersonJointure: AAF${uid}\n"
            + "".join(f"ENTPersonEtablissements: ENTStructureUAI={u},ou=structures,{BASE}\n"
                      for u in uais) + _tags(uais) + "\n")


def test_a_school_replica_loses_whoever_leaves_its_etablissement(
        server: SlapdProcess, tmp_path: Path) -> None:
    """A real syncrepl consumer bound as the replication account, with the school server's
    own filter: a person who stops belonging to the établissement and a person deleted must
    leave the replica too (without the role's "entry without objectClass" rule, syncprov drops
    both deletes and the replica keeps them)."""
    _ldap(server, _person("c", [A]) + _person("ac", [A, B]))
    init_slapd(tmp_path)
    consumer = SlapdProcess(tmp_path)
    consumer.start()
    try:
        subprocess.run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", consumer.uri], check=True,
                       capture_output=True, text=True, input=(
            "dn: olcDatabase={1}mdb,cn=config\nchangetype: modify\nadd: olcSyncrepl\n"
            f"olcSyncrepl: rid=002 provider={server.uri} bindmethod=simple "
            f'binddn="{REPLICA}" credentials="{PASSWORD}" searchbase="{BASE}" '
            f'scope=sub type=refreshAndPersist retry="1 +" '
            f'filter="{replica_filter(A, BASE)}"\n'))
        provider, replica = server.runner(), consumer.runner()

        def synced(what: str) -> set[str]:
            state, waited = wait_in_sync(provider, replica, timeout=20, interval=0.2)
            assert state.in_sync, f"{what}: after {waited:.1f} s, {state.describe()}"
            return {dn[4:].split(",")[0][4:] for dn in replica(
                f"ldapsearch -LLL -Q -Y EXTERNAL -H ldapi:/// -b ou=people,{BASE} 1.1"
            ).split("\n") if dn.startswith("dn: uid=")}

        assert synced("first refresh") == {"a", "ab", "c", "ac"}
        # As the importer writes it: the établissement and its replica account go together.
        _ldap(server, f"dn: uid=ac,ou=people,{BASE}\nchangetype: modify\n"
                      f"delete: ENTPersonEtablissements\nENTPersonEtablissements: "
                      f"ENTStructureUAI={A},ou=structures,{BASE}\n-\n"
                      f"delete: ENTReplicaAccount\nENTReplicaAccount: {REPLICA}\n\n")
        assert synced("ac left the établissement") == {"a", "ab", "c"}
        _ldap(server, f"dn: uid=c,ou=people,{BASE}\nchangetype: delete\n\n")
        assert synced("c deleted") == {"a", "ab"}
        _ldap(server, f"dn: uid=ac,ou=people,{BASE}\nchangetype: modify\n"
                      f"add: ENTPersonEtablissements\nENTPersonEtablissements: "
                      f"ENTStructureUAI={A},ou=structures,{BASE}\n-\n"
                      f"add: ENTReplicaAccount\nENTReplicaAccount: {REPLICA}\n\n")
        assert synced("ac came back") == {"a", "ab", "ac"}
    finally:
        consumer.stop()
        _ldap(server, f"dn: uid=ac,ou=people,{BASE}\nchangetype: delete\n\n")


def _ldap(server: SlapdProcess, text: str) -> None:
    subprocess.run(["ldapmodify", "-a", "-Q", "-Y", "EXTERNAL", "-H", server.uri],
                   input=text.encode(), check=True, capture_output=True)


def test_the_roles_name_replication_accounts_as_the_importer_does() -> None:
    """roles/directory creates the account, roles/school_server binds as it, the importer
    names it on each entry (ENTReplicaAccount, which the dnattr rules compare with): one name."""
    roles = REPO / "roles"
    tasks = yaml.safe_load((roles / "directory" / "tasks" / "accounts.yml").read_text())
    [create] = [t for t in tasks if t["name"].endswith("replication accounts")]
    created = jinja2.Template(create["community.general.ldap_entry"]["dn"]).render(
        item=A, directory__replicas_dn=f"ou=replicas,{BASE}")
    defaults = yaml.safe_load((roles / "school_server" / "defaults" / "main.yml").read_text())
    bound = jinja2.Template(defaults["school_server__replica_dn"]).render(
        school_server__uai=A, school_server__base_dn=BASE)
    assert created == bound == replica_account_dn(A, BASE)
