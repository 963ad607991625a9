"""AAF import against a real slapd: idempotence, deactivation and purge, refusals with the
directory untouched (full dumps compared), dry run, distribution files."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from collections import Counter
from pathlib import Path

import pytest
from aaf_conftest import REPO, SCHEMAS, Slapd, init_slapd, slapd

from entfarm.aaf.export import load
from entfarm.aaf.generate import generate, generate_delta, modify_request
from entfarm.aaf.importer import Directory, ImportRefused, import_lock, run_import
from entfarm.aaf.ldif import target
from entfarm.errors import UserError
from entfarm.model import Farm, load_farm, replica_account_dn

__all__ = ["slapd"]
UAI = "0360005K"
NOW = dt.datetime(2025, 9, 2, 8, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    generate([(UAI, "Collège Les Capucins", "036"), ("0370001A", "Collège hors ferme", "037")],
             out, date="20250901", seed=7, eleves_per_college=50)
    return out


@pytest.fixture
def directory(slapd: Slapd) -> Directory:
    return slapd.new_base()


@pytest.fixture
def farm(tmp_path: Path, directory: Directory) -> Farm:
    inv = tmp_path / "inventory"
    inv.mkdir()
    text = (REPO / "inventories" / "lab" / "farm.yml").read_text(encoding="utf-8")
    (inv / "farm.yml").write_text(text.replace("dc=ac-orleans-tours,dc=fr", directory.base),
                                  encoding="utf-8")
    return load_farm(inv)


def _copy(export: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(export, target)
    return target


def _people(directory: Directory) -> dict[str, dict[str, list[str]]]:
    return directory.search(f"ou=people,{directory.base}", "(ENTPersonJointure=*)",
                            ("uid", "ENTPersonEtat", "ENTPersonJointure", "sn", "userPassword",
                             "ENTPersonDateDesactivation"))


def test_import_provisions_onboarded_only_then_reimport_changes_nothing(
        export: Path, farm: Farm, directory: Directory) -> None:
    first = run_import(export, farm, directory, now=NOW)
    added = first.changes.counts["people add"]
    assert added > 150  # 50 élèves, their parents, 45 staff
    assert set(first.changes.per_uai) == {UAI}
    assert first.changes.skipped["0370001A"] > 0  # the collège outside the farm
    people = _people(directory)
    assert len(people) == added
    # Parents carry their children as the portal shows them: <UAI>$<display name>.
    parents = directory.search(f"ou=people,{directory.base}", "(ENTPersonProfils=National_TUT)",
                               ("ENTAuxPersRelEleveEnfants", "ENTAuxPersRelEleveEleve"))
    assert parents
    for parent in parents.values():
        children = parent["ENTAuxPersRelEleveEnfants"]
        assert len(children) == len(parent["ENTAuxPersRelEleveEleve"])
        assert all(v.startswith(f"{UAI}$") and len(v) > len(UAI) + 3 for v in children)
    again = run_import(export, farm, directory, now=NOW + dt.timedelta(days=1))
    assert again.changes.changes == 0, again.changes.ldif[:2000]
    # Distribution file: new accounts only, owner-only, codes never stored in clear.
    [csv_file] = first.distribution
    assert csv_file.parent.name == UAI
    assert stat.S_IMODE(csv_file.stat().st_mode) == 0o600
    rows = csv_file.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "login;nom;prenom;profil;classe;code_activation"
    assert len(rows) == added + 1
    code = rows[1].split(";")[-1]
    assert code.encode() not in directory.dump()
    assert again.distribution == []
    assert first.run_record is not None and first.run_record.exists()


def test_delta_deactivates_keeps_logins_and_purges_after_retention(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path) -> None:
    run_import(export, farm, directory, now=NOW)
    logins = {e["ENTPersonJointure"][0]: e["uid"][0] for e in _people(directory).values()}
    feed = _copy(export, tmp_path)
    generate_delta(feed, feed, seed=3, share=0.02)
    result = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1))
    deactivated = result.changes.counts["people deactivate"]
    assert deactivated >= 1
    people = _people(directory)
    off = [e for e in people.values() if e["ENTPersonEtat"] == ["DESACTIVE"]]
    assert len(off) == deactivated and all(e.get("ENTPersonDateDesactivation") for e in off)
    # Renamed people keep their login.
    for e in people.values():
        j = e["ENTPersonJointure"][0]
        if j in logins:
            assert e["uid"][0] == logins[j]
    # Within the retention delay nothing is purged; after it, the departed are.
    assert run_import(feed, farm, directory, now=NOW + dt.timedelta(days=60)).changes.changes == 0
    later = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=100))
    assert later.changes.counts["people purge"] == deactivated
    assert len(_people(directory)) == len(people) - deactivated


def test_digests_skip_only_what_is_really_unchanged(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path) -> None:
    run_import(export, farm, directory, now=NOW)
    feed = _copy(export, tmp_path)
    generate_delta(feed, feed, seed=5, share=0.05)
    delta = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1))
    assert delta.changes.counts["people modify"] >= 1
    # What the digests let the Delta skip was up to date: comparing every attribute of every
    # person afterwards finds nothing to change.
    full = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), full_compare=True)
    assert full.changes.changes == 0, full.changes.ldif[:2000]
    # A hand edit of an owned attribute is not seen through an unchanged digest, and is repaired
    # by a full comparison.
    dn, entry = next((dn, e) for dn, e in _people(directory).items()
                     if e["ENTPersonEtat"] == ["ACTIF"])
    directory.apply(f"dn: {dn}\nchangetype: modify\nreplace: sn\nsn: Modifié-à-la-main\n\n")
    assert run_import(feed, farm, directory, now=NOW + dt.timedelta(days=2)).changes.changes == 0
    repaired = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=2),
                          full_compare=True)
    assert repaired.changes.counts["people modify"] == 1
    assert _people(directory)[dn]["sn"] == entry["sn"]


def test_the_kept_state_sees_what_others_changed_and_a_foreign_marker(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path) -> None:
    """The persons' state kept between imports (entfarm.aaf.people_state), brought up to date
    from slapd's sync feed, sees hand changes as a full read would; a marker on ou=people that
    is not the kept state's (a restored directory) makes the import read everything."""
    def imported(feed: Path, days: int) -> tuple[Counter[str], list[str]]:
        said: list[str] = []
        result = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=days),
                            progress=said.append)
        return result.changes.counts, [line for line in said if "persons' state" in line]

    feed = _copy(export, tmp_path)
    assert imported(feed, 0)[1] == ["persons' state: searched"]  # no ou=people to sync yet
    generate_delta(feed, feed, seed=3, share=0.02)
    assert imported(feed, 1)[1] == ["persons' state: synced in full"]
    state_file = farm.state_dir / "aaf" / "people-state"
    assert state_file.exists() and stat.S_IMODE(state_file.stat().st_mode) == 0o600
    # By hand: one person deleted, one deactivated, one digest spoiled; a description of
    # ou=people, which the import's marker leaves in place.
    people = {dn: e for dn, e in _people(directory).items() if e["ENTPersonEtat"] == ["ACTIF"]}
    gone, off, spoiled = sorted(people)[:3]
    people_ou = f"ou=people,{directory.base}"
    directory.apply(f"dn: {people_ou}\nchangetype: modify\nadd: description\n"
                    "description: Les personnes\n-\n\n"
                    f"dn: {gone}\nchangetype: delete\n\n"
                    f"dn: {off}\nchangetype: modify\nreplace: ENTPersonEtat\n"
                    "ENTPersonEtat: DESACTIVE\n-\n\n"
                    f"dn: {spoiled}\nchangetype: modify\nreplace: ENTPersonEmpreinte\n"
                    "ENTPersonEmpreinte: 0\n-\n\n")
    counts, said = imported(feed, 2)
    assert said == ["persons' state: synced"]
    assert (counts["people add"], counts["people reactivate"], counts["people modify"]) == (
        1, 1, 1), counts
    described = directory.search(directory.base, "(ou=people)", ("description",))[people_ou]
    assert described["description"][0] == "Les personnes", described
    assert len(described["description"]) == 2 and described["description"][1].startswith(
        "entfarm-aaf-import 20250904T")
    # Up to date, as a full read says; a no-change import writes nothing, not even a marker.
    before = directory.dump()
    counts, said = imported(feed, 2)
    assert said == ["persons' state: synced"] and sum(counts.values()) == 0, counts
    assert directory.dump() == before
    # A directory restored from before the last import holds another marker: read in full.
    directory.apply(f"dn: {people_ou}\nchangetype: modify\nreplace: description\n"
                    "description: entfarm-aaf-import 20250101T000000Z 0000\n-\n\n")
    counts, said = imported(feed, 2)
    assert said == ["persons' state: synced in full"] and sum(counts.values()) == 0, counts


