"""Offline bulk load of a first AAF import, on the real throwaway slapd (with the directory role's
overlays): same directory as an online import, a failed load restored, --online honoured."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aaf_conftest import REPO, Slapd, slapd

from entfarm.aaf import bulk, importer
from entfarm.aaf.bulk import BulkLoadFailed, BulkTarget
from entfarm.aaf.generate import generate, generate_delta
from entfarm.aaf.importer import Directory, run_import
from entfarm.aaf.ldif import parse
from entfarm.aaf.people_state import MARKER_PREFIX, Store, where
from entfarm.aaf.transport import TransportError
from entfarm.model import Farm, load_farm

__all__ = ["slapd"]
UAI = "0360005K"
NOW = dt.datetime(2025, 9, 2, 8, 0, tzinfo=dt.UTC)
# Random per import (salted hashes of one-time codes), and the source digest, which covers DNs
# (so the base DN; the re-import that writes nothing checks the digests of the bulk load).
_NOT_COMPARED = {"userpassword", "entpersoncodeactivation", "entpersonempreinte",
                 "entpersonnthash"}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    generate([(UAI, "Collège Les Capucins", "036")], out, date="20250901", seed=11,
             eleves_per_college=40)
    return out


def _farm(directory: Directory, where: Path) -> Farm:
    where.mkdir()
    text = (REPO / "inventories" / "lab" / "farm.yml").read_text(encoding="utf-8")
    (where / "farm.yml").write_text(text.replace("dc=ac-orleans-tours,dc=fr", directory.base),
                                    encoding="utf-8")
    return load_farm(where)


def _content(directory: Directory) -> dict[str, dict[str, list[str]]]:
    """User attributes and memberOf of every entry below the base, the base DN written as BASE,
    values sorted (the order of memberOf values depends on the order of the writes); the base
    entry itself is not the importer's."""
    out = directory.t.run(["ldapsearch", "-LLL", "-Q", "-Y", "EXTERNAL", "-H", directory.t.uri,
                           "-o", "ldif-wrap=no", "-b", directory.base, "(objectClass=*)", "*",
                           "memberOf"])
    pattern = re.compile(re.escape(directory.base), re.IGNORECASE)
    # each import's marker is its own (entfarm.aaf.people_state), and an import into a base
    # without ou=people (created by the import) keeps no state and writes none: not compared
    return {pattern.sub("BASE", dn).lower(): {
        name.lower(): sorted(pattern.sub("BASE", v) for v in values
                             if not v.startswith(MARKER_PREFIX))
        for name, values in entry.items() if name.lower() not in _NOT_COMPARED
        and not all(v.startswith(MARKER_PREFIX) for v in values)}
        for dn, entry in parse(out).items() if dn.lower() != directory.base.lower()}


class _Spy:
    """Counts bulk loads and offline steps of a real target."""

    def __init__(self, target: BulkTarget):
        self.target = target
        self.stops = 0

    def build(self) -> BulkTarget:
        def stop() -> None:
            self.stops += 1
            self.target.stop()

        return BulkTarget(self.target.transport, stop=stop, start=self.target.start,
                          config_dir=self.target.config_dir, name=self.target.name)


@pytest.fixture
def spy(slapd: Slapd) -> Iterator[_Spy]:
    yield _Spy(slapd.bulk_target())


