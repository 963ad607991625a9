"""Streaming reader of AAF exports (``ficAlimMENESR`` files) and their offline checks.

An export directory holds numbered files per category and per batch:
``ENT_<…>_{Complet|Delta}_<AAAAMMJJ>_<category>_NNNN.xml``. The latest Complet is applied, then
every later Delta in date order; within a batch structures come first whatever the file order,
because people's ``$``-composite values are keyed by the AAF structure id.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import hmac
import marshal
import os
import re
import stat
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from ..uai import uai_problem
from . import forked

FILE_RE = re.compile(
    r"^ENT_(?P<prefix>.*)_(?P<kind>Complet|Delta)_(?P<date>[0-9]{8})_(?P<category>[A-Za-z]+)"
    r"_(?P<number>[0-9]{4})\.xml$"
)
STRUCTURE_CATEGORY = "EtabEducNat"
PERSON_CATEGORIES = ("Eleve", "PersRelEleve", "PersEducNat")
# Nomenclatures: read for well-formedness and counted, not provisioned.
NOMENCLATURE_CATEGORIES = ("MatEducNat", "MefEducNat")
KNOWN_CATEGORIES = (STRUCTURE_CATEGORY, *PERSON_CATEGORIES, *NOMENCLATURE_CATEGORIES)
REQUESTS = ("addRequest", "modifyRequest", "deleteRequest")
# Person attributes whose values are ``<structure id>$…``.
COMPOSITE_ATTRIBUTES = (
    "ENTEleveClasses", "ENTEleveGroupes", "ENTPersonFonctions", "ENTAuxEnsClasses",
    "ENTAuxEnsGroupes", "ENTAuxEnsClassesMatieres", "ENTAuxEnsGroupesMatieres",
    "ENTAuxEnsMatiereEnseignEtab",
)
STRUCTURE_ID_ATTRIBUTES = ("ENTPersonStructRattach",)

Attrs = dict[str, list[str]]


@dataclass(frozen=True)
class AafProblem:
    """One thing wrong in an export, located by file (and line) and record id."""

    file: str
    record: str | None
    message: str
    blocking: bool = True
    line: int | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        record = f" record {self.record}:" if self.record else ""
        level = "" if self.blocking else " (warning)"
        return f"{where}:{record}{level} {self.message}"


@dataclass
class ExportFile:
    path: Path
    kind: str  # Complet | Delta
    date: str  # AAAAMMJJ
    category: str
    number: int


@dataclass
class Person:
    id: str
    category: str  # Eleve | PersRelEleve | PersEducNat
    attrs: Attrs
    file: str


@dataclass
class Export:
    """The population an export describes once its batches are applied."""

    directory: Path
    structures: dict[str, Attrs] = field(default_factory=dict)
    structure_files: dict[str, str] = field(default_factory=dict)
    persons: dict[str, Person] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)  # removed by a Delta's deleteRequest
    files: list[ExportFile] = field(default_factory=list)  # applied, in order
    ignored_files: list[ExportFile] = field(default_factory=list)  # older than the Complet
    problems: list[AafProblem] = field(default_factory=list)
    records: Counter[str] = field(default_factory=Counter)  # "<category> <request>" -> count
    nomenclature: Counter[str] = field(default_factory=Counter)
    has_delta: bool = False

    @property
    def blocking(self) -> list[AafProblem]:
        return [p for p in self.problems if p.blocking]

    def uai_of(self, structure_id: str) -> str | None:
        values = self.structures.get(structure_id, {}).get("ENTStructureUAI")
        return values[0] if values else None

    def structure_ids(self, person: Person) -> list[str]:
        """Structures a person belongs to, main one first, in a stable order."""
        ids: list[str] = []
        for name in STRUCTURE_ID_ATTRIBUTES:
            ids += person.attrs.get(name, [])
        for name in COMPOSITE_ATTRIBUTES:
            ids += [v.split("$", 1)[0] for v in person.attrs.get(name, [])]
        return list(dict.fromkeys(i for i in ids if i))

    def counts_per_uai(self) -> dict[str, Counter[str]]:
        """UAI -> category -> number of persons attached (a person counts in each of its UAIs)."""
        out: dict[str, Counter[str]] = {}
        for sid in self.structures:
            out.setdefault(self.uai_of(sid) or f"?{sid}", Counter())
        parents: dict[str, set[str]] = {}
        for person in self.persons.values():
            uais = {self.uai_of(s) or f"?{s}" for s in self.structure_ids(person)}
            for uai in uais:
                out.setdefault(uai, Counter())[person.category] += 1
            if person.category == "Eleve":
                for link in person.attrs.get("ENTElevePersRelEleve", []):
                    parents.setdefault(link.split("$", 1)[0], set()).update(uais)
        for pid, uais in parents.items():
            parent = self.persons.get(pid)
            if parent is not None and parent.category == "PersRelEleve":
                for uai in uais:
                    out.setdefault(uai, Counter())["PersRelEleve"] += 1
        return out


def scan(directory: Path) -> tuple[list[ExportFile], list[AafProblem]]:
    """The export's files and the names that do not fit the AAF naming."""
    files: list[ExportFile] = []
    problems: list[AafProblem] = []
    if not directory.is_dir():
        return [], [AafProblem(str(directory), None, "not a directory of AAF export files")]
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() != ".xml":
            continue
        m = FILE_RE.match(path.name)
        if not m:
            problems.append(AafProblem(
                str(path), None,
                "file name does not follow ENT_<…>_{Complet|Delta}_<AAAAMMJJ>_<category>_NNNN.xml"))
            continue
        if m["category"] not in KNOWN_CATEGORIES:
            problems.append(AafProblem(
                str(path), None,
                f"unknown category {m['category']!r}; known: {', '.join(KNOWN_CATEGORIES)}"))
            continue
        files.append(ExportFile(path, m["kind"], m["date"], m["category"], int(m["number"])))
    if not files and not problems:
        problems.append(AafProblem(str(directory), None, "no AAF export file (ENT_*.xml) here"))
    return files, problems