def test_class_move_changes_one_member_value_each_way(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path) -> None:
    run_import(export, farm, directory, now=NOW)
    feed = _copy(export, tmp_path)
    # Élève 1000003 (generator seed 7) leaves 6A for 5A in the next day's Delta.
    (feed / "ENT_18_Delta_20250902_Eleve_0000.xml").write_bytes(
        ('<?xml version="1.0" encoding="ISO-8859-15"?>\n<ficAlimMENESR>\n'
         + modify_request("1000003", {"ENTEleveClasses": ["4001$5A"]})
         + "</ficAlimMENESR>\n").encode("iso-8859-15"))
    result = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1))
    text = result.changes.ldif
    assert result.changes.counts["groups modify"] == 2, text
    assert "replace: member" not in text
    [moved] = [dn for dn, e in _people(directory).items()
               if e["ENTPersonJointure"][0].endswith("$1000003")]
    old, new = (f"cn={UAI}${c},ou=groups,{directory.base}" for c in ("6A", "5A"))
    records = {r.split("\n", 1)[0]: r for r in text.split("\n\n") if "ou=groups," in r}
    assert records[f"dn: {old}"].count("member: ") == 1
    assert f"delete: member\nmember: {moved}\n" in records[f"dn: {old}"]
    assert records[f"dn: {new}"].count("member: ") == 1
    assert f"add: member\nmember: {moved}\n" in records[f"dn: {new}"]
    groups = directory.search(f"ou=groups,{directory.base}", "(objectClass=groupOfNames)",
                              ("member",))
    assert moved in groups[new]["member"] and moved not in groups[old]["member"]
    # The memberof overlay (the role's, in the test slapd) followed the two value changes.
    member_of = directory.search(moved, "(objectClass=*)", ("memberOf",), "base")[moved]
    assert new in member_of["memberOf"] and old not in member_of["memberOf"]