def test_bulk_import_equals_online_import_then_deltas_agree(
        export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path) -> None:
    online_dir, bulk_dir = slapd.new_base(), slapd.new_base()
    online_farm = _farm(online_dir, tmp_path / "online")
    bulk_farm = _farm(bulk_dir, tmp_path / "bulk")
    online = run_import(export, online_farm, online_dir, now=NOW, bulk=False,
                        bulk_target=spy.build())
    assert spy.stops == 0 and online.bulk_backup is None
    lines: list[str] = []
    loaded = run_import(export, bulk_farm, bulk_dir, now=NOW, bulk=True,
                        bulk_target=spy.build(), progress=lines.append)
    assert spy.stops == 1
    assert any("slapadd of" in line for line in lines), lines
    assert loaded.changes.counts == online.changes.counts
    assert loaded.changes.counts["people add"] > 100 and loaded.changes.counts["groups add"]
    online_content, bulk_content = _content(online_dir), _content(bulk_dir)
    differing = [(dn, name) for dn, entry in bulk_content.items()
                 for name in set(entry) | set(online_content.get(dn, {}))
                 if entry.get(name) != online_content.get(dn, {}).get(name)]
    assert not differing, differing[:10]
    assert bulk_content == online_content
    # memberOf was written by the load itself (slapadd runs no overlay) and is complete.
    member_of = sum(len(e.get("memberof", [])) for e in bulk_content.values())
    members = sum(len(e.get("member", [])) for e in bulk_content.values())
    assert member_of == members > 0
    # The backup of the database taken before the load: owner-only, and the server still runs.
    assert loaded.bulk_backup is not None
    assert stat.S_IMODE(loaded.bulk_backup.stat().st_mode) == 0o600
    assert b"dn: " + bulk_dir.base.encode() in loaded.bulk_backup.read_bytes()
    # The same export again writes nothing; a Delta (online: people are there now) leaves both
    # directories alike, memberOf included, whether its entries came from slapadd or not.
    # The load kept the state of the persons it wrote (their entryUUIDs given by the importer)
    # with the cookie read when slapd came back: the next imports are synced from there.
    kept = _kept(bulk_farm, bulk_dir)
    assert kept == _state_read(bulk_dir) and len(kept) == loaded.changes.counts["people add"]
    again = run_import(export, bulk_farm, bulk_dir, now=NOW, bulk_target=spy.build())
    assert again.changes.changes == 0 and again.people_state == "synced"
    feed = tmp_path / "feed"
    shutil.copytree(export, feed)
    generate_delta(feed, feed, seed=4, share=0.05)
    later = NOW + dt.timedelta(days=1)
    online_delta = run_import(feed, online_farm, online_dir, now=later)
    bulk_delta = run_import(feed, bulk_farm, bulk_dir, now=later, bulk_target=spy.build())
    assert spy.stops == 1
    assert bulk_delta.changes.counts == online_delta.changes.counts
    assert bulk_delta.people_state == "synced"
    assert bulk_delta.changes.counts["groups modify"] > 0
    assert _content(bulk_dir) == _content(online_dir)


def _state_read(directory: Directory) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """entryUUID -> (DN, state attributes) of every person, as the directory holds them."""
    people = f"ou=people,{directory.base}"
    attrs = importer.reads(directory.base)[2][2]
    return {e.pop("entryUUID")[0]: (dn, e) for dn, e in directory.search(
        people, "(ENTPersonJointure=*)", (*attrs, "entryUUID")).items()}


def _kept(farm: Farm, directory: Directory) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """The persons' state the last import kept, with its marker checked against the
    directory's."""
    query = importer.reads(directory.base)[2]
    kept = Store(farm.state_dir / "aaf" / "people-state",
                 importer._farm_key(farm, write=False) or b"").load(
        where(directory.t.describe(), query[0], query[2]))
    assert kept is not None
    top = directory.search(directory.base, "(ou=people)", ("description",))
    assert [v for e in top.values() for v in e.get("description", [])
            if v.startswith(MARKER_PREFIX)] == [kept.marker]
    return kept.state


def _imported_then_delta(export: Path, slapd: Slapd, tmp_path: Path, seed: int
                         ) -> tuple[Directory, Farm, Path]:
    """A new base with the export imported online, and a copy of the export with a 5 % Delta."""
    directory = slapd.new_base()
    farm = _farm(directory, tmp_path / "inv")
    run_import(export, farm, directory, now=NOW, bulk=False)
    feed = tmp_path / "feed"
    shutil.copytree(export, feed)
    generate_delta(feed, feed, seed=seed, share=0.05)
    return directory, farm, feed


def test_failing_slapadd_restores_the_directory(
        export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory, farm, feed = _imported_then_delta(export, slapd, tmp_path, seed=6)
    before_base = directory.dump()
    before_all = Directory(directory.t, "dc=fr").dump()
    records = bulk.Plan.records

    def with_a_bad_one(self: bulk.Plan) -> Iterator[str]:
        # Good records first (slapadd writes them), then one the schema refuses.
        yield from records(self)
        yield (f"dn: cn=broken,ou=groups,{directory.base}\nobjectClass: noSuchClass\n"
               "cn: broken\n\n")

    monkeypatch.setattr(bulk.Plan, "records", with_a_bad_one)
    with pytest.raises(BulkLoadFailed) as caught:
        run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), bulk=True,
                   bulk_target=spy.build())
    message = str(caught.value)
    assert "bulk load failed (slapadd)" in message and "noSuchClass" in message
    assert "restored from the backup" in message and "--online" in message
    assert spy.stops >= 1
    # Everything as before, operational attributes included, other bases of the database too.
    assert directory.dump() == before_base
    assert Directory(directory.t, "dc=fr").dump() == before_all
    [run] = sorted((farm.state_dir / "aaf" / "runs").glob("*.json"))[-1:]
    assert '"status": "failed"' in run.read_text(encoding="utf-8")