def plan(files: list[ExportFile]) -> tuple[list[ExportFile], list[ExportFile], list[AafProblem]]:
    """Files to apply in order (latest Complet, then later Deltas by date), files ignored."""
    completes = sorted({f.date for f in files if f.kind == "Complet"})
    problems: list[AafProblem] = []
    if not completes:
        deltas = sorted({f.date for f in files if f.kind == "Delta"})
        if deltas:
            first = next(f for f in files if f.kind == "Delta" and f.date == deltas[0])
            problems.append(AafProblem(
                str(first.path), None,
                f"Delta of {deltas[0]} without a preceding Complet export; a Delta only "
                "applies on top of a Complet: add the latest Complet to this directory"))
        return [], list(files), problems
    base = completes[-1]
    order = {STRUCTURE_CATEGORY: 0, "MatEducNat": 1, "MefEducNat": 1}

    def key(f: ExportFile) -> tuple[str, int, int, str, int]:
        return (f.date, 0 if f.kind == "Complet" else 1, order.get(f.category, 2), f.category,
                f.number)

    applied = sorted(
        (f for f in files if (f.kind == "Complet" and f.date == base)
         or (f.kind == "Delta" and f.date > base)), key=key)
    ignored = [f for f in files if f not in applied]
    return applied, ignored, problems


def _values(attr: ET.Element) -> list[str]:
    out = []
    for v in attr:
        if v.tag == "value" and v.text:
            text = v.text.strip()
            if text:
                out.append(text)
    return out


def _attrs(element: ET.Element | None, item: str) -> Attrs:
    out: Attrs = {}
    if element is None:
        return out
    for attr in element:
        if attr.tag != item:
            continue
        name = attr.get("name")
        if name:
            if name in out:
                out[name].extend(_values(attr))
            else:
                out[name] = _values(attr)
    return out


Record = tuple[str, str | None, Attrs, Attrs]  # request, id, operational attrs, attributes
_CHUNK = 1 << 20
# Files up to this size are parsed whole (see iter_records).
_WHOLE_FILE_MAX = 16 << 20
_Events = Iterator[tuple[str, ET.Element]]


def _check_root(fh: BinaryIO) -> None:
    """Raise ET.ParseError unless the document element is ``ficAlimMENESR`` (before any record,
    as a document of another kind must not be read at all)."""
    parser = ET.XMLPullParser(events=("start",))
    while True:
        chunk = fh.read(1 << 14)
        if not chunk:
            parser.close()  # raises on an empty or truncated document
            return
        parser.feed(chunk)
        for _event, element in cast(_Events, parser.read_events()):
            if element.tag != "ficAlimMENESR":
                raise ET.ParseError(f"root element is <{element.tag}>, expected <ficAlimMENESR>")
            return


