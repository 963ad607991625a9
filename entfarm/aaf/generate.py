"""Synthetic AAF exports: realistic enough for tests and benchmarks, deterministic with a seed.

Per collège: élèves in classes 6e to 3e, two parents each (siblings share theirs, sometimes across
collèges), 45 staff (direction, vie scolaire, documentation, administration, teachers), a few staff
also working in a second collège. Names carry accents, œ, hyphens, apostrophes and homonyms.
Files are ISO-8859-15, numbered per category, named as académies name them.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..errors import UserError
from .export import Attrs, load

GIVEN_F = ["Léa", "Chloé", "Zoé", "Éloïse", "Anaïs", "Maëlys", "Noémie", "Inès", "Jade", "Manon",
           "Camille", "Louise", "Hélène", "Cécile", "Gaëlle", "Marie-Claire", "Anne-Sophie",
           "Clémence", "Océane", "Agathe", "Emma", "Lina", "Rose", "Ambre", "Juliette", "Bérénice"]
GIVEN_M = ["Lucas", "Hugo", "Théo", "Noé", "Loïc", "Jérôme", "François", "Benoît", "Raphaël",
           "Gaël", "Jean-Baptiste", "Pierre-Louis", "Mathéo", "Adam", "Louis", "Nathan", "Jules",
           "Léo", "Gabriel", "Arthur", "Timothée", "Aurélien", "Joël", "Anatole", "Côme"]
SURNAMES = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand",
            "Leroy", "Moreau", "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "David",
            "Bertrand", "Roux", "Vincent", "Fournier", "Morel", "Girard", "Gérard", "Mercier",
            "Bonnet", "Lœuillet", "Cœurdacier", "Le Goff", "De La Fontaine", "N'Diaye",
            "Saint-Exupéry", "Dupont-Moreau", "Müller", "Béranger", "Lagacé", "Chênevert",
            "Faure", "Rousseau", "Blanc", "Guérin", "Boyer", "Chevalier", "François", "Legrand",
            "Gauthier", "Perrin", "Clément", "Rivière", "Lemaître", "Hervé", "Brûlé", "Noël"]
LEVELS = [("6", "10010012110"), ("5", "10110001110"), ("4", "10210001110"), ("3", "10310019110")]
DISCIPLINES = [("L0201", "ANGLAIS"), ("L1300", "MATHEMATIQUES"), ("L0202", "LETTRES MODERNES"),
               ("L1000", "HISTOIRE ET GEOGRAPHIE"), ("L1500", "PHYSIQUE-CHIMIE"),
               ("L1700", "SCIENCES DE LA VIE ET DE LA TERRE"), ("L1900", "EDUCATION PHYSIQUE"),
               ("L0429", "ESPAGNOL"), ("L0422", "ALLEMAND"), ("L1800", "ARTS PLASTIQUES"),
               ("L1810", "EDUCATION MUSICALE"), ("L1411", "TECHNOLOGIE")]
STAFF_PLAN = ([("DIR", "DIRECTION", "Principal")] + [("DIR", "DIRECTION", "Principal adjoint")]
              + [("DOC", "DOCUMENTATION", "Professeur documentaliste")]
              + [("EDU", "EDUCATION", "Conseiller principal d'éducation")] * 2
              + [("ADF", "PERSONNELS ADMINISTRATIFS", "Secrétariat")] * 3
              + [("SUR", "SURVEILLANCE", "Assistant d'éducation")] * 2)
STAFF_PER_COLLEGE = 45
PER_FILE = 5000


@dataclass
class _Structure:
    id: str
    uai: str
    name: str
    departement: str
    classes: list[str]


def _name(rng: random.Random, female: bool | None = None) -> tuple[str, str]:
    female = rng.random() < 0.5 if female is None else female
    return rng.choice(GIVEN_F if female else GIVEN_M), rng.choice(SURNAMES)


def _birth(rng: random.Random, year: int) -> str:
    day = dt.date(year, 1, 1) + dt.timedelta(days=rng.randrange(365))
    return day.strftime("%d/%m/%Y")


class _Writer:
    """Numbered ISO-8859-15 files of one category, PER_FILE records each."""

    def __init__(self, out: Path, prefix: str, kind: str, date: str, category: str,
                 per_file: int = PER_FILE):
        self.out, self.prefix, self.kind = out, prefix, kind
        self.date, self.category = date, category
        self.per_file = per_file
        self.buffer: list[str] = []
        self.count = 0
        self.number = 0
        self.files: list[Path] = []

    def add(self, xml: str) -> None:
        self.buffer.append(xml)
        self.count += 1
        if len(self.buffer) >= self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.number > 0:
            return
        path = self.out / (f"ENT_{self.prefix}_{self.kind}_{self.date}_{self.category}_"
                           f"{self.number:04d}.xml")
        text = ('<?xml version="1.0" encoding="ISO-8859-15"?>\n<ficAlimMENESR>\n'
                + "".join(self.buffer) + "</ficAlimMENESR>\n")
        path.write_bytes(text.encode("iso-8859-15"))
        self.files.append(path)
        self.number += 1
        self.buffer = []


def _attrs_xml(attrs: Attrs, tag: str = "attr") -> str:
    parts = []
    for name, values in attrs.items():
        inner = "".join(f"<value>{escape(v)}</value>" for v in values) or "<value/>"
        parts.append(f"<{tag} name={quoteattr(name)}>{inner}</{tag}>")
    return "".join(parts)


def add_request(category_attr: str, category: str, rid: str, attrs: Attrs) -> str:
    return (f"<addRequest><operationalAttributes><attr name={quoteattr(category_attr)}>"
            f"<value>{escape(category)}</value></attr></operationalAttributes>"
            f"<identifier><id>{escape(rid)}</id></identifier>"
            f"<attributes>{_attrs_xml(attrs)}</attributes></addRequest>\n")


def modify_request(rid: str, attrs: Attrs) -> str:
    mods = "".join(
        f"<modification name={quoteattr(n)} operation=\"replace\">"
        + ("".join(f"<value>{escape(v)}</value>" for v in vs) or "<value/>")
        + "</modification>" for n, vs in attrs.items())
    return (f"<modifyRequest><identifier><id>{escape(rid)}</id></identifier>"
            f"<modifications>{mods}</modifications></modifyRequest>\n")


def delete_request(rid: str) -> str:
    return f"<deleteRequest><identifier><id>{escape(rid)}</id></identifier></deleteRequest>\n"


@dataclass
class GenerateResult:
    files: list[Path]
    counts: dict[str, int]


class _Ids:
    def __init__(self, start: int):
        self.next = start

    def __call__(self) -> str:
        self.next += 1
        return str(self.next)


def _eleve_attrs(rng: random.Random, sid: str, classe: str, parents: Sequence[str],
                 year: int) -> Attrs:
    given, sn = _name(rng)
    level = classe[0]
    mef = dict(LEVELS)[level]
    attrs: Attrs = {
        "sn": [sn], "givenName": [given], "ENTPersonNomPatro": [sn],
        "ENTPersonAutresPrenoms": [given], "personalTitle": [rng.choice(["M", "Mme"])],
        "ENTPersonDateNaissance": [_birth(rng, year - 11 - (6 - int(level)))],
        "ENTPersonStructRattach": [sid], "ENTEleveStructRattachId": [sid],
        "ENTEleveMEF": [mef], "ENTEleveClasses": [f"{sid}${classe}"],
        "ENTElevePersRelEleve": [f"{p}$1$1$1$0" for p in parents],
    }
    if rng.random() < 0.4:
        attrs["ENTEleveGroupes"] = [f"{sid}${level}LV2{rng.choice(['ESP', 'ALL'])}"]
    return attrs


def _parent_attrs(rng: random.Random, female: bool, sn: str) -> Attrs:
    given, own_sn = _name(rng, female)
    attrs: Attrs = {"sn": [sn if rng.random() < 0.7 else own_sn], "givenName": [given],
                    "personalTitle": ["Mme" if female else "M"]}
    if rng.random() < 0.6:
        attrs["mail"] = [f"parent{rng.randrange(10**9)}@example.test"]
    return attrs


def generate(farm_etablissements: Iterable[tuple[str, str, str]], out: Path, *, date: str,
             seed: int = 0, eleves_per_college: int = 500, prefix: str = "18",
             progress: Callable[[str], None] | None = None) -> GenerateResult:
    """A Complet export for the given (UAI, name, département code) établissements."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    year = int(date[:4])
    etabs = list(farm_etablissements)
    structures: list[_Structure] = []
    per_class = 25
    classes_per_level = max(1, round(eleves_per_college / 4 / per_class))
    for i, (uai, name, dep) in enumerate(etabs):
        classes = [f"{lv}{chr(65 + c)}" for lv, _ in LEVELS for c in range(classes_per_level)]
        structures.append(_Structure(str(4001 + i), uai, name, dep, classes))
    w = {c: _Writer(out, prefix, "Complet", date, c)
         for c in ("EtabEducNat", "Eleve", "PersRelEleve", "PersEducNat")}
    for s in structures:
        w["EtabEducNat"].add(add_request("categorieStructure", "Etablissement", s.id, {
            "ENTStructureJointure": [s.id], "ENTStructureUAI": [s.uai],
            "ENTStructureNomCourant": [s.name.upper()], "ENTStructureTypeStruct": ["CLG"],
            "ENTStructureDepartement": [s.departement], "ENTEtablissementStructRattachFctl": [],
        }))
    ids = _Ids(1_000_000)
    families: list[tuple[str, str, list[str]]] = []  # (sn, structure id, parent ids)
    for n, s in enumerate(structures, 1):
        if progress:
            progress(f"generating {s.uai} ({n} of {len(structures)})")
        for k in range(eleves_per_college):
            classe = s.classes[k * len(s.classes) // eleves_per_college]
            if families and rng.random() < 0.15:
                sn, _, parents = families[rng.randrange(len(families))]
            else:
                parents = [ids(), ids()]
                sn = rng.choice(SURNAMES)
                for female, pid in zip((True, False), parents, strict=True):
                    w["PersRelEleve"].add(add_request(
                        "categoriePersonne", "PersRelEleve", pid, _parent_attrs(rng, female, sn)))
                families.append((sn, s.id, parents))
            attrs = _eleve_attrs(rng, s.id, classe, parents, year)
            if rng.random() < 0.8:
                attrs["sn"] = attrs["ENTPersonNomPatro"] = [sn]
            w["Eleve"].add(add_request("categoriePersonne", "Eleve", ids(), attrs))
        for k in range(STAFF_PER_COLLEGE):
            w["PersEducNat"].add(add_request(
                "categoriePersonne", "PersEducNat", ids(),
                _staff_attrs(rng, s, structures, k, year)))
    files: list[Path] = []
    for writer in w.values():
        writer.flush()
        files += writer.files
    counts = {c: wr.count for c, wr in w.items()}
    return GenerateResult(sorted(files), counts)


def _staff_attrs(rng: random.Random, s: _Structure, structures: list[_Structure], k: int,
                 year: int) -> Attrs:
    given, sn = _name(rng)
    attrs: Attrs = {"sn": [sn], "givenName": [given], "ENTPersonNomPatro": [sn],
                    "personalTitle": [rng.choice(["M", "Mme"])],
                    "ENTPersonDateNaissance": [_birth(rng, year - rng.randrange(25, 62))],
                    "ENTPersonStructRattach": [s.id],
                    "mail": [f"{k}.{rng.randrange(10**9)}@ac-orleans-tours.test"]}
    if k < len(STAFF_PLAN):
        code, label, _title = STAFF_PLAN[k]
        attrs["ENTPersonFonctions"] = [f"{s.id}${code}${label}$-$-"]
        return attrs
    disc_code, disc = DISCIPLINES[k % len(DISCIPLINES)]
    where = [s]
    # A few teachers share their service with a second collège.
    if len(structures) > 1 and k >= STAFF_PER_COLLEGE - 3:
        where.append(structures[(structures.index(s) + 1) % len(structures)])
    attrs["ENTPersonFonctions"] = [f"{x.id}$ENS$ENSEIGNEMENT${disc_code}${disc}" for x in where]
    attrs["ENTAuxEnsMatiereEnseignEtab"] = [f"{x.id}${disc_code}" for x in where]
    attrs["ENTAuxEnsClasses"] = [f"{x.id}${c}" for x in where
                                 for c in rng.sample(x.classes, min(4, len(x.classes)))]
    return attrs


def generate_delta(previous: Path, out: Path, *, date: str | None = None, seed: int = 0,
                   share: float = 0.01, prefix: str = "18") -> GenerateResult:
    """A Delta on top of ``previous``: departures, arrivals, class moves and name changes."""
    export = load(previous)
    if export.blocking:
        raise UserError(f"{previous}: not a usable export: {export.blocking[0].render()}")
    last = max(f.date for f in export.files)
    if date is None:
        date = (dt.datetime.strptime(last, "%Y%m%d") + dt.timedelta(days=1)).strftime("%Y%m%d")
    if date <= last:
        raise UserError(f"--date {date} must be after the previous export's {last}")
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    eleves = sorted(pid for pid, p in export.persons.items() if p.category == "Eleve")
    total = len(export.persons)
    changes = max(4, round(total * share))
    departures = rng.sample(eleves, max(1, changes // 5))
    rest = [e for e in eleves if e not in set(departures)]
    moves = rng.sample(rest, min(len(rest), max(1, changes * 2 // 5)))
    renames = rng.sample(rest, min(len(rest), max(1, changes // 10)))
    arrivals = max(1, changes * 3 // 10 // 3)
    w = {c: _Writer(out, prefix, "Delta", date, c)
         for c in ("EtabEducNat", "Eleve", "PersRelEleve", "PersEducNat")}
    still_linked: set[str] = set()
    for pid, p in export.persons.items():
        if p.category == "Eleve" and pid not in set(departures):
            still_linked.update(v.split("$", 1)[0] for v in p.attrs.get("ENTElevePersRelEleve", []))
    for eid in departures:
        w["Eleve"].add(delete_request(eid))
        for link in export.persons[eid].attrs.get("ENTElevePersRelEleve", []):
            parent = link.split("$", 1)[0]
            if parent in export.persons and parent not in still_linked:
                w["PersRelEleve"].add(delete_request(parent))
                still_linked.add(parent)  # delete once
    classes_of: dict[str, list[str]] = {}
    for p in export.persons.values():
        for v in p.attrs.get("ENTEleveClasses", []):
            sid, name = v.split("$", 1)
            classes_of.setdefault(sid, [])
            if name not in classes_of[sid]:
                classes_of[sid].append(name)
    for eid in moves:
        sid, current = export.persons[eid].attrs["ENTEleveClasses"][0].split("$", 1)
        same_level = [c for c in classes_of[sid] if c[0] == current[0] and c != current]
        if same_level:
            w["Eleve"].add(modify_request(eid, {"ENTEleveClasses": [
                f"{sid}${rng.choice(same_level)}"]}))
    for eid in renames:
        _given, sn = _name(rng)
        w["Eleve"].add(modify_request(eid, {"sn": [sn]}))
    numeric = [int(i) for i in export.persons if i.isdigit()]
    ids = _Ids(max(numeric) if numeric else 1_000_000)
    sids = sorted(classes_of)
    for _ in range(arrivals):
        sid = rng.choice(sids)
        classe = rng.choice(classes_of[sid])
        parents = [ids(), ids()]
        sn = rng.choice(SURNAMES)
        for female, pid in zip((True, False), parents, strict=True):
            w["PersRelEleve"].add(add_request(
                "categoriePersonne", "PersRelEleve", pid, _parent_attrs(rng, female, sn)))
        attrs = _eleve_attrs(rng, sid, classe, parents, int(date[:4]))
        w["Eleve"].add(add_request("categoriePersonne", "Eleve", ids(), attrs))
    files: list[Path] = []
    for writer in w.values():
        if writer.count or writer.category == "EtabEducNat":
            writer.flush()
            files += writer.files
    return GenerateResult(sorted(files), {c: wr.count for c, wr in w.items()})