def test_first_import_streamed_into_a_failing_slapadd_restores_the_directory(
        export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first import feeds slapadd while its entries are built: a record slapadd refuses in
    the middle (entries already written before it, more sent after it) restores the base."""
    directory = slapd.new_base()
    farm = _farm(directory, tmp_path / "inv")
    before_base = directory.dump()
    before_all = Directory(directory.t, "dc=fr").dump()
    monkeypatch.setattr(bulk.StreamingLoad, "_BATCH", 10)
    real = bulk.offline_record
    fed: list[str] = []

    def one_refused(part: str, member_of: Iterable[str] = (), uuid: str | None = None) -> str:
        fed.append(part)
        if len(fed) == 60:
            return (f"dn: cn=broken,ou=groups,{directory.base}\nobjectClass: noSuchClass\n"
                    "cn: broken\n\n")
        return real(part, member_of, uuid)

    monkeypatch.setattr(bulk, "offline_record", one_refused)
    monkeypatch.setattr(importer, "BULK_MIN_ADDS", 50)  # the automatic rule, at a test's scale
    with pytest.raises(BulkLoadFailed) as caught:
        run_import(export, farm, directory, now=NOW, bulk_target=spy.build())
    message = str(caught.value)
    assert "bulk load failed (slapadd)" in message and "noSuchClass" in message
    assert "restored from the backup" in message and spy.stops >= 1
    assert len(fed) > 100  # the failure came mid-stream, with records still to come
    assert directory.dump() == before_base
    assert Directory(directory.t, "dc=fr").dump() == before_all
    [run] = sorted((farm.state_dir / "aaf" / "runs").glob("*.json"))[-1:]
    assert '"status": "failed"' in run.read_text(encoding="utf-8")


def test_a_failure_while_a_first_import_is_streamed_restores_the_directory(
        export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the entries fails after slapadd has written some: the base is restored, slapd
    is serving again, and the same import then succeeds."""
    directory = slapd.new_base()
    farm = _farm(directory, tmp_path / "inv")
    before_all = Directory(directory.t, "dc=fr").dump()
    monkeypatch.setattr(bulk.StreamingLoad, "_BATCH", 10)
    real = importer.person_entry
    built: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        if len(built) == 80:
            raise RuntimeError("simulated failure while building entries")
        return real(*args, **kwargs)

    monkeypatch.setattr(importer, "person_entry", failing)
    with pytest.raises(BulkLoadFailed) as caught:
        run_import(export, farm, directory, now=NOW, bulk=True, bulk_target=spy.build())
    message = str(caught.value)
    assert "bulk load failed (computing the change set): simulated failure" in message
    assert "restored from the backup" in message and spy.stops >= 1
    assert Directory(directory.t, "dc=fr").dump() == before_all
    monkeypatch.setattr(importer, "person_entry", real)
    again = run_import(export, farm, directory, now=NOW, bulk=True, bulk_target=spy.build())
    assert again.bulk_backup is not None and again.changes.counts["people add"] > 100
    people = directory.search(f"ou=people,{directory.base}", "(ENTPersonJointure=*)", ("uid",))
    assert len(people) == again.changes.counts["people add"]


def test_slapd_not_coming_back_after_the_load_restores_the_directory(
        export: Path, slapd: Slapd, tmp_path: Path) -> None:
    directory, farm, feed = _imported_then_delta(export, slapd, tmp_path, seed=12)
    before = Directory(directory.t, "dc=fr").dump()
    real = slapd.bulk_target()
    starts: list[str] = []

    def start() -> None:
        starts.append("start")
        if len(starts) == 1:  # the start after slapadd: slapd does not come up
            raise RuntimeError("slapd did not start: simulated")
        real.start()

    target = BulkTarget(real.transport, stop=real.stop, start=start,
                        config_dir=real.config_dir, name="the test slapd")
    with pytest.raises(BulkLoadFailed) as caught:
        run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), bulk=True,
                   bulk_target=target)
    assert "bulk load failed (starting slapd): slapd did not start" in str(caught.value)
    assert "restored" in str(caught.value) and len(starts) == 2
    assert Directory(directory.t, "dc=fr").dump() == before


