"""Read-only checks of the directory role, runnable against any inventory.

    pytest roles/directory/verify --hosts=ansible://all --ansible-inventory=inventories/lab/farm.yml

Names and URIs come from /etc/ansible/facts.d/directory.fact, written by the role; service
account passwords from the controller's secrets directory (entfarm_secrets_dir) when present.
Nothing is written to the directory.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from entfarm.aaf.mapping import UNTAGGED
from entfarm.verifylib import read_fact, role_suite

ROOT_SEARCH = "ldapsearch -Q -LLL -Y EXTERNAL -H ldapi:///"


_hosts_only, fact = role_suite("directory", group="directory")


def pki_ca(host: Any) -> str:
    return str(read_fact(host, "pki")["ca"])


def root_search(host: Any, base: str, *args: str) -> str:
    out: str = host.check_output(
        f"{ROOT_SEARCH} -o ldif-wrap=no -b {shlex.quote(base)} " + " ".join(map(shlex.quote, args))
    )
    return out


def service_password(host: Any, account: str) -> str:
    """The account's password from the controller's secrets directory, or skip."""
    if host.backend.NAME != "ansible":
        pytest.skip("not verifiable: secrets not on this controller (no inventory given)")
    secrets = host.ansible.get_variables().get("entfarm_secrets_dir")
    path = Path(str(secrets)) / "directory" / f"{account}.password" if secrets else None
    if path is None or not path.is_file():
        pytest.skip("not verifiable: secrets not on this controller")
    return path.read_text().strip()


def service_ldap(
    host: Any, account: str, uri: str, tool: str, args: str, starttls: bool = False
) -> Any:
    """Run an ldap tool as the service account (simple bind), the password fed on stdin."""
    data = fact(host)
    password = service_password(host, account)
    dn = data["services"][account]
    cmd = (
        f"printf %s {shlex.quote(password)} | LDAPTLS_CACERT={shlex.quote(pki_ca(host))} "
        f"{tool} -x {'-ZZ ' if starttls else ''}-H {shlex.quote(uri)} "
        f"-D {shlex.quote(dn)} -y /dev/stdin {args}"
    )
    return host.run(cmd)


def a_reader(host: Any) -> str:
    services = fact(host)["services"]
    for name in ("cas", "portal", "moodle", "nextcloud", "etherpad", "replicator"):
        if name in services:
            return str(name)
    pytest.skip("not verifiable: no service account on this directory")


def test_slapd_running(host: Any) -> None:
    slapd = host.service("slapd")
    assert slapd.is_running
    assert slapd.is_enabled


@pytest.mark.parametrize("port", [389, 636])
def test_listening(host: Any, port: int) -> None:
    sockets = [host.socket(f"tcp://0.0.0.0:{port}"), host.socket(f"tcp://:::{port}")]
    assert any(s.is_listening for s in sockets), f"slapd does not listen on {port}"


def test_anonymous_bind_refused(host: Any) -> None:
    cmd = host.run("ldapwhoami -x -H ldap://localhost/")
    assert cmd.rc != 0, "an anonymous bind was accepted"


def test_anonymous_search_returns_nothing(host: Any) -> None:
    base = fact(host)["base_dn"]
    for args in ("-x", ""):  # explicit anonymous bind, then no bind at all (ldapsearch -x -d0)
        cmd = host.run(
            f"ldapsearch {args} -LLL -H ldap://localhost/ "
            f"-b {shlex.quote(base)} '(objectClass=*)' dn"
        )
        assert "dn:" not in cmd.stdout, "an anonymous search returned entries"


def test_ldaps_chain_verifies_with_farm_ca(host: Any) -> None:
    data = fact(host)
    address = data["uri"].removeprefix("ldaps://").rstrip("/")
    cmd = host.run(
        f"openssl s_client -connect {shlex.quote(address)}:636 -servername {shlex.quote(address)} "
        f"-CAfile {shlex.quote(pki_ca(host))} -verify_return_error -brief </dev/null"
    )
    assert cmd.rc == 0, cmd.stderr
    assert "Verification: OK" in cmd.stderr + cmd.stdout


def test_tls_1_1_refused(host: Any) -> None:
    address = fact(host)["uri"].removeprefix("ldaps://").rstrip("/")
    cmd = host.run(f"openssl s_client -connect {shlex.quote(address)}:636 -tls1_1 </dev/null")
    assert cmd.rc != 0, "slapd accepted TLS 1.1"


def test_service_account_binds_over_ldaps(host: Any) -> None:
    account = a_reader(host)
    cmd = service_ldap(host, account, fact(host)["uri"], "ldapwhoami", "")
    assert cmd.rc == 0, f"{account} cannot bind over ldaps: {cmd.stderr.strip()}"


def test_service_account_binds_with_starttls(host: Any) -> None:
    account = a_reader(host)
    cmd = service_ldap(host, account, fact(host)["uri_starttls"], "ldapwhoami", "", starttls=True)
    assert cmd.rc == 0, f"{account} cannot bind with StartTLS: {cmd.stderr.strip()}"


def test_simple_bind_without_tls_refused(host: Any) -> None:
    account = a_reader(host)
    cmd = service_ldap(host, account, fact(host)["uri_starttls"], "ldapwhoami", "")
    assert cmd.rc != 0, "a simple bind in clear text was accepted"


def test_service_account_reads_people_but_no_password(host: Any) -> None:
    data = fact(host)
    account = a_reader(host)
    base = shlex.quote(data["base_dn"])
    people = service_ldap(
        host, account, data["uri"], "ldapsearch", f"-LLL -b ou=people,{base} -s base dn"
    )
    assert people.rc == 0 and "dn:" in people.stdout, (
        f"{account} cannot read ou=people: {people.stderr.strip()}"
    )
    hashes = service_ldap(
        host,
        account,
        data["uri"],
        "ldapsearch",
        f"-LLL -b {base} '(objectClass=*)' userPassword ENTPersonCodeActivation",
    )
    assert hashes.rc in (0, 4), hashes.stderr.strip()  # 4: size limit, still no value shown
    assert "userPassword" not in hashes.stdout and "ENTPersonCodeActivation" not in hashes.stdout


def test_schema_loaded(host: Any) -> None:
    out = root_search(
        host, "cn=schema,cn=config", "-s", "one", "(cn=*entfarm-sdet*)", "olcObjectClasses"
    )
    for name in (
        "ENTPerson",
        "ENTPersonImport",
        "ENTEleve",
        "ENTAuxEnseignant",
        "ENTAuxPersRelEleve",
        "ENTEtablissement",
    ):
        assert f"NAME '{name}'" in out, f"object class {name} missing"


def test_database_serves_the_base_dn(host: Any) -> None:
    out = root_search(host, "cn=config", "(olcSuffix=*)", "olcSuffix", "olcRequires")
    assert f"olcSuffix: {fact(host)['base_dn']}" in out
    assert "olcRequires: authc" in out


def test_anonymous_bind_disallowed_globally(host: Any) -> None:
    out = root_search(
        host, "cn=config", "-s", "base", "olcDisallows", "olcSecurity", "olcTLSProtocolMin"
    )
    assert "olcDisallows: bind_anon" in out
    assert "olcTLSProtocolMin: 3.3" in out


@pytest.mark.parametrize("overlay", ["memberof", "refint", "syncprov"])
def test_overlay_present(host: Any, overlay: str) -> None:
    out = root_search(host, "cn=config", "(objectClass=olcOverlayConfig)", "olcOverlay")
    assert overlay in out, f"overlay {overlay} missing"


@pytest.mark.parametrize(
    "attribute",
    ["objectClass", "uid", "ENTPersonJointure", "ENTStructureUAI", "member", "entryCSN"],
)
def test_equality_index_present(host: Any, attribute: str) -> None:
    # What the services, the importer and syncrepl search by; a farm may index more.
    out = root_search(host, "cn=config", "(olcSuffix=*)", "olcDbIndex")
    kinds: dict[str, set[str]] = {}
    for line in out.splitlines():
        if line.startswith("olcDbIndex: "):
            names, _, types = line[len("olcDbIndex: "):].partition(" ")
            for name in names.split(","):
                kinds.setdefault(name.lower(), set()).update(types.split(","))
    assert "eq" in kinds.get(attribute.lower(), set()), f"no equality index on {attribute}"


def test_password_hashes_unreadable_in_acl(host: Any) -> None:
    out = root_search(host, "cn=config", "(olcSuffix=*)", "olcAccess")
    assert (
        "to attrs=userPassword,ENTPersonCodeActivation by self =xw by anonymous auth by * none"
        in out
    )


def test_replicas_are_told_who_leaves(host: Any) -> None:
    """The rule without which syncprov drops the deletes it owes the school replicas
    (roles/directory/vars/main.yml, directory__access)."""
    out = root_search(host, "cn=config", "(olcSuffix=*)", "olcAccess")
    rule = re.compile(r'to dn\.subtree="[^"]+" filter=\(!\(objectClass=\*\)\) attrs=entry '
                      r'by dn\.children="ou=replicas,[^"]+" read by \* break')
    assert rule.search(out), "no access rule letting replication accounts receive deletes"


def test_replica_rules_match_what_the_entries_carry(host: Any) -> None:
    """dnattr rules (directory__replica_access) only on a directory whose entries all name
    their replication accounts, or the school replicas lose the others; the set rules where
    they do not (yet), and then the next import and converge switch them."""
    rules = root_search(host, "cn=config", "(olcSuffix=*)", "olcAccess")
    base = fact(host)["base_dn"]
    probe = host.run(f"{ROOT_SEARCH} -z 1 -b {shlex.quote(base)} {shlex.quote(UNTAGGED)} 1.1")
    assert probe.rc in (0, 4, 32), probe.stderr
    untagged = "dn:" in probe.stdout
    if "dnattr=ENTReplicaAccount" in rules:
        assert not untagged, (
            "the replica rules compare with ENTReplicaAccount but some entries lack it "
            f"(e.g. {probe.stdout.split(chr(10))[0]}): run `entfarm aaf import`")
    else:
        assert 'set="this/ENTPersonEtablissements & user/seeAlso"' in rules, \
            "the replica rules are neither dnattr nor the role's sets"
        if not untagged and fact(host).get("replica_access", "auto") == "auto":
            pytest.fail("every entry names its replication accounts but the replica rules "
                        "still use sets, about 1.4 s of slapd CPU per replica per 1 % Delta: "
                        "converge the directory (entfarm deploy --tags directory)")


def test_slapcat_timer_enabled(host: Any) -> None:
    timer = host.service("entfarm-slapcat.timer")
    assert timer.is_enabled
    assert timer.is_running
    assert host.file(fact(host)["backup_paths"][0]).is_directory


def test_slapcat_can_export_the_directory(host: Any) -> None:
    """The nightly export's tool reads the configuration and the database (read-only: the
    output goes nowhere). slapcat once failed on a password scheme set before its module."""
    base = fact(host)["base_dn"]
    cmd = host.run(f"slapcat -F /etc/ldap/slapd.d -b {shlex.quote(base)} "
                   "-a '(objectClass=dcObject)' > /dev/null")
    assert cmd.rc == 0, cmd.stderr
