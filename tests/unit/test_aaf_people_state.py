"""The persons' state from slapd's sync feed (entfarm.aaf.people_state) against a real slapd of
its own (the role's syncprov and session log), compared with a full read after each change."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from aaf_conftest import SCHEMAS, SLAPD, Slapd, init_slapd

from entfarm.aaf import ldif
from entfarm.aaf.importer import Directory
from entfarm.aaf.people_state import Kept, State, Store, merge, parse_feed, parse_state
from entfarm.aaf.transport import TransportError

ATTRS = ("ENTPersonJointure", "ENTPersonLogin", "ENTPersonEtat")
BASE = "dc=fr"
PEOPLE = f"ou=people,{BASE}"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Slapd]:
    if not SLAPD.exists() or shutil.which("ldapmodify") is None:
        pytest.skip("not verifiable: slapd not installed (apt-get install slapd ldap-utils)")
    if not all(path.exists() for path in SCHEMAS):
        pytest.skip("not verifiable: the directory role's schemas are missing")
    init_slapd(tmp_path)
    server = Slapd(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _person(uid: str, etat: str = "ACTIF") -> str:
    return ldif.add(f"uid={uid},{PEOPLE}", {
        "objectClass": ["inetOrgPerson", "ENTPerson"], "uid": [uid], "cn": [uid], "sn": [uid],
        "ENTPersonJointure": [f"AAF${uid}"], "ENTPersonLogin": [uid], "ENTPersonEtat": [etat]})


def _filled(server: Slapd, persons: int) -> Directory:
    """The server's directory: the base, ou=people and persons p0, p1..."""
    directory = Directory(server.transport, BASE)
    directory.apply(
        "dn: dc=fr\nchangetype: add\nobjectClass: dcObject\nobjectClass: organization\n"
        "dc: fr\no: fr\n\n"
        + ldif.add(PEOPLE, {"objectClass": ["organizationalUnit"], "ou": ["people"]})
        + "".join(_person(f"p{i}") for i in range(persons)))
    return directory


def _truth(directory: Directory) -> dict[str, ldif.Entry]:
    return directory.search(PEOPLE, "(ENTPersonJointure=*)", ATTRS)


def _by_dn(state: State) -> dict[str, ldif.Entry]:
    return {dn: entry for dn, entry in state.values()}


def _sync(directory: Directory, cookie: str | None) -> tuple[State | None, str | None]:
    feed = parse_feed(directory.sync_raw(PEOPLE, "(ENTPersonJointure=*)", ATTRS, "one", cookie),
                      ATTRS)
    return feed, feed.cookie  # type: ignore[return-value]


def test_the_feed_brings_the_kept_state_up_to_date(server: Slapd, tmp_path: Path) -> None:
    directory = _filled(server, 6)
    feed, cookie = _sync(directory, None)
    kept = merge(None, feed)
    assert kept is not None and _by_dn(kept) == _truth(directory)

    # changes by anyone: a modify, a delete, an add, a rename, and an entry that stops
    # matching the search (its jointure removed)
    directory.apply(
        f"dn: uid=p5,{PEOPLE}\nchangetype: modify\ndelete: ENTPersonJointure\n-\n\n"
        f"dn: uid=p1,{PEOPLE}\nchangetype: modify\nreplace: ENTPersonEtat\n"
        "ENTPersonEtat: DESACTIVE\n-\n\n"
        f"dn: uid=p2,{PEOPLE}\nchangetype: delete\n\n"
        + _person("p9")
        + f"dn: uid=p3,{PEOPLE}\nchangetype: modrdn\nnewrdn: uid=p3b\ndeleteoldrdn: 0\n\n")
    feed, cookie2 = _sync(directory, cookie)
    assert feed.refresh_deletes is True and len(feed.changed) == 3  # not the untouched ones
    state = merge(kept, feed)
    assert state is not None and _by_dn(state) == _truth(directory)

    # a delete, then slapd restarted: its session log starts after that delete, which the
    # cookie does not cover: the refresh comes in the present phase
    directory.apply(f"dn: uid=p4,{PEOPLE}\nchangetype: delete\n\n")
    server.stop()
    server.start()
    directory.apply(_person("p10"))
    feed, cookie3 = _sync(directory, cookie2)
    assert feed.refresh_deletes is False and feed.present, feed
    state2 = merge(state, feed)
    assert state2 is not None and _by_dn(state2) == _truth(directory)

    # a cookie the directory has never reached (restored from a backup, and no write since):
    # slapd refuses the refresh
    assert cookie3 is not None
    with pytest.raises(TransportError, match="exit 53") as refused:
        directory.sync_raw(PEOPLE, "(ENTPersonJointure=*)", ATTRS, "one",
                           cookie3.replace("csn=2", "csn=3"))
    print(refused.value)

    # kept between runs: only with the farm's key, for the same directory, base and attributes
    store = Store(tmp_path / "state" / "people.state", b"k" * 32)
    store.save(Kept("here", cookie3 or "", "m", state2))
    assert store.load("here") == Kept("here", cookie3 or "", "m", state2)
    assert store.load("elsewhere") is None
    assert Store(store.path, b"x" * 32).load("here") is None