def _record(element: ET.Element) -> Record:
    rid: str | None = None
    found_id = False
    operational = attributes_el = None
    modifications: list[ET.Element] = []
    for child in element:
        tag = child.tag
        if tag == "identifier" and not found_id:
            for i in child:
                if i.tag == "id":
                    rid = (i.text or "").strip() or None
                    found_id = True
                    break
        elif tag == "operationalAttributes":
            operational = child if operational is None else operational
        elif tag == "attributes":
            attributes_el = child if attributes_el is None else attributes_el
        elif tag == "modifications":
            modifications.append(child)
    if element.tag == "modifyRequest":
        attributes: Attrs = {}
        for mods in modifications:
            for mod in mods:
                if mod.tag != "modification":
                    continue
                name = mod.get("name")
                if name:
                    attributes.setdefault(name, []).extend(_values(mod))
    else:
        attributes = _attrs(attributes_el, "attr")
    return element.tag, rid, _attrs(operational, "attr"), attributes


def iter_records(path: Path) -> Iterator[Record]:
    """Records of one file; raises ET.ParseError on malformed or truncated XML, after the
    records before the fault.

    A file of at most _WHOLE_FILE_MAX bytes is parsed at once by the C parser, which builds the
    tree without handing an event per element back to Python: half the time of the streamed
    reading on 100 000-person exports, for a tree of about 8 times the file's size held while
    its records are read. Bigger files, and any file that does not parse, are streamed (so a
    fault is reported after the same records either way).
    """
    try:
        whole = path.stat().st_size <= _WHOLE_FILE_MAX
    except OSError:
        whole = False  # open() below raises the error the caller reports
    if whole:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            pass
        else:
            if root.tag != "ficAlimMENESR":
                raise ET.ParseError(
                    f"root element is <{root.tag}>, expected <ficAlimMENESR>")
            yield from _tree_records(root)
            return
    yield from _streamed_records(path)


def _tree_records(root: ET.Element) -> Iterator[Record]:
    requests = frozenset(REQUESTS)
    for child in root:
        if child.tag in requests:
            yield _record(child)
        else:  # requests are the root's children; look deeper as the streamed reader does
            for element in child.iter():
                if element.tag in requests:
                    yield _record(element)
        child.clear()  # the tree shrinks as its records are read


def _streamed_records(path: Path) -> Iterator[Record]:
    """Only end events are asked of the parser and children are walked directly: ``iterparse``
    with start events and path lookups took most of the import's reading time."""
    with open(path, "rb") as fh:
        _check_root(fh)
        fh.seek(0)
        parser = ET.XMLPullParser(events=("end",))
        requests = frozenset(REQUESTS)
        while True:
            chunk = fh.read(_CHUNK)
            if chunk:
                parser.feed(chunk)
            else:
                parser.close()
            for _event, element in cast(_Events, parser.read_events()):
                if element.tag in requests:
                    yield _record(element)
                    # Cleared records stay as empty shells under the root (a few dozen bytes
                    # each) because end events do not give the root to clear.
                    element.clear()
            if not chunk:
                return


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: an export is hundreds of thousands of small acyclic
    objects, and each full collection walks all of them (it took 80 % of reading a 100 000-person
    export). Reference counting still frees everything."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load(directory: Path, progress: Callable[[str], None] | None = None, *,
         cache: RecordCache | None = None) -> Export:
    """Read and apply an export directory, collecting every problem (never raising on them).

    ``cache``: the files' records already parsed (see :class:`RecordCache`); None parses every
    file.
    """
    return start_load(directory, cache=cache).finish(progress)


def start_load(directory: Path, *, cache: RecordCache | None = None) -> Loading:
    """Plan the export and start its parallel readers (see :class:`Loading`); a caller that
    starts threads of its own (the importer's directory searches) does so after this."""
    with no_gc():
        return Loading(directory, cache)


