"""AAF export reading and checks, logins and generation: no directory needed."""

from __future__ import annotations

import hashlib
import marshal
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from entfarm.aaf import export as export_module
from entfarm.aaf import forked
from entfarm.aaf.export import RecordCache, load
from entfarm.aaf.generate import add_request, generate, generate_delta
from entfarm.aaf.mapping import allocate_logins, fold, login_base
from entfarm.cli import cli

HEAD = '<?xml version="1.0" encoding="ISO-8859-15"?>\n<ficAlimMENESR>\n'
ETAB = add_request("categorieStructure", "Etablissement", "4001",
                   {"ENTStructureUAI": ["0360005K"], "ENTStructureNomCourant": ["CLG"]})


def _write(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes((HEAD + body + "</ficAlimMENESR>\n").encode("iso-8859-15"))
    return path


def test_reads_latin9_and_applies_structures_first_then_later_deltas(tmp_path: Path) -> None:
    eleve = add_request("categoriePersonne", "Eleve", "1", {
        "sn": ["Lœuillet"], "givenName": ["Zoé"], "ENTEleveClasses": ["4001$3A"],
        "ENTPersonStructRattach": ["4001"], "mail": [""]})
    _write(tmp_path, "ENT_18_Complet_20250901_Eleve_0000.xml", eleve)
    _write(tmp_path, "ENT_18_Complet_20250901_EtabEducNat_0000.xml", ETAB)
    _write(tmp_path, "ENT_18_Complet_20250801_Eleve_0000.xml", "")  # older: ignored
    _write(tmp_path, "ENT_18_Delta_20250902_Eleve_0000.xml",
           '<modifyRequest><identifier><id>1</id></identifier><modifications>'
           '<modification name="sn" operation="replace"><value>Cœur-€</value></modification>'
           "</modifications></modifyRequest>")
    export = load(tmp_path)
    assert export.problems == []
    assert export.files[0].path.name.endswith("EtabEducNat_0000.xml")
    assert export.persons["1"].attrs["sn"] == ["Cœur-€"]
    assert export.persons["1"].attrs["givenName"] == ["Zoé"]
    assert "mail" not in export.persons["1"].attrs or export.persons["1"].attrs["mail"] == []
    assert export.counts_per_uai()["0360005K"]["Eleve"] == 1
    assert len(export.ignored_files) == 1


def test_delta_without_complet_is_blocking(tmp_path: Path) -> None:
    _write(tmp_path, "ENT_18_Delta_20250902_EtabEducNat_0000.xml", ETAB)
    [problem] = load(tmp_path).blocking
    assert "without a preceding Complet" in problem.message


def test_unknown_category_and_categorie_personne_are_blocking(tmp_path: Path) -> None:
    _write(tmp_path, "ENT_18_Complet_20250901_EtabEducNat_0000.xml", ETAB)
    _write(tmp_path, "ENT_18_Complet_20250901_Visiteur_0000.xml", "")
    _write(tmp_path, "ENT_18_Complet_20250901_Eleve_0000.xml",
           add_request("categoriePersonne", "Martien", "9", {"sn": ["X"]}))
    messages = [p.render() for p in load(tmp_path).blocking]
    assert any("unknown category 'Visiteur'" in m for m in messages)
    assert any("record 9" in m and "unknown categoriePersonne 'Martien'" in m for m in messages)


def test_check_cli_reports_truncation_with_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path, "ENT_18_Complet_20250901_EtabEducNat_0000.xml", ETAB)
    path = tmp_path / "ENT_18_Complet_20250901_Eleve_0000.xml"
    path.write_bytes((HEAD + add_request("categoriePersonne", "Eleve", "1", {"sn": ["A"]})
                      ).encode("iso-8859-15")[:-30])
    result = CliRunner().invoke(cli, ["aaf", "check", str(tmp_path)])
    assert result.exit_code != 0
    assert f"{path}:" in result.output and "malformed or truncated XML" in result.output