def test_failure_after_the_load_keeps_the_new_accounts_codes(
        export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory, farm, feed = _imported_then_delta(export, slapd, tmp_path, seed=13)

    def failing(self: Directory, parts: list[str]) -> None:
        raise TransportError("ldapmodify failed on local (exit 68): simulated", 68)

    monkeypatch.setattr(Directory, "apply_parts", failing)
    stamp = (NOW + dt.timedelta(days=1)).strftime("%Y%m%dT%H%M%SZ")
    with pytest.raises(importer.UserError) as caught:
        run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), bulk=True,
                   bulk_target=spy.build())
    message = str(caught.value)
    assert "simulated" in message and "bulk load before it succeeded" in message
    assert "running the same import again" in message
    # The loaded accounts are in the directory, and their one-time codes were kept.
    [csv_file] = (farm.state_dir / "aaf" / "distribution").glob(f"*/comptes-{stamp}.csv")
    logins = [row.split(";")[0] for row in csv_file.read_text(encoding="utf-8").splitlines()[1:]]
    assert logins
    people = directory.search(f"ou=people,{directory.base}", "(ENTPersonJointure=*)", ("uid",))
    assert set(logins) <= {e["uid"][0] for e in people.values()}


def test_automatic_bulk_only_for_a_first_import_and_online_forces_ldapmodify(
        export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "BULK_MIN_ADDS", 50)  # the real threshold is 10 000 entries
    forced_online = slapd.new_base()
    result = run_import(export, _farm(forced_online, tmp_path / "a"), forced_online, now=NOW,
                        bulk=False, bulk_target=spy.build())
    assert spy.stops == 0 and result.bulk_backup is None
    assert result.changes.counts["people add"] > 50
    automatic = slapd.new_base()
    farm = _farm(automatic, tmp_path / "b")
    first = run_import(export, farm, automatic, now=NOW, bulk_target=spy.build())
    assert spy.stops == 1 and first.bulk_backup is not None
    # Once people are there, a later import stays online however many entries it adds.
    monkeypatch.setattr(importer, "BULK_MIN_ADDS", 1)
    feed = tmp_path / "feed"
    shutil.copytree(export, feed)
    generate_delta(feed, feed, seed=8, share=0.05)
    later = run_import(feed, farm, automatic, now=NOW + dt.timedelta(days=1),
                       bulk_target=spy.build())
    assert later.changes.adds >= 1 and later.bulk_backup is None and spy.stops == 1


def test_bulk_without_a_target_is_refused_before_any_write(
        export: Path, slapd: Slapd, tmp_path: Path) -> None:
    directory = slapd.new_base()
    farm = _farm(directory, tmp_path / "inv")
    before = directory.dump()
    with pytest.raises(importer.UserError, match="--online"):
        run_import(export, farm, directory, now=NOW, bulk=True)
    assert directory.dump() == before


def test_cli_online_and_bulk_flags(export: Path, slapd: Slapd, spy: _Spy, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from entfarm.aaf import transport
    from entfarm.cli import cli

    monkeypatch.setattr(importer, "BULK_MIN_ADDS", 50)
    monkeypatch.setattr(transport, "for_farm", lambda _farm: slapd.transport)
    monkeypatch.setattr(bulk, "for_host", lambda _transport: spy.build())
    online = slapd.new_base()
    _farm(online, tmp_path / "online")
    result = CliRunner().invoke(cli, ["aaf", "import", str(export), "-i",
                                      str(tmp_path / "online"), "--online", "--streams", "1"])
    assert result.exit_code == 0, result.output
    assert spy.stops == 0 and "slapcat backup" not in result.output
    assert "(up to 1 side by side)" in result.output
    automatic = slapd.new_base()
    _farm(automatic, tmp_path / "automatic")
    result = CliRunner().invoke(cli, ["aaf", "import", str(export), "-i",
                                      str(tmp_path / "automatic")])
    assert result.exit_code == 0, result.output
    assert spy.stops == 1 and "slapcat backup" in result.output
    assert _content(automatic).keys() == _content(online).keys()
    # --bulk takes the offline path for an import that would otherwise stay online.
    feed = tmp_path / "feed"
    shutil.copytree(export, feed)
    generate_delta(feed, feed, seed=9, share=0.05)
    result = CliRunner().invoke(cli, ["aaf", "import", str(feed), "-i",
                                      str(tmp_path / "automatic"), "--bulk"])
    assert result.exit_code == 0, result.output
    assert spy.stops == 2