def _refused(feed: Path, farm: Farm, directory: Directory, **kw: object) -> str:
    before = directory.dump()
    with pytest.raises(ImportRefused) as caught:
        run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), **kw)  # type: ignore[arg-type]
    assert directory.dump() == before
    return str(caught.value)


def _edit(feed: Path, category: str, old: str, new: str) -> None:
    [path] = feed.glob(f"*_Complet_*_{category}_0000.xml")
    text = path.read_bytes().decode("iso-8859-15")
    assert old in text
    path.write_bytes(text.replace(old, new, 1).encode("iso-8859-15"))


def test_refuses_truncated_xml(export: Path, farm: Farm, directory: Directory,
                               tmp_path: Path) -> None:
    run_import(export, farm, directory, now=NOW)
    feed = _copy(export, tmp_path)
    [path] = feed.glob("*_Eleve_0000.xml")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _refused(feed, farm, directory)
    assert "malformed or truncated XML" in message and path.name in message


def test_refuses_unknown_structure_id(export: Path, farm: Farm, directory: Directory,
                                      tmp_path: Path) -> None:
    feed = _copy(export, tmp_path)
    _edit(feed, "Eleve", "<value>4001$6A</value>", "<value>9999$6A</value>")
    message = _refused(feed, farm, directory)
    assert "unknown structure id '9999'" in message and "ENTEleveClasses" in message