def test_logins_fold_accents_keep_hyphens_and_suffix_homonyms() -> None:
    assert fold("Éloïse") == "eloise" and fold("Lœuillet") == "loeuillet"
    assert login_base("Jean-Baptiste", "De La Fontaine") == "jean-baptiste.de-la-fontaine"
    assert login_base("Noé", "N'Diaye") == "noe.ndiaye"


def test_generated_export_is_deterministic_checks_clean_and_logins_are_stable(
        tmp_path: Path) -> None:
    etabs = [("0360005K", "Collège Les Capucins", "036"), ("0450022E", "Collège J.", "045")]
    a = generate(etabs, tmp_path / "a", date="20250901", seed=4, eleves_per_college=60)
    generate(etabs, tmp_path / "b", date="20250901", seed=4, eleves_per_college=60)
    for f in a.files:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    export = load(tmp_path / "a")
    assert export.blocking == []
    staff_in_two = [p for p in export.persons.values() if p.category == "PersEducNat"
                    and len(export.structure_ids(p)) == 2]
    assert staff_in_two
    generate_delta(tmp_path / "a", tmp_path / "a", seed=1)
    assert load(tmp_path / "a").blocking == []

    from entfarm.aaf.mapping import Desired, Provisioned

    people = {f"AAF${i}": Provisioned(p, f"AAF${i}", ["4001"], ["National_ELV"])
              for i, p in export.persons.items()}
    d = Desired("dc=x", people, {}, {}, __import__("collections").Counter(), {})
    first = allocate_logins(d, {}, {})
    assert len(set(first.values())) == len(first)  # homonyms got suffixes
    assert any(login[-1].isdigit() for login in first.values())
    # A login handed out before is kept even if the directory lost the entry.
    assert allocate_logins(d, {}, first) == first


def test_whole_file_and_streamed_reading_give_the_same_records_and_faults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files up to _WHOLE_FILE_MAX are parsed at once, bigger ones streamed: both readings must
    yield the same records, and for a faulty file the same records before the same error."""
    generate([("0360005K", "Collège A", "036"), ("0450040Z", "Collège B", "045")],
             tmp_path / "ok", date="20250901", seed=3, eleves_per_college=40)
    eleve = next((tmp_path / "ok").glob("*_Eleve_0000.xml"))
    body = eleve.read_bytes()
    cut = body.rfind(b"<addRequest")
    faulty = {
        "truncated": body[:cut + 40],
        "garbage-midway": body[:cut] + b"<addRequest><oops></addRequest>" + body[cut:],
        "wrong-root": body.replace(b"ficAlimMENESR", b"autreChose"),
        "empty": b"",
    }
    cases = [eleve]
    for name, data in faulty.items():
        path = tmp_path / f"{name}.xml"
        path.write_bytes(data)
        cases.append(path)

    def read(path: Path) -> tuple[list[export_module.Record], str | None]:
        records: list[export_module.Record] = []
        try:
            for record in export_module.iter_records(path):
                records.append(record)
        except ET.ParseError as exc:
            return records, str(exc)
        return records, None

    whole = [read(p) for p in cases]
    monkeypatch.setattr(export_module, "_WHOLE_FILE_MAX", 0)
    streamed = [read(p) for p in cases]
    assert whole == streamed
    assert len(whole[0][0]) > 40 and whole[0][1] is None
    assert all(error for _records, error in whole[1:])
    assert whole[1][0] and whole[2][0]  # the records before the fault are read
    assert "expected <ficAlimMENESR>" in (whole[3][1] or "")


def _summary(export: export_module.Export) -> tuple[object, ...]:
    return ({i: (p.category, p.attrs, p.file) for i, p in export.persons.items()},
            export.structures, sorted(export.deleted), [f.path.name for f in export.files],
            [p.render() for p in export.problems], dict(export.records))


def test_reading_on_several_cores_gives_what_one_process_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last files parsed in forked children, the records applied in the planned order: the
    same export, problems included, as one process reading every file (here with a Delta and a
    truncated file in a child's share; the Complet's parents and the Delta that changes them
    in two different children)."""
    feed = tmp_path / "feed"
    generate([("0360005K", "Collège A", "036"), ("0450040Z", "Collège B", "045")],
             feed, date="20250901", seed=5, eleves_per_college=60)
    generate_delta(feed, feed, seed=6, share=0.1)
    staff = next(feed.glob("*_Complet_*_PersEducNat_*.xml"))
    body = staff.read_bytes()
    staff.write_bytes(body[:body.rfind(b"<addRequest") + 25])  # truncated after some records
    monkeypatch.setattr(forked, "cores", lambda: 1)
    alone = load(feed)
    forks: list[object] = []
    real_fork = forked.fork_each

    def counted(fn: object, args: list[object]) -> object:
        forks.extend(args)
        return real_fork(fn, args)  # type: ignore[arg-type]

    monkeypatch.setattr(forked, "fork_each", counted)
    monkeypatch.setattr(forked, "cores", lambda: 4)
    monkeypatch.setattr(export_module, "_PARALLEL_MIN_BYTES", 0)
    shared = load(feed)
    # Three children: the Complet's staff, its parents, the Delta (split by size).
    assert [[p.name.split("_")[2] for p in paths] for paths in forks] == [  # type: ignore[attr-defined]
        ["Complet"], ["Complet"], ["Delta", "Delta", "Delta"]]
    assert _summary(shared) == _summary(alone)
    assert any("malformed or truncated XML" in p.message for p in shared.problems)
    assert len(shared.persons) > 200 and shared.has_delta


