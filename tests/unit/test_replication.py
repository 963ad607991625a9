"""entfarm.replication against real slapd: a provider and a real syncrepl consumer of it (both
the unit tests' slapd of aaf_conftest, over their own ldapi sockets), then a consumer made wrong
behind slapd's back, as the AAF benchmark's wipes made the lab's school replicas."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aaf_conftest import SCHEMAS, SLAPD, SlapdProcess, init_slapd

from entfarm.replication import consumer_of, replica_state, wait_in_sync

UAI = "0360005K"
FILTER = f"(|(objectClass=organization)(objectClass=organizationalUnit)(cn={UAI}$*))"


@dataclass
class Pair:
    provider: SlapdProcess
    replica: SlapdProcess

    @staticmethod
    def set_provider(replica: SlapdProcess, uri: str) -> None:
        subprocess.run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", replica.uri], text=True,
                       check=True, capture_output=True, input=(
            "dn: olcDatabase={1}mdb,cn=config\nchangetype: modify\nreplace: olcSyncrepl\n"
            f"{syncrepl(uri)}\n"))

    def add(self, server: SlapdProcess, ldif: str) -> None:
        subprocess.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", server.uri], input=ldif,
                       text=True, check=True, capture_output=True)


def syncrepl(provider: str) -> str:
    return (f"olcSyncrepl: rid=001 provider={provider} bindmethod=sasl saslmech=EXTERNAL "
            f'searchbase="dc=fr" type=refreshAndPersist retry="1 +" scope=sub '
            f'filter="{FILTER}"')


def _group(name: str) -> str:
    return f"dn: cn={name},ou=groups,dc=fr\nobjectClass: organizationalRole\ncn: {name}\n\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if not SLAPD.exists() or shutil.which("ldapmodify") is None:
        pytest.skip("not verifiable: slapd not installed (apt-get install slapd ldap-utils)")
    if not all(path.exists() for path in SCHEMAS):
        pytest.skip("not verifiable: the directory role's schemas are missing")
    roots = [tmp_path_factory.mktemp(name) for name in ("provider", "replica")]
    for root in roots:
        init_slapd(root)
    provider, replica = SlapdProcess(roots[0]), SlapdProcess(roots[1])
    pair = Pair(provider, replica)
    provider.start()
    try:
        pair.add(provider, "dn: dc=fr\nobjectClass: dcObject\nobjectClass: organization\n"
                 "dc: fr\no: fr\n\ndn: ou=groups,dc=fr\nobjectClass: organizationalUnit\n"
                 "ou: groups\n\n" + _group(f"{UAI}$3A") + _group(f"{UAI}$4B")
                 + _group("0450040Z$3A"))
        replica.start()
        try:
            pair.set_provider(replica, provider.uri)
            yield pair
        finally:
            replica.stop()
    finally:
        provider.stop()


def test_the_consumer_is_read_from_the_replicas_own_settings(pair: Pair) -> None:
    consumer = consumer_of(pair.replica.runner())
    assert (consumer.searchbase, consumer.scope, consumer.filter) == ("dc=fr", "sub", FILTER)


def test_a_server_with_no_syncrepl_is_not_taken_for_a_replica(pair: Pair) -> None:
    with pytest.raises(ValueError, match="not a replica"):
        consumer_of(pair.provider.runner())


def test_a_replica_in_sync_then_behind_then_wrong_while_believing_itself_in_sync(
        pair: Pair, tmp_path: Path) -> None:
    provider, replica = pair.provider.runner(), pair.replica.runner()
    state, _ = wait_in_sync(provider, replica, timeout=30, interval=0.2)
    assert state.in_sync, state.describe()
    # the filter's share only: the other collège's group stays on the provider
    assert (state.held, state.expected) == (4, 4)

    # Behind: the consumer pointed at a provider that does not answer while the directory
    # changes, then pointed back.
    pair.set_provider(pair.replica, pair.provider.uri.replace("provider", "nowhere"))
    try:
        pair.add(pair.provider, _group(f"{UAI}$5C"))
        state = replica_state(provider, replica)
        assert not state.same_csn and not state.in_sync, state.describe()
        assert (state.missing_count, state.extra_count) == (1, 0)
        assert state.missing == (f"cn={UAI.lower()}$5c,ou=groups,dc=fr",)
        assert "still replicating, or cut off" in state.describe()
    finally:
        pair.set_provider(pair.replica, pair.provider.uri)
    state, _ = wait_in_sync(provider, replica, timeout=30, interval=0.2)
    assert state.in_sync and state.held == 5, state.describe()

    # Wrong: an entry added offline (slapadd without -w keeps the contextCSN), which the
    # provider never had; after the restart the consumer's cookie is the provider's state.
    pair.replica.stop()
    stale = tmp_path / "stale.ldif"
    stale.write_text(_group(f"{UAI}$stale"), encoding="utf-8")
    subprocess.run([str(SLAPD), "-T", "add", "-q", "-F", str(pair.replica.root / "conf"),
                    "-b", "dc=fr", "-l", str(stale)], check=True, capture_output=True)
    pair.replica.start()
    state, _ = wait_in_sync(provider, replica, timeout=3, interval=0.2)
    assert state.same_csn and not state.in_sync, state.describe()
    assert (state.extra_count, state.missing_count) == (1, 0)
    assert state.extra == (f"cn={UAI.lower()}$stale,ou=groups,dc=fr",)
    assert "believes itself in sync" in state.describe()


def test_an_emptied_replica_holds_nothing_rather_than_failing(pair: Pair, tmp_path: Path
                                                               ) -> None:
    """A replica whose database was emptied has no search base until it refills: its
    ldapsearch exits 32, which means it holds nothing (the AAF benchmark's reset read it so)."""
    init_slapd(tmp_path)
    empty = SlapdProcess(tmp_path)
    empty.start()
    try:
        # pointed at a provider that does not answer, so that it stays empty
        pair.set_provider(empty, pair.provider.uri.replace("provider", "nowhere"))
        state = replica_state(pair.provider.runner(), empty.runner())
    finally:
        empty.stop()
    assert not state.in_sync and state.held == 0 and state.replica_csn == (), state.describe()
    assert state.expected >= 4 and state.missing_count == state.expected