def test_refuses_invalid_uai(export: Path, farm: Farm, directory: Directory,
                             tmp_path: Path) -> None:
    feed = _copy(export, tmp_path)
    _edit(feed, "EtabEducNat", f"<value>{UAI}</value>", "<value>0360005A</value>")
    message = _refused(feed, farm, directory)
    assert "invalid UAI" in message and "0360005A" in message and "record 4001" in message


def test_refuses_mass_deactivation_unless_forced(export: Path, farm: Farm,
                                                 directory: Directory, tmp_path: Path) -> None:
    run_import(export, farm, directory, now=NOW)
    feed = _copy(export, tmp_path)
    generate_delta(feed, feed, seed=5, share=0.25)
    message = _refused(feed, farm, directory)
    assert f"accounts of {UAI}" in message and "--force" in message and "10%" in message
    forced = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), force=True)
    assert forced.changes.counts["people deactivate"] > 0


@pytest.mark.parametrize(("share", "guard"), [(0.3, 0.10), (0.06, 0.01)],
                         ids=["everyone-read", "targeted-reads"])
def test_the_guard_and_the_counts_take_each_persons_etablissements_from_the_directory(
        farm: Farm, directory: Directory, tmp_path: Path, share: float, guard: float) -> None:
    """The import reads only its persons' state and digest; their établissements come from the
    export where the digest matches and are read for the others. The guard's figures and the
    per-UAI counts must still be those of the directory's ENTPersonEtablissements (two
    onboarded collèges sharing staff, a Delta with departures, arrivals and moves). A large
    Delta reads every person in full; a small one reads only those changed or leaving, and
    counts the others, staff of both collèges among them, from the export."""
    feed = tmp_path / "two"
    generate([(UAI, "Collège Les Capucins", "036"), ("0450040Z", "Collège B", "045")],
             feed, date="20250901", seed=9, eleves_per_college=40)
    run_import(feed, farm, directory, now=NOW)
    generate_delta(feed, feed, seed=10, share=share)
    stored = directory.search(f"ou=people,{directory.base}", "(ENTPersonJointure=*)",
                            ("ENTPersonEtablissements",))
    assert sum(len(e["ENTPersonEtablissements"]) > 1 for e in stored.values()) >= 2
    dry = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=1), dry_run=True,
                     force=True)
    leaving_dns = {target(part)[0].lower() for part in dry.changes.ldif_parts
                   if "\nENTPersonEtat: DESACTIVE\n" in part}
    assert leaving_dns

    def uais(entry: dict[str, list[str]]) -> list[str]:
        return [v.split(",")[0].split("=")[1] for v in entry["ENTPersonEtablissements"]]

    active: Counter[str] = Counter()
    leaving: Counter[str] = Counter()
    for dn, entry in stored.items():
        for uai in uais(entry):
            active[uai] += 1
            leaving[uai] += dn.lower() in leaving_dns
    assert len(active) == 2 and all(leaving.values())
    over = sorted(u for u in leaving if leaving[u] / active[u] > guard)
    assert over
    message = _refused(feed, farm, directory, max_deactivate=guard)
    assert message.startswith("refusing to import: it would deactivate ")
    for uai in over:  # every établissement past the guard, each with its own figures
        assert (f"{leaving[uai]} of the {active[uai]} active accounts of {uai} "
                f"({leaving[uai] / active[uai]:.1%})") in message
    assert message.count(" active accounts of ") == len(over)
    expected = Counter(uais(e)[0] for dn, e in stored.items() if dn.lower() in leaving_dns)
    assert {u: c["people deactivate"] for u, c in dry.changes.per_uai.items()
            if c["people deactivate"]} == dict(expected)


