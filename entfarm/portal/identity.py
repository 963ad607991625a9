"""Who is logged in, from the CAS attributes, and what the home page shows them.

CAS attributes read (released by roles/cas, named as it releases them):

- ``uid`` (or the CAS user): the login, the only personal data the portal logs;
- ``displayName`` (else ``cn``): shown as "Bonjour <name>";
- ``ENTPersonProfils``: SDET profile codes, mapped by :data:`PROFILE_TABLE`;
- ``ENTStructureUAI``: UAI of the main structure; ``ENTEtablissementsUAI``: UAIs of every
  établissement of the person (both computed by the CAS from the structure DNs);
- ``ENTAuxPersRelEleveEnfants`` (parents only): one value per child and établissement,
  ``<UAI>$<display name>``, written by the AAF importer (the directory links children by DN,
  which the CAS cannot dereference; see docs/architecture.md, "Portal"). Without it a parent
  sees their children's établissements, without the children's names.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import PROFILES, Departement, PortalConfig, Tile

# ENTPersonProfils as the AAF importer writes it (entfarm/aaf/mapping.py) -> portal profile.
# The SDET defines no administrator profile: Local_ADM is the farm's own, set by hand on the
# accounts of the farm's operators.
PROFILE_TABLE: dict[str, str] = {
    "National_ELV": "eleve",
    "National_TUT": "parent",
    "National_ENS": "enseignant",
    "National_DIR": "direction",
    "National_DOC": "personnel",
    "National_EVS": "personnel",
    "National_ETA": "personnel",
    "National_COL": "personnel",
    "National_ACA": "personnel",
    "Local_ADM": "administrateur",
}
_PROFILE_BY_FOLDED = {k.casefold(): v for k, v in PROFILE_TABLE.items()}

ATTR_LOGIN = "uid"
ATTR_NAMES = ("displayName", "cn")
ATTR_PROFILES = "ENTPersonProfils"
ATTR_MAIN_UAI = "ENTStructureUAI"
ATTR_UAIS = "ENTEtablissementsUAI"
ATTR_CHILDREN = "ENTAuxPersRelEleveEnfants"

_UAI = re.compile(r"^[0-9]{7}[A-Z]$")
SESSION_FORMAT = 1
# A signed cookie holds the identity; these bounds keep it well under browsers' 4 KiB.
MAX_UAIS = 30
MAX_CHILDREN = 12
MAX_TEXT = 120


@dataclass(frozen=True)
class Identity:
    """What the session cookie holds about the person: the minimum the home page needs."""

    login: str
    display_name: str
    profiles: tuple[str, ...]  # portal profile ids, in PROFILES order
    uais: tuple[str, ...]  # main établissement first
    children: tuple[tuple[str, str], ...]  # (UAI, display name)
    authenticated_at: int  # epoch seconds of the last ticket validation

    def to_session(self) -> dict[str, Any]:
        return {"v": SESSION_FORMAT, "uid": self.login, "nom": self.display_name,
                "pro": list(self.profiles), "uai": list(self.uais),
                "enf": [list(c) for c in self.children], "auth": self.authenticated_at}

    @classmethod
    def from_session(cls, data: Mapping[str, Any]) -> Identity | None:
        """None for an empty, foreign or older-format session."""
        try:
            if data.get("v") != SESSION_FORMAT:
                return None
            login, name, auth = data["uid"], data["nom"], data["auth"]
            profiles = tuple(p for p in data["pro"] if p in PROFILES)
            uais = tuple(str(u) for u in data["uai"])
            children = tuple((str(u), str(n)) for u, n in data["enf"])
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(login, str) or not login or not isinstance(name, str) \
                or not isinstance(auth, int):
            return None
        return cls(login, name, profiles, uais, children, auth)


def _first(attributes: Mapping[str, list[str]], *names: str) -> str:
    for name in names:
        for value in attributes.get(name, []):
            if value.strip():
                return value.strip()[:MAX_TEXT]
    return ""


def portal_profiles(values: list[str]) -> tuple[str, ...]:
    found = {_PROFILE_BY_FOLDED.get(v.strip().casefold()) for v in values}
    return tuple(p for p in PROFILES if p in found)


def identity_from_cas(user: str, attributes: Mapping[str, list[str]],
                      now: float | None = None) -> Identity:
    login = _first(attributes, ATTR_LOGIN) or user.strip()[:MAX_TEXT]
    uais: list[str] = []
    for value in attributes.get(ATTR_MAIN_UAI, []) + attributes.get(ATTR_UAIS, []):
        uai = value.strip().upper()
        if _UAI.match(uai) and uai not in uais:
            uais.append(uai)
    children: list[tuple[str, str]] = []
    for value in attributes.get(ATTR_CHILDREN, []):
        uai, sep, name = value.partition("$")
        uai, name = uai.strip().upper(), name.strip()[:MAX_TEXT]
        if sep and _UAI.match(uai) and name and (uai, name) not in children:
            children.append((uai, name))
    return Identity(
        login=login,
        display_name=_first(attributes, *ATTR_NAMES) or login,
        profiles=portal_profiles(attributes.get(ATTR_PROFILES, [])),
        uais=tuple(uais[:MAX_UAIS]),
        children=tuple(children[:MAX_CHILDREN]),
        authenticated_at=int(time.time() if now is None else now),
    )


# -- what the home page shows -------------------------------------------------------------------


@dataclass(frozen=True)
class EtablissementView:
    uai: str
    name: str
    commune: str | None  # None for a UAI the configuration does not know
    departement: str | None
    children: tuple[str, ...]  # display names, sorted


def _sort_key(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c))


def etablissements(identity: Identity, config: PortalConfig) -> list[EtablissementView]:
    """The person's établissements, main first; each child under the établissement it is in."""
    order = list(identity.uais)
    for uai, _name in identity.children:
        if uai not in order:
            order.append(uai)
    views = []
    for uai in order:
        known = config.etablissement(uai)
        names = sorted({n for u, n in identity.children if u == uai}, key=_sort_key)
        views.append(EtablissementView(
            uai=uai,
            name=known.name if known else f"Établissement {uai}",
            commune=known.commune if known else None,
            departement=known.departement if known else None,
            children=tuple(names),
        ))
    return views


def tiles(identity: Identity, config: PortalConfig) -> list[Tile]:
    allowed = set(identity.profiles)
    return [t for t in config.tiles if allowed.intersection(t.profiles)]


def news_departement(identity: Identity | None, config: PortalConfig,
                     host_departement: Departement | None) -> Departement | None:
    """The département of the person's first known établissement, else the Host's."""
    for uai in identity.uais if identity else ():
        known = config.etablissement(uai)
        if known is not None:
            found = config.departement(known.departement)
            if found is not None:
                return found
    return host_departement


def profile_labels(identity: Identity) -> list[str]:
    return [PROFILES[p] for p in identity.profiles]
