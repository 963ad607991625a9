"""From AAF records to directory entries: profiles, structures, groups, stable logins."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

from ..model import Farm, replica_account_dn
from .export import Export, Person
from .ldif import Entry, escape_rdn_value

PROFILE_ELEVE = "National_ELV"
PROFILE_PARENT = "National_TUT"
FONCTION_PROFILES = {"DIR": "National_DIR", "ENS": "National_ENS", "DOC": "National_DOC",
                     "EDU": "National_EVS", "SUR": "National_EVS", "AED": "National_EVS"}
PROFILE_LABELS = {"National_ELV": "élève", "National_TUT": "parent", "National_ENS": "enseignant",
                  "National_DIR": "direction", "National_DOC": "personnel",
                  "National_EVS": "personnel", "National_ETA": "personnel",
                  "National_COL": "personnel"}
# Attributes the importer owns on person entries; anything else on an entry is left alone.
PERSON_ATTRIBUTES = (
    "objectClass", "cn", "sn", "givenName", "displayName", "mail", "ENTPersonJointure",
    "ENTPersonLogin", "ENTPersonProfils", "ENTPersonStructRattach", "ENTPersonEtablissements",
    "ENTPersonFonctions", "ENTPersonNomPatro", "ENTPersonDateNaissance", "ENTPersonEtat",
    "ENTPersonDateDesactivation", "ENTEleveClasses", "ENTEleveGroupes", "ENTEleveMEF",
    "ENTEleveParents", "ENTEleveStructRattachId", "ENTAuxPersRelEleveEleve", "ENTAuxEnsClasses",
    "ENTAuxEnsGroupes", "ENTAuxEnsMatiereEnseignEtab", "ENTPersonEmpreinte",
    "ENTAuxPersRelEleveEnfants", "ENTReplicaAccount",
)
# Bumped whenever person_entry() changes what it builds from the same inputs: every stored
# digest then differs, and the next import compares (and rewrites) every person once.
MAPPING_VERSION = "3"  # 2: class ENTPersonSamba (the NT hash of school servers)
# 3: ENTReplicaAccount (class ENTReplicated): the school replicas' access rules compare with it
# What an import reads of every person when digests are trusted: enough to allocate logins,
# to know whether the entry is up to date, who leaves and who may be purged. Their
# établissements (for the deactivation guard and the counts) are those of the export where
# the digest matches, and are read for the others only (importer.compute): the long DNs of
# ENTPersonEtablissements were most of this search's 41 MB on 100 000 persons.
PERSON_STATE_ATTRIBUTES = (
    "ENTPersonJointure", "ENTPersonLogin", "ENTPersonEtat", "ENTPersonDateDesactivation",
    "ENTPersonEmpreinte",
)
STRUCTURE_ATTRIBUTES = ("objectClass", "ou", "ENTStructureUAI", "ENTStructureJointure",
                        "ENTStructureNomCourant", "ENTStructureTypeStruct",
                        "ENTStructureDepartement", "ENTReplicaAccount")
GROUP_ATTRIBUTES = ("objectClass", "cn", "member", "ENTReplicaAccount")
AAF_GROUP = re.compile(r"^[0-9]{7}[A-Z]\$")
# Entries the importer keeps (people, structures, AAF groups) that do not name their replication
# accounts yet: the dnattr replica rules must not be in force while one exists. roles/directory
# probes the same filter (tasks/database.yml) to choose its rules.
UNTAGGED = ("(&(|(objectClass=ENTPerson)(objectClass=ENTStructure)"
            "(&(objectClass=groupOfNames)(cn=*$*)))(!(objectClass=ENTReplicated)))")
_FOLD = str.maketrans({"œ": "oe", "Œ": "oe", "æ": "ae", "Æ": "ae", "ß": "ss", "ø": "o"})


def fold(text: str) -> str:
    """Lower case ASCII for logins: accents folded, hyphens kept, other separators dropped."""
    text = unicodedata.normalize("NFKD", text.translate(_FOLD))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[\s_]+", "-", text)
    text = re.sub(r"[^a-z0-9-]", "", text)
    return re.sub(r"-{2,}", "-", text).strip("-")


def login_base(given: str, sn: str) -> str:
    first = fold(given.split()[0] if given.split() else given) or "x"
    return f"{first}.{fold(sn) or 'x'}"


@dataclass
class Provisioned:
    """A person the import provisions, before logins (DNs) are known."""

    person: Person
    jointure: str
    sids: list[str]  # onboarded structures, main first
    profiles: list[str]
    children: list[str] = field(default_factory=list)  # AAF ids (parents)
    parents: list[str] = field(default_factory=list)  # AAF ids (élèves)

    @property
    def label(self) -> str:
        for p in ("National_DIR", "National_ENS"):
            if p in self.profiles:
                return PROFILE_LABELS[p]
        return PROFILE_LABELS.get(self.profiles[0], "personnel")


@dataclass
class Desired:
    base_dn: str
    people: dict[str, Provisioned]  # jointure -> person
    structures: dict[str, Entry]  # DN -> entry
    sid_uai: dict[str, str]  # onboarded structure id -> UAI
    skipped: Counter[str]  # UAI (not onboarded) -> persons skipped
    by_id: dict[str, str]  # AAF id -> jointure
    _structure_dns: dict[str, str] = field(default_factory=dict, repr=False)
    _replica_dns: dict[str, str] = field(default_factory=dict, repr=False)

    def people_dn(self, login: str) -> str:
        return f"uid={escape_rdn_value(login)},ou=people,{self.base_dn}"

    def structure_dn(self, uai: str) -> str:
        dn = self._structure_dns.get(uai)
        if dn is None:
            dn = self._structure_dns[uai] = (
                f"ENTStructureUAI={escape_rdn_value(uai)},ou=structures,{self.base_dn}")
        return dn

    def replica_dn(self, uai: str) -> str:
        """ENTReplicaAccount of the entries of ``uai``: its school server's replication account
        (named whether or not the établissement has a school server, so that giving it one
        later changes no entry)."""
        dn = self._replica_dns.get(uai)
        if dn is None:
            dn = self._replica_dns[uai] = replica_account_dn(uai, self.base_dn)
        return dn

    def group_dn(self, cn: str) -> str:
        return f"cn={escape_rdn_value(cn)},ou=groups,{self.base_dn}"


def staff_profiles(person: Person) -> list[str]:
    profiles = []
    for value in person.attrs.get("ENTPersonFonctions", []):
        fields = value.split("$")
        code = fields[1] if len(fields) > 1 else ""
        profiles.append(FONCTION_PROFILES.get(code, "National_ETA"))
    if person.attrs.get("ENTAuxEnsClasses"):
        profiles.append("National_ENS")
    return list(dict.fromkeys(profiles)) or ["National_ETA"]


def desired_state(export: Export, farm: Farm,
                  scope: Collection[str] | None = None) -> Desired:
    """What the directory should hold for the farm's onboarded établissements.

    ``scope``: the UAIs onboarded, as the wave ledger says (entfarm.waves); None: every
    établissement of farm.yml (each has a wave), as before waves were tracked."""
    onboarded = {e.uai: e for e in farm.spec.etablissements
                 if e.wave and (scope is None or e.uai in scope)}
    sid_uai: dict[str, str] = {}
    for sid in export.structures:
        uai = export.uai_of(sid)
        if uai in onboarded:
            sid_uai[sid] = uai
    desired = Desired(farm.spec.academie.base_dn, {}, {}, sid_uai, Counter(), {})
    for sid, uai in sid_uai.items():
        attrs = export.structures[sid]
        entry: Entry = {
            "objectClass": ["organizationalUnit", "ENTStructure", "ENTEtablissement",
                            "ENTReplicated"],
            "ou": [uai], "ENTStructureUAI": [uai], "ENTStructureJointure": [sid],
            "ENTStructureNomCourant": attrs.get("ENTStructureNomCourant") or [onboarded[uai].name],
            "ENTStructureTypeStruct": attrs.get("ENTStructureTypeStruct", []),
            "ENTStructureDepartement": [onboarded[uai].departement],
            "ENTReplicaAccount": [desired.replica_dn(uai)],
        }
        desired.structures[desired.structure_dn(uai)] = {k: v for k, v in entry.items() if v}
    parents_of: dict[str, list[str]] = {}
    for person in export.persons.values():
        if person.category == "PersRelEleve":
            continue
        sids = export.structure_ids(person)
        on = [s for s in sids if s in sid_uai]
        if not on:
            for s in sids or ["?"]:
                desired.skipped[export.uai_of(s) or "?"] += 1
            continue
        if person.category == "Eleve":
            profiles = [PROFILE_ELEVE]
            for link in person.attrs.get("ENTElevePersRelEleve", []):
                parents_of.setdefault(person.id, []).append(link.split("$", 1)[0])
        else:
            profiles = staff_profiles(person)
        jointure = f"AAF${person.id}"
        desired.people[jointure] = Provisioned(person, jointure, on, profiles)
        desired.by_id[person.id] = jointure
    children_of: dict[str, list[str]] = {}
    for child, parents in parents_of.items():
        for pid in parents:
            parent = export.persons.get(pid)
            if parent is not None and parent.category == "PersRelEleve":
                children_of.setdefault(pid, []).append(child)
                desired.people[f"AAF${child}"].parents.append(pid)
    for person in export.persons.values():
        if person.category != "PersRelEleve":
            continue
        children = children_of.get(person.id)
        if not children:
            desired.skipped["(parent of no onboarded élève)"] += 1
            continue
        sids = list(dict.fromkeys(
            s for c in children for s in desired.people[f"AAF${c}"].sids))
        jointure = f"AAF${person.id}"
        desired.people[jointure] = Provisioned(person, jointure, sids, [PROFILE_PARENT],
                                               children=children)
        desired.by_id[person.id] = jointure
    return desired


def _in(values: list[str], sids: list[str]) -> list[str]:
    return [v for v in values if v.split("$", 1)[0] in sids]


def digest(d: Desired, p: Provisioned, logins: dict[str, str]) -> str:
    """Digest of every input of :func:`person_entry` for this person (stored in the entry as
    ENTPersonEmpreinte): equal digests mean equal entries, without building either.

    Fields are joined with the ASCII separators RS and US, which XML 1.0 cannot carry, so the
    encoding is unambiguous and stable across Python versions (unlike repr or marshal)."""
    by_id = d.by_id
    parents = [f"{i}={logins[by_id[i]]}" for i in p.parents if i in by_id]
    children = [f"{i}={logins[by_id[i]]}={child_label}" for i in p.children if i in by_id
                for child_label in ["\x1d".join(_child_values(d, d.people[by_id[i]]))]]
    fields = [
        MAPPING_VERSION, d.base_dn, p.jointure, p.person.category, logins[p.jointure],
        "\x1f".join(p.sids), "\x1f".join(d.sid_uai[s] for s in p.sids), "\x1f".join(p.profiles),
        "\x1f".join(parents), "\x1f".join(children),
        *(f"{k}\x1f" + "\x1f".join(v) for k, v in sorted(p.person.attrs.items())),
    ]
    return hashlib.blake2b("\x1e".join(fields).encode(), digest_size=16).hexdigest()


def _display_name(p: Provisioned) -> str:
    a = p.person.attrs
    given = (a.get("givenName") or [""])[0]
    sn = (a.get("sn") or a.get("ENTPersonNomPatro") or ["?"])[0]
    return f"{given} {sn}".strip()


def _child_values(d: Desired, child: Provisioned) -> list[str]:
    """ENTAuxPersRelEleveEnfants values of one child: ``<UAI>$<display name>`` per collège."""
    name = _display_name(child)
    return [f"{d.sid_uai[s]}${name}" for s in child.sids]


def person_entry(d: Desired, p: Provisioned, logins: dict[str, str],
                 fingerprint: str | None = None) -> Entry:
    """The entry of a provisioned person, its DN-valued attributes resolved through logins.

    ``fingerprint``: its :func:`digest`, computed by the caller when it already has it."""
    a = p.person.attrs
    given = (a.get("givenName") or [""])[0]
    sn = (a.get("sn") or a.get("ENTPersonNomPatro") or ["?"])[0]
    login = logins[p.jointure]
    classes = ["inetOrgPerson", "ENTPerson", "ENTPersonImport", "ENTPersonSamba", "ENTReplicated"]
    if "National_ELV" in p.profiles:
        classes.append("ENTEleve")
    if "National_TUT" in p.profiles:
        classes.append("ENTAuxPersRelEleve")
    if "National_ENS" in p.profiles:
        classes.append("ENTAuxEnseignant")
    if any(x not in ("National_ELV", "National_TUT", "National_ENS") for x in p.profiles):
        classes.append("ENTAuxNonEnsEtab")
    main = p.sids[0]
    stated = [s for s in a.get("ENTPersonStructRattach", []) if s in p.sids]
    if stated:
        main = stated[0]
    entry: Entry = {
        "objectClass": classes,
        "cn": [_display_name(p)], "sn": [sn], "givenName": [given] if given else [],
        "displayName": [_display_name(p)], "mail": a.get("mail", [])[:1],
        "uid": [login], "ENTPersonJointure": [p.jointure], "ENTPersonLogin": [login],
        "ENTPersonProfils": p.profiles,
        "ENTPersonStructRattach": [d.structure_dn(d.sid_uai[main])],
        "ENTPersonEtablissements": list(dict.fromkeys(
            d.structure_dn(d.sid_uai[s]) for s in p.sids)),
        "ENTPersonFonctions": _in(a.get("ENTPersonFonctions", []), p.sids),
        "ENTPersonNomPatro": a.get("ENTPersonNomPatro", [])[:1],
        "ENTPersonDateNaissance": a.get("ENTPersonDateNaissance", [])[:1],
        "ENTPersonEtat": ["ACTIF"],
        "ENTPersonEmpreinte": [fingerprint or digest(d, p, logins)],
        "ENTReplicaAccount": list(dict.fromkeys(d.replica_dn(d.sid_uai[s]) for s in p.sids)),
    }
    if "National_ELV" in p.profiles:
        entry["ENTEleveClasses"] = _in(a.get("ENTEleveClasses", []), p.sids)
        entry["ENTEleveGroupes"] = _in(a.get("ENTEleveGroupes", []), p.sids)
        entry["ENTEleveMEF"] = a.get("ENTEleveMEF", [])
        entry["ENTEleveStructRattachId"] = _in(a.get("ENTEleveStructRattachId", []), p.sids)[:1]
        entry["ENTEleveParents"] = [d.people_dn(logins[d.by_id[i]]) for i in p.parents
                                    if i in d.by_id]
    if "National_TUT" in p.profiles:
        entry["ENTAuxPersRelEleveEleve"] = [d.people_dn(logins[d.by_id[i]]) for i in p.children
                                            if i in d.by_id]
        entry["ENTAuxPersRelEleveEnfants"] = [v for i in p.children if i in d.by_id
                                              for v in _child_values(d, d.people[d.by_id[i]])]
    if "National_ENS" in p.profiles:
        entry["ENTAuxEnsClasses"] = _in(a.get("ENTAuxEnsClasses", []), p.sids)
        entry["ENTAuxEnsGroupes"] = _in(a.get("ENTAuxEnsGroupes", []), p.sids)
        entry["ENTAuxEnsMatiereEnseignEtab"] = _in(a.get("ENTAuxEnsMatiereEnseignEtab", []),
                                                   p.sids)
    return {k: list(dict.fromkeys(v)) if len(v) > 1 else list(v) for k, v in entry.items() if v}


def group_memberships(d: Desired, p: Provisioned) -> list[str]:
    """Group cns ``<UAI>$<class or group>`` of an élève or a teacher."""
    names = []
    for attr in ("ENTEleveClasses", "ENTEleveGroupes", "ENTAuxEnsClasses", "ENTAuxEnsGroupes"):
        for value in p.person.attrs.get(attr, []):
            sid, _, name = value.partition("$")
            if sid in d.sid_uai and sid in p.sids and name:
                names.append(f"{d.sid_uai[sid]}${name.split('$')[0]}")
    return names


def allocate_logins(d: Desired, existing: dict[str, str], remembered: dict[str, str]
                    ) -> dict[str, str]:
    """jointure -> login: the directory's first, then the state file's, then new ones.

    New logins are prénom.nom, then prénom.nom2, prénom.nom3… skipping every login in use in the
    directory or ever handed out (the state file), so a login is never reused for someone else.
    """
    owner = {login: j for j, login in existing.items()}
    used = set(owner) | set(remembered.values())
    logins: dict[str, str] = {}
    for jointure in sorted(d.people, key=lambda j: (len(j), j)):
        if jointure in existing:
            logins[jointure] = existing[jointure]
            continue
        known = remembered.get(jointure)
        if known and owner.get(known, jointure) == jointure:
            logins[jointure] = known
            continue
        a = d.people[jointure].person.attrs
        base = login_base((a.get("givenName") or [""])[0],
                          (a.get("sn") or a.get("ENTPersonNomPatro") or [""])[0])
        candidate, n = base, 1
        while candidate in used:
            n += 1
            candidate = f"{base}{n}"
        used.add(candidate)
        logins[jointure] = candidate
    return logins