def test_dry_run_writes_nothing(export: Path, farm: Farm, directory: Directory,
                               tmp_path: Path) -> None:
    feed = _copy(export, tmp_path)
    shutil.rmtree(feed / ".entfarm-cache", ignore_errors=True)
    before = directory.dump()
    result = run_import(feed, farm, directory, now=NOW, dry_run=True)
    assert result.changes.counts["people add"] > 150 and "changetype: add" in result.changes.ldif
    assert directory.dump() == before
    assert not (farm.state_dir / "aaf").exists()
    assert not (feed / ".entfarm-cache").exists()  # not even the export's record cache
    run_import(feed, farm, directory, now=NOW)
    assert (feed / ".entfarm-cache").is_dir()
    key = farm.state_dir / "aaf" / "record-cache.key"  # the MAC key of the farm's caches
    assert len(key.read_bytes()) == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600


def test_an_export_already_read_makes_no_record_cache(export: Path, farm: Farm,
                                                     directory: Directory,
                                                     tmp_path: Path) -> None:
    """A wave reads its export once and passes it: the import neither reads nor makes a cache."""
    feed = _copy(export, tmp_path)
    shutil.rmtree(feed / ".entfarm-cache", ignore_errors=True)
    read = load(feed)
    result = run_import(feed, farm, directory, now=NOW, export=read)
    assert result.changes.counts["people add"] > 150
    assert not (feed / ".entfarm-cache").exists()


def test_a_second_import_of_the_farm_is_refused_while_one_runs(
        export: Path, farm: Farm, directory: Directory) -> None:
    with import_lock(farm.state_dir):  # what a running import holds
        message = _refused(export, farm, directory)
        assert "another import of this farm is running" in message
        assert f"entfarm aaf import pid {os.getpid()} since " in message
        assert "import.lock" in message
        # A dry run writes nothing: it runs beside an import.
        assert run_import(export, farm, directory, now=NOW, dry_run=True).changes.changes
    assert run_import(export, farm, directory, now=NOW).changes.counts["people add"] > 150


def test_logins_are_written_again_only_when_one_is_new(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path) -> None:
    run_import(export, farm, directory, now=NOW)
    logins_file = farm.state_dir / "aaf" / "logins.json"
    first = logins_file.stat().st_ino
    logins = json.loads(logins_file.read_text(encoding="utf-8"))
    assert len(logins) > 150
    run_import(export, farm, directory, now=NOW + dt.timedelta(days=1))
    assert logins_file.stat().st_ino == first  # nothing new: not rewritten
    feed = _copy(export, tmp_path)
    generate_delta(feed, feed, seed=3, share=0.05)
    delta = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=2))
    assert delta.changes.counts["people add"] >= 1
    after = json.loads(logins_file.read_text(encoding="utf-8"))
    assert logins_file.stat().st_ino != first
    assert after.items() >= logins.items() and len(after) > len(logins)  # kept, and the new
    assert {e["uid"][0] for e in _people(directory).values()} <= set(after.values())


def test_an_unreadable_logins_file_stops_the_import_before_it_writes(
        export: Path, farm: Farm, directory: Directory) -> None:
    run_import(export, farm, directory, now=NOW)
    logins_file = farm.state_dir / "aaf" / "logins.json"
    for broken, said in (("{\"x\": ", "cannot be read"), ("[1, 2]", "found list")):
        logins_file.write_text(broken, encoding="utf-8")
        before = directory.dump()
        with pytest.raises(UserError) as caught:
            run_import(export, farm, directory, now=NOW + dt.timedelta(days=1))
        message = str(caught.value)
        assert str(logins_file) in message and said in message and "restore it" in message
        assert directory.dump() == before and logins_file.read_text(encoding="utf-8") == broken