class Loading:
    """An export being read. The files the cache does not hold are parsed on every core: the
    last ones (by size) in forked children started here, before the caller starts any thread,
    the first ones in :meth:`finish`, which also loads the cached ones and applies all the
    records here, in the planned order, exactly as if one process had parsed them all."""

    def __init__(self, directory: Path, cache: RecordCache | None = None):
        self.directory = directory
        files, problems = scan(directory)
        self.applied, ignored, plan_problems = plan(files)
        self.export = Export(directory=directory, files=self.applied, ignored_files=ignored,
                             problems=problems + plan_problems)
        self.cache = cache
        self.keys = [cache.key(f.path) if cache else None for f in self.applied]
        self.cached = {i for i, k in enumerate(self.keys) if cache and k and cache.has(k)}
        self.to_parse = [i for i in range(len(self.applied)) if i not in self.cached]
        sizes = [_size(self.applied[i].path) for i in self.to_parse]
        self.slices = (forked.split(sizes, forked.cores())
                       if sum(sizes) >= _PARALLEL_MIN_BYTES else [(0, len(self.to_parse))])
        self.children = forked.fork_each(_read_slice, [
            [self.applied[i].path for i in self.to_parse[a:b]] for a, b in self.slices[1:]])

    def finish(self, progress: Callable[[str], None] | None = None) -> Export:
        with no_gc():
            try:
                return self._finish(progress)
            finally:
                for child in self.children:
                    child.cancel()

    def _finish(self, progress: Callable[[str], None] | None) -> Export:
        export, applied, cache = self.export, self.applied, self.cache
        # Which child parses which file, and where in its result the file's records are.
        from_child = {self.to_parse[a + k]: (c, k) for c, (a, b) in enumerate(self.slices[1:])
                      for k in range(b - a)}
        results: dict[int, list[FileRead]] = {}
        for n, f in enumerate(applied):
            key = self.keys[n]
            read = cache.get(key) if cache and key and n in self.cached else None
            if read is not None:
                how = "cached"
            elif n in from_child:
                c, k = from_child[n]
                if c not in results:
                    results[c] = self.children[c].result()
                read, how = results[c][k], "parsed"
            else:
                read, how = _read_file(f.path), "parsed"
            if progress:
                progress(f"reading {f.path.name} ({n + 1} of {len(applied)}, {how})")
            _apply_file(export, f, read)
            if cache and key and how == "parsed":
                cache.put(key, read)
        if cache:
            cache.keep_only([k for k in self.keys if k])
        _check_references(export)
        return export