KEY = bytes(range(32))  # the farm's record-cache key (the importer keeps it in its state)


def _hows(lines: list[str]) -> dict[str, str]:
    """file name -> "cached" | "parsed", from the reader's progress lines."""
    out = {}
    for line in lines:
        name, _, rest = line.removeprefix("reading ").partition(" (")
        out[name] = rest.rstrip(")").rsplit(", ", 1)[1]
    return out


def test_the_record_cache_gives_what_parsing_gives_and_follows_the_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second read loads every clean file from the cache and builds the same export; a file
    rewritten, an entry damaged or shaped wrong, or a file with a fault is parsed again (and
    the fault reported again); entries of files no longer applied are removed."""
    feed = tmp_path / "feed"
    generate([("0360005K", "Collège A", "036"), ("0450040Z", "Collège B", "045")],
             feed, date="20250901", seed=5, eleves_per_college=60)
    monkeypatch.setattr(export_module, "_PARALLEL_MIN_BYTES", 0)  # children parse too
    monkeypatch.setattr(forked, "cores", lambda: 2)
    parsed = load(feed)  # no cache at all
    assert not (feed / RecordCache.DIRNAME).exists()
    names = sorted(f.path.name for f in parsed.files)

    def cached_load() -> tuple[export_module.Export, dict[str, str]]:
        lines: list[str] = []
        return load(feed, lines.append, cache=RecordCache(feed, KEY)), _hows(lines)

    first, hows = cached_load()
    assert hows == dict.fromkeys(names, "parsed") and _summary(first) == _summary(parsed)
    root = feed / RecordCache.DIRNAME
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    entries = sorted(root.iterdir())
    assert len(entries) == len(names)
    assert all(stat.S_IMODE(e.stat().st_mode) == 0o600 for e in entries)
    inodes = {e.name: e.stat().st_ino for e in entries}
    second, hows = cached_load()
    assert hows == dict.fromkeys(names, "cached") and _summary(second) == _summary(parsed)
    assert {e.name: e.stat().st_ino for e in root.iterdir()} == inodes  # read, not rewritten

    # A Delta dropped in is parsed, the rest still comes from the cache.
    generate_delta(feed, feed, seed=6, share=0.1)
    with_delta, hows = cached_load()
    deltas = {n for n in hows if "_Delta_" in n}
    assert deltas and all(hows[n] == ("parsed" if n in deltas else "cached") for n in hows)
    assert _summary(with_delta) == _summary(load(feed))
    # A rewritten file is parsed again (its entry is found by content), and the entry of its
    # old content removed.
    eleves = next(feed.glob("*_Complet_*_Eleve_0000.xml"))
    eleves.write_bytes(eleves.read_bytes().replace(b"4001$", b"4002$", 1))
    before = set(root.iterdir())
    changed, hows = cached_load()
    assert hows[eleves.name] == "parsed" and list(hows.values()).count("parsed") == 1
    assert _summary(changed) == _summary(load(feed)) != _summary(with_delta)
    assert len(set(root.iterdir()) - before) == 1 and len(before - set(root.iterdir())) == 1
    # A damaged entry, or one whose checksum is right but whose content is not records: parsed.
    staff = next(feed.glob("*_Complet_*_PersEducNat_*.xml"))
    entry = root / RecordCache(feed, KEY).key(staff)  # type: ignore[operator]
    blob = entry.read_bytes()
    at = blob.index(b"4001$")  # one digit of one value: still a valid marshal stream
    entry.write_bytes(blob[:at] + b"4009$" + blob[at + 5:])
    damaged, hows = cached_load()
    assert hows[staff.name] == "parsed" and _summary(damaged) == _summary(changed)
    data = marshal.dumps({"not": "records"})
    entry.write_bytes(hashlib.blake2b(data, key=KEY, digest_size=32).digest() + data)
    shaped, hows = cached_load()
    assert hows[staff.name] == "parsed" and _summary(shaped) == _summary(changed)
    # Records of the right shape under any other key (or none) are never loaded.
    forged = marshal.dumps(([("addRequest", "x", {}, {})], None))
    for mac in (hashlib.blake2b(forged, digest_size=32), hashlib.blake2b(
            forged, key=bytes(32), digest_size=32)):
        entry.write_bytes(mac.digest() + forged)
        again, hows = cached_load()
        assert hows[staff.name] == "parsed" and _summary(again) == _summary(changed)
    # A file with a fault is never cached: its problem is found on every read.
    body = staff.read_bytes()
    staff.write_bytes(body[:body.rfind(b"<addRequest") + 25])
    for _ in range(2):
        faulty, hows = cached_load()
        assert hows[staff.name] == "parsed"
        assert not (root / RecordCache(feed, KEY).key(staff)).exists()  # type: ignore[operator]
        assert any("malformed or truncated XML" in p.message and staff.name in p.file
                   for p in faulty.problems)
    assert _summary(faulty) == _summary(load(feed))


def test_a_dry_read_writes_no_cache_and_a_cache_others_can_write_is_not_used(
        tmp_path: Path) -> None:
    feed = tmp_path / "feed"
    generate([("0360005K", "Collège A", "036")], feed, date="20250901", seed=5,
             eleves_per_college=20)
    lines: list[str] = []
    load(feed, lines.append, cache=RecordCache(feed, KEY, write=False))
    assert not (feed / RecordCache.DIRNAME).exists() and set(_hows(lines).values()) == {"parsed"}
    load(feed, cache=RecordCache(feed, KEY))
    root = feed / RecordCache.DIRNAME
    lines.clear()
    load(feed, lines.append, cache=RecordCache(feed, KEY, write=False))
    assert set(_hows(lines).values()) == {"cached"}  # a dry read uses what is there
    root.chmod(0o770)  # group-writable: someone else could plant records
    lines.clear()
    load(feed, lines.append, cache=RecordCache(feed, KEY))
    assert set(_hows(lines).values()) == {"parsed"}


def test_split_cuts_contiguous_slices_of_about_equal_weight() -> None:
    split = forked.split
    assert split([], 2) == []
    assert split([5], 3) == [(0, 1)]
    assert split([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert split([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 11)]
    slices = split([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert slices[0][0] == 0 and slices[-1][1] == 8 and len(slices) == 3
    assert all(a < b for a, b in slices)
    assert all(slices[i][1] == slices[i + 1][0] for i in range(len(slices) - 1))