def test_independent_runs_cut_at_parent_kind_and_repeated_dn() -> None:
    from entfarm.aaf import ldif
    from entfarm.aaf.importer import independent_runs

    base = "dc=x"
    parts = [
        ldif.add(f"ou=people,{base}", {"ou": ["people"]}),
        ldif.add(f"ou=groups,{base}", {"ou": ["groups"]}),
        ldif.add(f"uid=a,ou=people,{base}", {"uid": ["a"]}),
        ldif.modify(f"uid=b,ou=people,{base}", {"sn": ["B"]}),
        ldif.add(f"uid=é\\,c,ou=people,{base}", {"uid": ["é,c"]}),  # a dn:: line, an escape
        ldif.modify(f"UID=A,ou=people,{base}", {"sn": ["A"]}),  # the same entry again
        ldif.add(f"cn=g,ou=groups,{base}", {"member": [f"uid=a,ou=people,{base}"]}),
        ldif.delete(f"cn=h,ou=groups,{base}"),
        ldif.delete(f"uid=z,ou=people,{base}"),
    ]
    runs = independent_runs(parts)
    assert [len(r) for r in runs] == [2, 3, 1, 1, 1, 1]
    assert [p for r in runs for p in r] == parts  # nothing lost, order kept
    assert ldif.target(parts[4]) == (f"uid=é\\,c,ou=people,{base}", "add")
    assert ldif.parent(f"uid=é\\,c,ou=people,{base}") == f"ou=people,{base}"


def test_ldif_parse_reads_every_form_ldapsearch_and_the_writer_use() -> None:
    from entfarm.aaf import ldif

    entry = {"objectClass": ["inetOrgPerson"], "cn": ["Élodie Ça: va", " lead", "trail "],
             "sn": ["plain: with colon"], "description": [""], "mail": ["a@b.c"]}
    written = ldif.add("uid=é\\,c,ou=people,dc=x", entry)
    text = (written.split("\n", 1)[1].replace("changetype: add\n", "", 1)).encode()
    dn_line = written.split("\n", 1)[0]
    data = (b"# extended LDIF\n" + dn_line.encode() + b"\n" + text + b"\n"
            + b"dn: uid=b,ou=people,dc=x\r\nSN: folded\r\n  value\r\nmail:direct\r\n\r\n"
            + b"stray: after a blank line\n")
    got = ldif.parse(data, ["sn", "mail"])
    assert got == {
        "uid=é\\,c,ou=people,dc=x": entry,
        "uid=b,ou=people,dc=x": {"sn": ["folded value"], "mail": ["direct"]},
    }


def test_parallel_streams_finish_and_report_a_failed_one(directory: Directory) -> None:
    from entfarm.aaf import ldif
    from entfarm.aaf.transport import TransportError

    people = f"ou=people,{directory.base}"
    directory.apply(ldif.add(people, {"objectClass": ["organizationalUnit"], "ou": ["people"]}))

    def person(i: int) -> str:
        return ldif.add(f"uid=p{i},{people}", {"objectClass": ["inetOrgPerson"],
                                               "uid": [f"p{i}"], "cn": [f"P {i}"], "sn": ["P"]})

    parts = [person(i) for i in range(200)]
    parts[10] = ldif.add(f"uid=p10,{people}", {"objectClass": ["inetOrgPerson"],
                                               "uid": ["p10"]})  # no sn, no cn: refused
    with pytest.raises(TransportError, match="ldapmodify failed"):
        directory.apply_parts(parts, streams=4)
    written = directory.search(people, "(objectClass=inetOrgPerson)", ("uid",))
    got = {e["uid"][0] for e in written.values()}
    # The failed stream (records 0-49) stopped at its bad record; the other three finished.
    assert got == {f"p{i}" for i in [*range(10), *range(50, 200)]}