class RecordCache:
    """The records of export files already parsed, found by the file's content (SHA-256) and by
    this reader's own code, so that a changed file or a changed reader parses again.

    A daily import re-reads the Complet it read the day before: loading its records (marshal:
    strings, lists, dicts and tuples only) takes about a tenth of parsing its XML. The cache is
    a hidden directory of the export directory itself, so that it lives and goes with the
    export (whose retention the académie's rules set; an export holds minors' personal data);
    each import keeps only the entries of the files it applied. Every entry carries a MAC
    (keyed BLAKE2b, ``key``: the farm's, kept in its private state directory), checked before
    anything is unmarshalled: an entry this farm's importer did not write is parsed over, never
    loaded. Its files are the owner's only, and a cache directory that someone else owns or
    could write is not used at all. ``write``: False reads what is there and writes nothing
    (a dry run).
    """

    DIRNAME = ".entfarm-cache"

    def __init__(self, export_directory: Path, key: bytes, *, write: bool = True):
        self.root = export_directory / self.DIRNAME
        self._key = key
        self.write = write
        self.usable = self._usable()

    def _usable(self) -> bool:
        try:
            st = self.root.lstat()
        except FileNotFoundError:
            if not self.write:
                return False
            try:
                self.root.mkdir(mode=0o700)
            except OSError:  # a read-only export directory: parse every time
                return False
            st = self.root.lstat()
        except OSError:
            return False
        return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))

    def key(self, path: Path) -> str | None:
        if not self.usable:
            return None
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return None  # the reader reports the error
        return f"{digest.hexdigest()[:40]}-{_reader_id()}"

    def has(self, key: str) -> bool:
        return (self.root / key).is_file()

    def get(self, key: str) -> FileRead | None:
        """The cached records, or None (absent, unreadable or damaged: the file is parsed)."""
        try:
            blob = (self.root / key).read_bytes()
            check, data = blob[:32], blob[32:]
            if not hmac.compare_digest(self._mac(data), check):
                return None
            value = marshal.loads(data)
        except (OSError, ValueError, EOFError, TypeError):
            return None
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], list)
                and value[1] is None):
            return None
        return cast(FileRead, value)

    def put(self, key: str, read: FileRead) -> None:
        """Keep a clean read (a file with a fault is parsed again: its problem is reported)."""
        if not (self.write and self.usable) or read[1] is not None:
            return
        data = marshal.dumps(read)
        path = self.root / key
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._mac(data))
                fh.write(data)
            os.replace(tmp, path)
        except OSError:  # a full disk costs the next run a parse, not this run
            tmp.unlink(missing_ok=True)

    def _mac(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()

    def keep_only(self, keys: Collection[str]) -> None:
        if not (self.write and self.usable):
            return
        keep = set(keys)
        try:
            for entry in self.root.iterdir():
                if entry.name not in keep:
                    entry.unlink(missing_ok=True)
        except OSError:
            pass


@functools.cache
def _reader_id() -> str:
    """This reader's code and the marshal format: cached records are used by this exact code."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{marshal.version} {sys.version_info[:2]}".encode())
    return digest.hexdigest()[:16]


# Below this many bytes of export, one process reads it all (a fork costs more than it saves).
_PARALLEL_MIN_BYTES = 8 << 20
# What reading one file gave: its records, then the fault that ended it (None: none), as
# ("xml", message, line) or ("os", strerror, None).
FileRead = tuple[list[Record], tuple[str, str, int | None] | None]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_file(path: Path) -> FileRead:
    records: list[Record] = []
    try:
        for record in iter_records(path):
            records.append(record)
    except ET.ParseError as exc:
        return records, ("xml", str(exc), getattr(exc, "position", (None, None))[0])
    except OSError as exc:
        return records, ("os", exc.strerror or str(exc), None)
    return records, None


def _read_slice(paths: list[Path]) -> list[FileRead]:
    return [_read_file(p) for p in paths]


def _apply_file(export: Export, f: ExportFile, read: FileRead) -> None:
    name = str(f.path)
    delta = f.kind == "Delta"
    export.has_delta = export.has_delta or delta
    records, fault = read
    seen = 0
    for request, rid, operational, attributes in records:
        seen += 1
        op = request[: -len("Request")]
        export.records[f"{f.category} {op}"] += 1
        if rid is None:
            export.problems.append(AafProblem(name, f"#{seen}", f"{request} without an id"))
            continue
        if f.category in NOMENCLATURE_CATEGORIES:
            export.nomenclature[f.category] += 1
        elif f.category == STRUCTURE_CATEGORY:
            _apply_structure(export, name, op, rid, operational, attributes, delta)
        else:
            _apply_person(export, f, op, rid, operational, attributes, delta)
    if fault is None:
        return
    kind, message, line = fault
    if kind == "xml":
        export.problems.append(AafProblem(
            name, None, f"malformed or truncated XML after {seen} record(s): {message}",
            line=line))
    else:
        export.problems.append(AafProblem(name, None, f"cannot read: {message}"))


def _apply_structure(export: Export, file: str, op: str, rid: str, operational: Attrs,
                     attributes: Attrs, delta: bool) -> None:
    if op == "add":
        category = operational.get("categorieStructure", [])
        if category and category[0] not in ("Etablissement", "EtabEducNat"):
            export.problems.append(AafProblem(
                file, rid, f"unknown categorieStructure {category[0]!r}; expected Etablissement"))
            return
        export.structures[rid] = attributes
        export.structure_files[rid] = file
    elif op == "modify":
        if rid not in export.structures:
            export.problems.append(AafProblem(file, rid, "modifyRequest for an unknown structure"))
            return
        export.structures[rid].update(attributes)
    else:
        export.problems.append(AafProblem(
            file, rid, "deleteRequest for a structure: structures are never deleted by an "
            "import (close the établissement in farm.yml instead); ignored", blocking=False))
        return
    uai = export.structures[rid].get("ENTStructureUAI", [None])[0]
    problem = uai_problem(uai) if uai is not None else "no ENTStructureUAI"
    if problem:
        export.problems.append(AafProblem(file, rid, f"invalid UAI: {problem}"))


def _apply_person(export: Export, f: ExportFile, op: str, rid: str, operational: Attrs,
                  attributes: Attrs, delta: bool) -> None:
    file = str(f.path)
    if op == "add":
        category = (operational.get("categoriePersonne") or [f.category])[0]
        if category not in PERSON_CATEGORIES:
            export.problems.append(AafProblem(
                file, rid, f"unknown categoriePersonne {category!r}; known: "
                f"{', '.join(PERSON_CATEGORIES)}"))
            return
        if category != f.category:
            export.problems.append(AafProblem(
                file, rid, f"categoriePersonne {category!r} in a {f.category} file"))
            return
        export.persons[rid] = Person(rid, category, attributes, file)
        export.deleted.discard(rid)
    elif op == "modify":
        person = export.persons.get(rid)
        if person is None:
            export.problems.append(AafProblem(
                file, rid, "modifyRequest for a person absent from the export; ignored",
                blocking=False))
            return
        person.attrs.update(attributes)
        person.file = file
    else:
        if export.persons.pop(rid, None) is None:
            export.problems.append(AafProblem(
                file, rid, "deleteRequest for a person absent from the export; ignored",
                blocking=False))
        export.deleted.add(rid)


def _check_references(export: Export) -> None:
    """Every structure id a person refers to must be an EtabEducNat structure of the export."""
    for person in export.persons.values():
        for name in (*STRUCTURE_ID_ATTRIBUTES, *COMPOSITE_ATTRIBUTES):
            for value in person.attrs.get(name, []):
                sid = value.split("$", 1)[0]
                if sid not in export.structures:
                    export.problems.append(AafProblem(
                        person.file, person.id,
                        f"{name} {value!r} refers to unknown structure id {sid!r} (no "
                        "EtabEducNat record has this ENTStructureJointure/id)"))