def test_the_store_loads_nothing_it_did_not_write(tmp_path: Path) -> None:
    state: State = {"u1": ("uid=a,ou=people,dc=fr", {"ENTPersonEtat": ["ACTIF"]})}
    store = Store(tmp_path / "people-state", b"k" * 32)
    store.save(Kept("here", "rid=000,csn=1", "m", state))
    assert store.head("here") == ("rid=000,csn=1", "m") and store.state() == state
    blob = bytearray(store.path.read_bytes())
    blob[-3] ^= 1  # a byte of the state changed: the head still reads, the state does not
    store.path.write_bytes(bytes(blob))
    assert store.head("here") == ("rid=000,csn=1", "m") and store.state() is None
    assert store.load("here") is None
    store.path.write_bytes(bytes(blob[:50]))  # cut short
    assert store.head("here") is None


def test_a_state_read_from_nothing_carries_a_cookie_the_next_feed_starts_from(server: Slapd
                                                                              ) -> None:
    """From no cookie: the directory's cookie, then a plain search with the entryUUIDs; a
    change made after that read comes in the next feed as a change, not as a full refresh."""
    directory = _filled(server, 5)
    raw = directory.state_raw(PEOPLE, "(ENTPersonJointure=*)", ATTRS, "one", None)
    assert b"\0" in raw
    feed = parse_state(raw, ATTRS)
    assert feed.cookie and not feed.problems and len(feed.changed) == 5
    kept = merge(None, feed)
    assert kept is not None and _by_dn(kept) == _truth(directory)
    assert all(set(entry) <= set(ATTRS) for _dn, entry in kept.values())

    directory.apply(f"dn: uid=p1,{PEOPLE}\nchangetype: modify\nreplace: ENTPersonEtat\n"
                    "ENTPersonEtat: DESACTIVE\n-\n\n"
                    f"dn: uid=p2,{PEOPLE}\nchangetype: delete\n\n")
    nxt = parse_state(directory.state_raw(PEOPLE, "(ENTPersonJointure=*)", ATTRS, "one",
                                          feed.cookie), ATTRS)
    assert nxt.refresh_deletes is True and len(nxt.changed) == 1 and nxt.deleted
    state = merge(kept, nxt)
    assert state is not None and _by_dn(state) == _truth(directory)


def test_a_state_read_from_nothing_without_uuids_is_not_trusted() -> None:
    head = b"# SyncDone control refreshDeletes=0\n# cookie: rid=000,csn=1\nresult: 0 Success\n"
    body = b"dn: uid=a,ou=people,dc=fr\nENTPersonEtat: ACTIF\n\n"
    feed = parse_state(head + b"\0" + body, ATTRS)
    assert feed.problems and merge(None, feed) is None