def test_failed_apply_keeps_the_codes_of_the_accounts_it_wrote(
        export: Path, farm: Farm, directory: Directory, monkeypatch: pytest.MonkeyPatch) -> None:
    from entfarm.aaf.transport import TransportError

    real = Directory._ldapmodify
    failed: list[int] = []

    def half_then_fail(self: Directory, parts: list[str]) -> None:
        if not failed and ",ou=people," in parts[0].partition("\n")[0]:
            failed.append(len(parts))  # the first stream of people: half of it, then an error
            real(self, parts[:len(parts) // 2])
            raise TransportError("ldapmodify failed on local (exit 80): simulated", 80)
        real(self, parts)

    monkeypatch.setattr(Directory, "_ldapmodify", half_then_fail)
    with pytest.raises(UserError) as caught:
        run_import(export, farm, directory, now=NOW, bulk=False)
    message = str(caught.value)
    assert "simulated" in message and "running the same import again" in message.lower()
    present = {e["uid"][0] for e in _people(directory).values()}
    [csv_file] = (farm.state_dir / "aaf" / "distribution" / UAI).glob("comptes-*.csv")
    kept = {row.split(";")[0] for row in csv_file.read_text(encoding="utf-8").splitlines()[1:]}
    assert kept and kept == present  # every written account's code, no code of a missing one
    monkeypatch.setattr(Directory, "_ldapmodify", real)
    again = run_import(export, farm, directory, now=NOW + dt.timedelta(hours=1), bulk=False)
    rows = [row.split(";")[0] for path in again.distribution
            for row in path.read_text(encoding="utf-8").splitlines()[1:]]
    assert rows and not set(rows) & kept
    assert set(rows) | kept == {e["uid"][0] for e in _people(directory).values()}


def _comparable(parts: list[str]) -> list[str]:
    """Change records without what is random per run (one-time codes and their hashes)."""
    random_lines = ("userPassword:", "ENTPersonCodeActivation:", "ENTPersonNTHash:")
    return ["\n".join(line for line in part.split("\n") if not line.startswith(random_lines))
            for part in parts]


def test_the_same_change_set_on_several_cores_and_in_small_reads(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Digests computed by forked children and persons read in many chunks side by side give
    the change set that one process and one search give (a Delta with modifications,
    departures and arrivals; the children's slices must come back in order)."""
    from entfarm.aaf import forked, importer

    run_import(export, farm, directory, now=NOW)
    feed = _copy(export, tmp_path)
    generate_delta(feed, feed, seed=4, share=0.1)
    later = NOW + dt.timedelta(days=1)
    one = run_import(feed, farm, directory, now=later, dry_run=True)
    assert one.changes.counts["people modify"] and one.changes.counts["people deactivate"]
    forks: list[int] = []
    real_fork_each = forked.fork_each

    def counted(fn, args):  # type: ignore[no-untyped-def]
        forks.append(len(args))
        return real_fork_each(fn, args)

    monkeypatch.setattr(importer, "_PARALLEL_MIN_PEOPLE", 0)
    monkeypatch.setattr(importer, "_TARGETED_READ_CHUNK", 3)
    monkeypatch.setattr(forked, "cores", lambda: 3)
    monkeypatch.setattr(forked, "fork_each", counted)
    many = run_import(feed, farm, directory, now=later, dry_run=True)
    assert 2 in forks  # two children computed digests besides this process
    assert _comparable(many.changes.ldif_parts) == _comparable(one.changes.ldif_parts)
    assert many.changes.per_uai == one.changes.per_uai
    # Past its share, chunks already read are dropped for one search of every person.
    monkeypatch.setattr(importer, "_TARGETED_READ_MAX_SHARE", 0.05)
    said: list[str] = []
    whole = run_import(feed, farm, directory, now=later, dry_run=True, progress=said.append)
    assert any(" person entries in full (" in line for line in said), said
    assert _comparable(whole.changes.ldif_parts) == _comparable(one.changes.ldif_parts)


def _replica_tags(directory: Directory) -> dict[str, tuple[set[str], set[str]]]:
    """DN -> (the replication accounts it names, those of its établissements) for every entry
    the importer keeps; the UAIs come from the structure DNs, the group cn or the structure."""
    base = directory.base
    out: dict[str, tuple[set[str], set[str]]] = {}
    for sub, filt in (("people", "(ENTPersonJointure=*)"), ("structures", "(ENTStructureUAI=*)"),
                      ("groups", "(cn=*$*)")):
        found = directory.search(f"ou={sub},{base}", filt,
                                 ("objectClass", "ENTReplicaAccount", "ENTPersonEtablissements",
                                  "ENTStructureUAI", "cn"))
        for dn, e in found.items():
            uais = ({v.split(",")[0].split("=", 1)[1] for v in e.get("ENTPersonEtablissements", [])}
                    if sub == "people" else set(e["ENTStructureUAI"]) if sub == "structures"
                    else {e["cn"][0].split("$")[0]})
            named = set(e.get("ENTReplicaAccount", []))
            if named:
                assert "ENTReplicated" in e["objectClass"], dn
            out[dn] = (named, {replica_account_dn(u, base) for u in uais})
    return out


def test_every_entry_names_the_replication_accounts_of_its_etablissements(
        export: Path, farm: Farm, directory: Directory) -> None:
    """ENTReplicaAccount, which the replica access rules compare with (dnattr): a person names
    the account of each of its établissements, a structure its own, a group its collège's."""
    run_import(export, farm, directory, now=NOW)
    tags = _replica_tags(directory)
    assert len(tags) > 150
    wrong = {dn: t for dn, t in tags.items() if t[0] != t[1]}
    assert not wrong, list(wrong.items())[:3]


def test_an_import_tags_a_directory_filled_before_mapping_version_3(
        export: Path, farm: Farm, directory: Directory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory imported by mapping version 2 (no ENTReplicaAccount), with people already
    deactivated, whom no later import rebuilds: the next import tags every entry, deactivated
    people included, and the one after changes nothing."""
    from entfarm.aaf import mapping

    feed = _copy(export, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(mapping, "MAPPING_VERSION", "2")
        run_import(feed, farm, directory, now=NOW)
        generate_delta(feed, feed, seed=3, share=0.02)
        assert run_import(feed, farm, directory,
                          now=NOW + dt.timedelta(days=1)).changes.counts["people deactivate"]
    strip = "".join(
        f"dn: {dn}\nchangetype: modify\ndelete: ENTReplicaAccount\n-\n"
        f"delete: objectClass\nobjectClass: ENTReplicated\n\n"
        for dn, (named, _) in _replica_tags(directory).items() if named)
    directory.apply(strip)
    assert not any(named for named, _ in _replica_tags(directory).values())
    upgraded = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=2))
    assert upgraded.changes.counts["people tag"] >= 1  # the deactivated
    tags = _replica_tags(directory)
    wrong = {dn: t for dn, t in tags.items() if t[0] != t[1]}
    assert not wrong, list(wrong.items())[:3]
    again = run_import(feed, farm, directory, now=NOW + dt.timedelta(days=3))
    assert again.changes.changes == 0, again.changes.ldif[:2000]


def test_refuses_a_directory_whose_schema_is_older_than_the_importer(
        export: Path, farm: Farm, tmp_path: Path) -> None:
    """Imported before the directory was converged to the schema evolution it writes: a
    clear refusal, the directory untouched."""
    root = tmp_path / "old-schema"
    init_slapd(root, schemas=SCHEMAS[:-1])
    server = Slapd(root)
    server.start()
    try:
        server.transport.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", server.uri], stdin=(
            b"dn: dc=fr\nobjectClass: dcObject\nobjectClass: organization\ndc: fr\no: fr\n\n"))
        old = server.new_base()
        text = (REPO / "inventories" / "lab" / "farm.yml").read_text(encoding="utf-8")
        farm_yml = farm.inventory_dir / "farm.yml"
        farm_yml.write_text(text.replace("dc=ac-orleans-tours,dc=fr", old.base), encoding="utf-8")
        before = old.dump()
        with pytest.raises(ImportRefused) as refused:
            run_import(export, load_farm(farm.inventory_dir), old, now=NOW)
        assert "entfarm deploy --tags directory" in str(refused.value)
        assert "ENTReplicated" in str(refused.value)
        assert old.dump() == before
    finally:
        server.stop()
