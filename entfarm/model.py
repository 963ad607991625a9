"""The farm model: ``inventories/<farm>/farm.yml`` as validated, typed data.

Everything else (Ansible inventory, lab topology, waves, verification targets, audit scope) is
derived from a :class:`Farm`. Loading validates in two passes and reports every problem at once:
the structure (types, required and unknown keys) through pydantic, then the cross-references
(duplicate UAIs, unknown départements, waves and hosts) on the raw data, so that a structural
mistake in one établissement does not hide a reference mistake in another.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import re
import types
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo

from .errors import Problem, ValidationFailed
from .uai import uai_problem
from .yamlsrc import Located, YamlPath, load_located

FARM_FILE = "farm.yml"
DNS_LABEL_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DNS_LABEL = re.compile(DNS_LABEL_RE)
_DOMAIN = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$")

DEPARTEMENT_RE = r"^(0[1-9][0-9]|[1-9][0-9]{2}|02[AB])$"
WAVE_ID_RE = r"^[a-z0-9_]{1,32}$"
COLOR_RE = r"^#[0-9a-fA-F]{6}$"
SHA256_RE = r"^[0-9a-f]{64}$"
ACADEMIE_CODE_RE = r"^[0-9]{2}$"
BASE_DN_RE = r"^dc=[a-z0-9-]+(,dc=[a-z0-9-]+)*$"
SOURCE_NAME_RE = r"^[a-z0-9_-]+$"
UAI_RE = r"^[0-9]{7}[A-Z]$"
TILE_ID_RE = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# Portal profiles a tile is shown to (entfarm/portal/config.py PROFILES, same order).
PORTAL_PROFILES = ("eleve", "parent", "enseignant", "personnel", "direction", "administrateur")

DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_RE)]
Domain = Annotated[str, StringConstraints(pattern=_DOMAIN.pattern, max_length=253)]
DepartementCode = Annotated[str, StringConstraints(pattern=DEPARTEMENT_RE)]
WaveId = Annotated[str, StringConstraints(pattern=WAVE_ID_RE)]
Color = Annotated[str, StringConstraints(pattern=COLOR_RE)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_RE)]

# What each pattern means, for error messages: a regular expression is not an explanation.
PATTERN_MEANING: dict[str, str] = {
    DNS_LABEL_RE: "a DNS label: lower-case letters, digits and '-', at most 63 characters, "
    "not starting or ending with '-' (e.g. portal-1)",
    _DOMAIN.pattern: "a lower-case domain name such as ent.example.fr",
    DEPARTEMENT_RE: 'a département code of three characters, quoted: "036", "045", "971", "02A"',
    WAVE_ID_RE: "a wave id: lower-case letters, digits and '_', at most 32 (e.g. \"1\", pilotes)",
    COLOR_RE: 'a colour written #rrggbb, quoted (e.g. "#005a8c")',
    SHA256_RE: "a SHA-256 digest: 64 lower-case hexadecimal digits, as printed by sha256sum",
    ACADEMIE_CODE_RE: 'an académie code of two digits, quoted (Orléans-Tours is "18")',
    BASE_DN_RE: "a base DN made of dc= parts, e.g. dc=ac-orleans-tours,dc=fr",
    SOURCE_NAME_RE: "an artifact name: lower-case letters, digits, '_' and '-'",
    TILE_ID_RE: "a tile id: lower-case letters, digits, '_' and '-', at most 64, such as a "
    "service name (etherpad, moodle)",
}


@dataclass(frozen=True)
class ServiceKind:
    """What entfarm knows about a service it can place: its public name and backend port."""

    public_name: str | None  # label under farm.domain, None when not published by the proxy
    backend_port: int | None
    description: str


# The catalogue of services a farm may place. A new service is added here and in a role.
SERVICE_CATALOGUE: dict[str, ServiceKind] = {
    "proxy": ServiceKind(None, None, "nginx edge: TLS termination, one server block per service"),
    "directory": ServiceKind(None, 636, "OpenLDAP with the SDET ENT schema"),
    "cas": ServiceKind("cas", 80, "CAS 3.0 server (LemonLDAP::NG)"),
    "portal": ServiceKind("portail", 8000, "entfarm's ENT portal; also each département's domain"),
    "postgresql": ServiceKind(None, 5432, "shared PostgreSQL"),
    "redis": ServiceKind(None, 6379, "shared Redis"),
    "etherpad": ServiceKind("pad", 9001, "Etherpad"),
    "moodle": ServiceKind("moodle", 80, "Moodle LTS"),
    "nextcloud": ServiceKind("cloud", 80, "Nextcloud"),
    "onlyoffice": ServiceKind("office", 80, "OnlyOffice DocumentServer"),
    "webconf": ServiceKind(None, None, "coturn, and the settings of an external BigBlueButton"),
    "monitoring": ServiceKind(None, 9090, "Prometheus and exporters"),
    "backup": ServiceKind(None, None, "backup tier (restic)"),
}
SCHOOL_SERVER_GROUP = "school_server"
ETAB_TYPES = ("college", "lycee", "lycee_professionnel", "erea", "ecole")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class FarmSection(_Strict):
    name: DnsLabel = Field(description="Short name of the farm; prefixes lab containers.")
    kind: Literal["lab", "production"] = Field(
        description="lab: hosts are containers run by `entfarm lab`; production: reached over SSH."
    )
    domain: Domain = Field(description="Public names of the central services live under it.")
    timezone: str = "Europe/Paris"
    locale: str = "fr_FR.UTF-8"
    ntp_servers: list[str] = Field(
        default_factory=list,
        description="Time sources for every host; empty keeps hosts on their own clock source.",
    )
    apt_mirror: str | None = Field(
        default=None, description="Debian mirror URL for the hosts; unset keeps their sources."
    )
    ssh_user: str = Field(default="root", description="Production: SSH user Ansible connects as.")
    retention_months: int = Field(
        default=3, ge=1, le=12,
        description="Months a departed person's account is kept deactivated before purge.",
    )
    proxy_log_retention_days: int = Field(
        default=365, ge=1, le=366,
        description="Days the school servers' filtering proxies keep their access logs "
        "(one year at most: the logs identify pupils).",
    )


class Academie(_Strict):
    code: Annotated[str, StringConstraints(pattern=ACADEMIE_CODE_RE)] = Field(
        description="Académie code, two digits (Orléans-Tours is 18)."
    )
    name: str = Field(min_length=1, description="Name of the académie, e.g. Orléans-Tours.")
    base_dn: Annotated[str, StringConstraints(pattern=BASE_DN_RE)] = Field(
        description="Base DN of the académie's directory, e.g. dc=ac-orleans-tours,dc=fr."
    )


class Colors(_Strict):
    primary: Color = Field(description="Main colour of the portal, #rrggbb.")
    secondary: Color = Field(description="Background colour of the portal, #rrggbb.")


class Branding(_Strict):
    name: str = Field(min_length=1, description="Name shown on the portal.")
    logo: str | None = Field(default=None, description="Path relative to the inventory directory.")
    colors: Colors = Field(description="Portal colours.")


class Departement(_Strict):
    code: DepartementCode = Field(
        description="Three characters, quoted: 036, 045, 02A …; the Ansible group is "
        "departement_<code>."
    )
    name: str = Field(min_length=1, description="Name of the département, e.g. Loiret.")
    domain: Domain = Field(description="Public domain of the département's portal.")
    branding: Branding = Field(description="How the portal looks for this département.")


IMAGE_SUFFIXES = (".svg", ".png", ".jpg", ".jpeg", ".webp")
DEFAULT_PORTAL_COLORS = ("#1f3f66", "#f2f4f7")


class PortalTile(_Strict):
    id: Annotated[str, StringConstraints(pattern=TILE_ID_RE)] = Field(
        description="Tile id, usually the service it opens (etherpad, moodle ...)."
    )
    label: str = Field(min_length=1, description="Title of the tile, in French.")
    description: str | None = Field(default=None, description="One line under the title.")
    url: str | None = Field(
        default=None,
        description="Where the tile leads; unset: https://<public name of the service with "
        "this id>[:public port]/.",
    )
    profiles: list[Literal["eleve", "parent", "enseignant", "personnel", "direction",
                           "administrateur"]] = Field(
        min_length=1, description="Portal profiles that see the tile."
    )
    icon: str | None = Field(
        default=None, description="Image (.svg, .png, .jpg, .webp), relative to the inventory."
    )

    @field_validator("url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{value!r}: expected an absolute https URL "
                             "(e.g. https://pad.ent.example.fr/)")
        return value

    @field_validator("icon")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(f"{value!r}: expected an image file ending in "
                             f"{', '.join(IMAGE_SUFFIXES)}")
        return value


class Portal(_Strict):
    branding: Branding | None = Field(
        default=None,
        description="Branding of the generic portail.<domain> name; unset: the académie's "
        "name in the portal's default colours.",
    )
    tiles: list[PortalTile] = Field(
        default_factory=list,
        description="Service tiles of the portal's home page, in this order; each is shown "
        "to the profiles it lists.",
    )


class Wave(_Strict):
    id: WaveId = Field(description="Short id; the Ansible group is wave_<id>.")
    name: str = Field(min_length=1, description="Human name of the stage.")
    canary: int = Field(default=1, ge=0, description="Établissements onboarded first, alone.")
    failure_threshold: float = Field(
        default=0.1, ge=0, le=1,
        description="Share (0 to 1) of the wave's établissements that may fail before the wave "
        "stops; 0.1 is 10%.",
    )

    @field_validator("id", mode="before")
    @classmethod
    def _int_id(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _ipv4_network(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r}: expected an IPv4 network written address/prefix with no "
                         f"host bits set, e.g. 10.36.5.0/24 ({exc})") from None


def _private_network(value: str, what: str, longest: int) -> str:
    """``value`` if it is a private IPv4 network with a prefix from /16 to /``longest``."""
    net = _ipv4_network(value)
    if not net.is_private:
        raise ValueError(f"{value!r}: {what} is a private network (10.0.0.0/8, "
                         "172.16.0.0/12 or 192.168.0.0/16)")
    if not 16 <= net.prefixlen <= longest:
        raise ValueError(f"{value!r}: expected a prefix from /16 to /{longest}")
    return value


def _ipv4_address(value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r}: expected an IPv4 address such as 10.36.5.1") from None


class SchoolLan(_Strict):
    """The collège's LAN, served by its school server (DHCP, DNS, proxy, file server)."""

    subnet: str = Field(
        description="The school LAN, a private IPv4 network with a prefix of /16 to /28, "
        "e.g. 10.36.5.0/24.",
    )
    address: str | None = Field(
        default=None,
        description="Address of the school server on the LAN; unset: the first host of subnet.",
    )
    router: str | None = Field(
        default=None,
        description="Gateway the DHCP leases announce; unset: none (clients go out through the "
        "school server's proxy only).",
    )
    dhcp_range: list[str] | None = Field(
        default=None, min_length=2, max_length=2,
        description="First and last address DHCP leases; unset: the middle half of subnet.",
    )

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        return _private_network(value, "a school LAN", 28)

    @field_validator("address", "router")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            _ipv4_address(value)
        return value

    @field_validator("dhcp_range")
    @classmethod
    def _range(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            first, last = (_ipv4_address(v) for v in value)
            if first > last:
                raise ValueError(f"[{value[0]}, {value[1]}]: the first address comes after the "
                                 "last; write [first, last]")
        return value

    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    def server_address(self) -> str:
        return self.address or str(self.network()[1])

    def leases(self) -> tuple[str, str]:
        if self.dhcp_range:
            return self.dhcp_range[0], self.dhcp_range[1]
        net = self.network()
        size = net.num_addresses
        return (str(net.network_address + size // 4), str(net.network_address + 3 * size // 4))


def school_server_name(uai: str) -> str:
    """The host name of the school server of ``uai``, also the name of its replication account."""
    return f"se-{uai.lower()}"


def replica_account_dn(uai: str, base_dn: str) -> str:
    """The replication account of the school server of ``uai``: roles/directory creates it,
    roles/school_server binds as it, the AAF importer names it on every entry that school
    server's replica holds (ENTReplicaAccount, which the access rules compare with)."""
    return f"cn={school_server_name(uai)},ou=replicas,{base_dn}"


class Etablissement(_Strict):
    uai: str = Field(
        description="7 digits then the check letter, e.g. 0290009C.",
        json_schema_extra={"pattern": UAI_RE},
    )
    name: str = Field(min_length=1, description="Name of the établissement.")
    type: Literal["college", "lycee", "lycee_professionnel", "erea", "ecole"] = Field(
        default="college", description="Kind of établissement."
    )
    commune: str = Field(min_length=1, description="Commune where it stands.")
    departement: DepartementCode = Field(
        description="Code of a département declared under departements."
    )
    wave: WaveId = Field(description="Id of a wave declared under waves.")
    school_server: bool = Field(default=False, description="Gets a host named se-<uai>.")
    lan: SchoolLan | None = Field(
        default=None,
        description="The school LAN its school server serves; required with school_server: true.",
    )

    @field_validator("uai")
    @classmethod
    def _uai(cls, value: str) -> str:
        problem = uai_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("wave", mode="before")
    @classmethod
    def _int_wave(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def school_server_host(self) -> str:
        return school_server_name(self.uai)


class Host(_Strict):
    name: DnsLabel = Field(description="Host name: a DNS label (lower case, digits, '-').")
    address: str | None = Field(
        default=None, min_length=1,
        description="Production: address to SSH to; unset, the host name (resolved by DNS).",
    )


class ServicePlacement(_Strict):
    hosts: list[DnsLabel] = Field(min_length=1, description="Hosts carrying the service.")
    public_name: DnsLabel | None = Field(
        default=None, description="Overrides the label under farm.domain."
    )
    replicas: list[DnsLabel] = Field(
        default_factory=list, description="Hosts carrying read replicas (directory, databases)."
    )


class ArtifactSource(_Strict):
    url: str = Field(
        min_length=1,
        description="Where the controller downloads the release file (http, https, file).",
    )
    sha256: Sha256 = Field(description="Expected SHA-256 of the file; checked after download.")
    version: str | None = Field(default=None, description="Release version, for reports.")

    @field_validator("url")
    @classmethod
    def _names_a_file(cls, value: str) -> str:
        # The store keeps the file under its URL's last path segment (entfarm.artifacts).
        parts = urllib.parse.urlsplit(value)
        name = urllib.parse.unquote(parts.path).rsplit("/", 1)[-1]
        if not parts.scheme or name in ("", ".", "..") or "\\" in name:
            raise ValueError(
                f"{value!r}: expected the URL of the release file itself, ending with its file "
                "name (e.g. file:///srv/releases/etherpad-2.2.7.tar.gz)")
        return value


class Artifacts(_Strict):
    store: str = Field(default="state/artifacts", description="Relative to the inventory.")
    mirror: str | None = Field(
        default=None,
        description="Base URL of a mirror laid out like a store: each source is downloaded "
        "from <mirror>/<name>/<file name of its URL> instead of its URL.",
    )
    sources: dict[Annotated[str, StringConstraints(pattern=SOURCE_NAME_RE)], ArtifactSource] = (
        Field(default_factory=dict, description="Release files the store holds, by name.")
    )


class LabPublish(_Strict):
    https: int = Field(default=8443, ge=1024, le=65535, description="127.0.0.1 port -> edge:443.")
    http: int = Field(default=8080, ge=1024, le=65535, description="127.0.0.1 port -> edge:80.")


class Lab(_Strict):
    network: DnsLabel = Field(default="entfarm-lab", description="Docker bridge network.")
    subnet: str = Field(
        default="172.30.0.0/24",
        description="IPv4 subnet of the lab network, a private network of /16 to /26. Each "
        "host gets a fixed address in it (derived from its name), which it keeps when Docker "
        "restarts: services bind to their host's address. Change it if Docker reports that "
        "it overlaps another network.",
    )
    publish: LabPublish = Field(
        default_factory=LabPublish, description="Loopback ports publishing the edge proxy."
    )

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        return _private_network(value, "the lab network", 26)


class FarmSpec(_Strict):
    """The document as written. :class:`Farm` adds what is derived from it."""

    farm: FarmSection = Field(description="The farm as a whole.")
    academie: Academie = Field(description="The académie whose directory the farm serves.")
    departements: list[Departement] = Field(
        min_length=1, description="Départements served; each gets a portal domain and branding."
    )
    waves: list[Wave] = Field(min_length=1, description="Onboarding stages.")
    etablissements: list[Etablissement] = Field(
        default_factory=list, description="Établissements, each in a département and a wave."
    )
    hosts: list[Host] = Field(
        min_length=1, description="Central hosts; school servers se-<uai> are derived."
    )
    services: dict[str, ServicePlacement] = Field(
        description="Service name (from the catalogue) -> the hosts carrying it."
    )
    versions: dict[str, str] = Field(
        default_factory=dict, description="Pinned versions by component, as text."
    )
    artifacts: Artifacts = Field(
        default_factory=Artifacts, description="The farm's artifact store."
    )
    portal: Portal = Field(
        default_factory=Portal, description="The portal's tiles and generic branding."
    )
    lab: Lab | None = Field(default=None, description="Lab settings (kind: lab).")

    @field_validator("versions", mode="before")
    @classmethod
    def _versions_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, (int, float)) else v for k, v in value.items()}
        return value


@dataclass(frozen=True)
class FarmHost:
    """A host of the farm with what it carries, as the inventory and the lab see it."""

    name: str
    address: str | None
    services: tuple[str, ...]
    etablissement: str | None = None  # UAI, for school servers


@dataclass(frozen=True)
class Reach:
    """How the controller reaches a host: the lab's container, or SSH in production."""

    connection: Literal["docker", "ssh"]
    target: str  # container name, or the address to SSH to
    user: str


class Farm:
    """A validated farm, with the derived views every other module uses."""

    def __init__(self, spec: FarmSpec, inventory_dir: Path):
        self.spec = spec
        self.inventory_dir = inventory_dir

    # -- plain attributes ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.farm.name

    @property
    def kind(self) -> str:
        return self.spec.farm.kind

    @property
    def file(self) -> Path:
        return self.inventory_dir / FARM_FILE

    @property
    def secrets_dir(self) -> Path:
        return self.inventory_dir / "secrets"

    @property
    def state_dir(self) -> Path:
        return self.inventory_dir / "state"

    @property
    def lab(self) -> Lab:
        return self.spec.lab or Lab()

    # -- derived ------------------------------------------------------------------------
    def hosts(self) -> list[FarmHost]:
        """Declared hosts, then one school server per établissement that has one."""
        carried: dict[str, list[str]] = {}
        for service, placement in self.spec.services.items():
            for host in [*placement.hosts, *placement.replicas]:
                carried.setdefault(host, [])
                if service not in carried[host]:
                    carried[host].append(service)
        declared = {h.name: h for h in self.spec.hosts}
        result = [
            FarmHost(h.name, h.address, tuple(carried.get(h.name, ())))
            for h in self.spec.hosts
            if not self._is_school_host(h.name)
        ]
        for etab in self.spec.etablissements:
            if etab.school_server:
                name = etab.school_server_host
                address = declared[name].address if name in declared else None
                services = (SCHOOL_SERVER_GROUP, *carried.get(name, ()))
                result.append(FarmHost(name, address, services, etab.uai))
        return result

    def _is_school_host(self, name: str) -> bool:
        return any(
            e.school_server and e.school_server_host == name for e in self.spec.etablissements
        )

    def container_name(self, host: str) -> str:
        """Lab container of a host."""
        return f"entfarm-{self.name}-{host}"

    def reach(self, host: FarmHost) -> Reach:
        """The one answer to "how do we get to this host", for Ansible and for our own tools."""
        if self.kind == "lab":
            return Reach("docker", self.container_name(host.name), "root")
        return Reach("ssh", host.address or host.name, self.spec.farm.ssh_user)

    def public_names(self, service: str) -> list[str]:
        """Public FQDNs of a service, [] when the proxy does not publish it."""
        kind = SERVICE_CATALOGUE[service]
        placement = self.spec.services.get(service)
        label = (placement.public_name if placement else None) or kind.public_name
        if label is None:
            return []
        names = [f"{label}.{self.spec.farm.domain}"]
        if service == "portal":
            names += [d.domain for d in self.spec.departements]
        return names

    def public_services(self) -> dict[str, dict[str, Any]]:
        """Services the edge proxy publishes: names, backend hosts and port."""
        out: dict[str, dict[str, Any]] = {}
        for service, placement in self.spec.services.items():
            names = self.public_names(service)
            if names:
                out[service] = {
                    "names": names,
                    "backends": list(placement.hosts),
                    "port": SERVICE_CATALOGUE[service].backend_port,
                }
        return out

    def all_public_names(self) -> list[str]:
        return [n for s in self.public_services().values() for n in s["names"]]

    @property
    def public_https_port(self) -> int:
        """Port users reach HTTPS on: 443, or the lab's published port on 127.0.0.1."""
        return self.lab.publish.https if self.kind == "lab" else 443

    def public_url(self, name: str) -> str:
        """``https://<name>[:port]/`` as a user's browser reaches it."""
        port = self.public_https_port
        return f"https://{name}{'' if port == 443 else f':{port}'}/"

    def portal_branding(self) -> Branding:
        """Branding of the generic portal name: farm.yml's, else the académie's name."""
        if self.spec.portal.branding is not None:
            return self.spec.portal.branding
        name = self.spec.academie.name
        elided = name[:1].upper() in "AEIOUYÉÈÊÀÂÎÔH"
        return Branding(name=f"ENT de l'académie {'d' + chr(39) if elided else 'de '}{name}",
                        colors=Colors(primary=DEFAULT_PORTAL_COLORS[0],
                                      secondary=DEFAULT_PORTAL_COLORS[1]))

    def portal_tiles(self) -> list[dict[str, Any]]:
        """The tiles with their URL resolved (a placed service's public name by default)."""
        tiles = []
        for tile in self.spec.portal.tiles:
            url = tile.url
            if url is None:
                url = self.public_url(self.public_names(tile.id)[0])
            tiles.append({"id": tile.id, "label": tile.label,
                          "description": tile.description or "", "url": url,
                          "profiles": list(tile.profiles), "icon": tile.icon})
        return tiles

    def etablissements_of_wave(self, wave_id: str) -> list[Etablissement]:
        return [e for e in self.spec.etablissements if e.wave == wave_id]


# -- loading and validation ----------------------------------------------------------------
#
# Validation runs on the data as read, in three passes whose problems are reported together:
# 1. scalars: YAML 1.1 reads some unquoted text as numbers (036 is octal 30, 4.10 is 4.1); a
#    number is taken as written, and one whose meaning YAML changed is a problem of its own;
# 2. structure (types, required and unknown keys, patterns) through pydantic;
# 3. cross-references (duplicates, unknown départements, waves and hosts), tolerant of the
#    structural mistakes already reported, so that each mistake is reported once.

REQUIRED_SECTIONS = ("farm", "academie", "departements", "waves", "hosts", "services")


def _suggest(bad: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(bad, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strip(annotation: Any) -> Any:
    """X for Annotated[X, ...] and X | None."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _annotation_at(loc: YamlPath) -> Any:
    """The type the model expects at ``loc`` (None when the path leaves the model)."""
    current: Any = FarmSpec
    for part in loc:
        current = _strip(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if isinstance(part, str) and part in current.model_fields:
                current = current.model_fields[part].annotation
                continue
            return None
        origin, args = get_origin(current), get_args(current)
        if origin is list and isinstance(part, int):
            current = args[0]
        elif origin is dict and isinstance(part, str):
            current = args[1]
        else:
            return None
    return _strip(current)


def _model_at(loc: YamlPath) -> type[BaseModel] | None:
    found = _annotation_at(loc)
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def _field_at(loc: YamlPath) -> FieldInfo | None:
    parent = _model_at(loc[:-1]) if loc else None
    if parent is None or not isinstance(loc[-1], str):
        return None
    return parent.model_fields.get(loc[-1])


def _number_note(written: str, value: int) -> str:
    bare = written.lstrip("+-")
    if re.fullmatch(r"0[0-7_]+", bare):
        how = f"the octal number {value}"
    elif bare.startswith(("0x", "0b")):
        how = f"the {'hexadecimal' if bare[1] == 'x' else 'binary'} number {value}"
    elif ":" in bare:
        how = f"the base-60 number {value}"
    else:
        how = f"the number {value}"
    return f'YAML 1.1 reads {written} as {how}, not as written: quote it ("{written}")'


def _normalise(src: Located) -> tuple[Any, dict[YamlPath, str]]:
    """Numbers as written, and a note for each number YAML read differently from its text."""
    notes: dict[YamlPath, str] = {}

    def walk(value: Any, path: YamlPath) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        written = src.written.get(path)
        if written is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if written.lstrip("+") != str(value):
                notes[path] = _number_note(written, value)
            return written.lstrip("+")
        if isinstance(value, float):
            try:
                float(written)
            except ValueError:  # .inf, .nan, 1:30.5
                return value
            return written  # 4.10 stays 4.10 for a version; a number field parses it
        return value

    return walk(src.data, ()), notes


def _kind_of(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "a date"
    return "text"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shown(src: Located, loc: YamlPath, value: Any) -> str:
    """The value as the user wrote it when we know, else its repr."""
    written = src.written.get(loc)
    if written is not None and not isinstance(value, (dict, list)):
        return written or "(empty)"
    if value is None:
        return "(empty)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "[]"
    return _short(value)


_TYPE_EXPECTED = {
    "dict_type": "a mapping (key: value lines)",
    "list_type": "a list",
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "less_than_equal": ("le", "at most"),
    "greater_than": ("gt", "more than"),
    "less_than": ("lt", "less than"),
}


def _message(err: Any, loc: YamlPath, is_key: bool, src: Located) -> str:
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    value = err.get("input")
    shown = f"key {loc[-1]!r}" if is_key else _shown(src, loc, value)
    field = _field_at(loc)

    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        return (f"unknown key {loc[-1]!r}{_suggest(str(loc[-1]), valid)}; "
                f"valid keys here: {', '.join(valid)}")
    if kind == "missing":
        about = f": {field.description}" if field and field.description else ""
        return f"required key {loc[-1]!r} is missing{about}"
    if kind == "value_error":
        return str(ctx["error"]) if "error" in ctx else str(err["msg"])
    if kind == "dict_type" and field and field.description:
        return f"expected a mapping ({field.description.rstrip('.')}), got {_kind_of(value)}"
    if kind in ("model_type", "model_attributes_type") or (
        kind == "dict_type" and _model_at(loc) is not None
    ):
        model = _model_at(loc)
        keys = f" with the keys {', '.join(model.model_fields)}" if model else ""
        message = f"expected a mapping{keys}, got {_kind_of(value)}"
        if model and isinstance(value, str) and "name" in model.model_fields:
            message += f" (write: - name: {value})"
        return message
    if kind in _TYPE_EXPECTED:
        message = f"expected {_TYPE_EXPECTED[kind]}, got "
        message += _kind_of(value) if isinstance(value, (dict, list)) or value is None else (
            f"{shown} ({_kind_of(value)})")
        written = src.written.get(loc)
        if kind == "string_type" and written and not isinstance(value, (dict, list)):
            message += f'; YAML reads {written} as {_kind_of(value)}: quote it ("{written}")'
        if kind == "list_type" and isinstance(value, str):
            message += f"; write [{value}]"
        return message
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        if isinstance(value, (list, dict)):
            need = ctx.get("min_length", 1)
            return f"expected at least {need} item{'s' if need != 1 else ''}, got none"
        return "must not be empty"
    if kind == "too_long":
        return f"{shown}: at most {ctx.get('max_length')} allowed"
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        about = field.description if field and field.description else ""
        about = f" ({about[:1].lower()}{about[1:].rstrip('.')})" if about else ""
        return f"{shown}: must be {words} {bound}{about}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return f"{shown}: expected " + PATTERN_MEANING.get(pattern, f"text matching {pattern}")
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected)
        return f"{shown}: expected one of {expected}" + _suggest(str(value), choices)
    text = str(err["msg"])
    return f"{shown}: {text[:1].lower()}{text[1:]}"


def _structural_problems(src: Located, data: Any, notes: dict[YamlPath, str]) -> list[Problem]:
    problems: list[Problem] = []
    noted: set[YamlPath] = set()
    try:
        FarmSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
            is_key = bool(loc) and loc[-1] == "[key]"
            if is_key:
                loc = loc[:-1]
            message = _message(err, loc, is_key, src)
            if loc in notes and not is_key:
                message += f"; {notes[loc]}"
                noted.add(loc)
            problems.append(src.problem(loc, message))
    problems += [src.problem(loc, note) for loc, note in notes.items() if loc not in noted]
    return problems


def _uai_prefix(code: str) -> str:
    """First three digits of the UAIs of a département (Corsica's are 620 and 720)."""
    return {"02A": "620", "02B": "720"}.get(code, code)


def _lan_problems(src: Located, i: int, etab: dict[str, Any],
                  lans: dict[ipaddress.IPv4Network, int]) -> list[Problem]:
    """A school server's LAN: declared, its addresses inside it, no overlap with another's."""
    here: YamlPath = ("etablissements", i)
    lan = etab.get("lan")
    if etab.get("school_server") is True and lan is None:
        return [src.problem((*here, "school_server"),
                            "true: a school server needs its LAN; add lan: {subnet: "
                            "10.x.y.0/24} (the network its DHCP, DNS and proxy serve)")]
    if not isinstance(lan, dict):
        return []
    try:
        spec = SchoolLan.model_validate(lan)
    except ValidationError:
        return []  # reported by the structure pass
    net = spec.network()
    problems = []
    for key, value in (("address", spec.address), ("router", spec.router),
                       *((("dhcp_range", n), v) for n, v in enumerate(spec.dhcp_range or []))):
        if value is None:
            continue
        address = ipaddress.IPv4Address(value)
        if address not in net or address in (net.network_address, net.broadcast_address):
            loc = (*here, "lan", *(key if isinstance(key, tuple) else (key,)))
            problems.append(src.problem(loc, f"{value}: not a host address of the LAN "
                                        f"{spec.subnet}; expected one of {net[1]} to {net[-2]}"))
    first, last = (ipaddress.IPv4Address(a) for a in spec.leases())
    if first <= ipaddress.IPv4Address(spec.server_address()) <= last:
        problems.append(src.problem((*here, "lan"), f"the school server's address "
                                    f"{spec.server_address()} is inside its DHCP range "
                                    f"{first}-{last}; move one of them"))
    for other, j in lans.items():
        if net.overlaps(other):
            problems.append(src.problem((*here, "lan", "subnet"), f"{spec.subnet} overlaps "
                                        f"{other}, the LAN of etablissements[{j}]; each school "
                                        "LAN is a network of its own"))
    lans[net] = i
    return problems


def _lab_subnet_problems(src: Located, data: dict[str, Any],
                         lans: dict[ipaddress.IPv4Network, int]) -> list[Problem]:
    """The lab network must not overlap a school LAN: a school server is on both."""
    lab = data.get("lab")
    subnet = lab.get("subnet", Lab.model_fields["subnet"].default) \
        if isinstance(lab, dict) else Lab.model_fields["subnet"].default
    try:
        net = ipaddress.IPv4Network(Lab(subnet=subnet).subnet)
    except (ValidationError, TypeError):
        return []  # reported by the structure pass
    return [src.problem(("lab", "subnet") if isinstance(lab, dict) and "subnet" in lab
                        else ("etablissements", j, "lan", "subnet"),
                        f"{net} (the lab network) overlaps {other}, the LAN of "
                        f"etablissements[{j}]; change lab.subnet or the LAN")
            for other, j in lans.items() if net.overlaps(other)]


def _reference_problems(src: Located, data: dict[str, Any]) -> list[Problem]:
    """Cross-reference checks; each looks only at values that are well formed."""
    problems: list[Problem] = []

    def add(loc: YamlPath, message: str) -> None:
        problems.append(src.problem(loc, message))

    def items(key: str) -> list[tuple[int, dict[str, Any]]]:
        value = data.get(key)
        if not isinstance(value, list):
            return []
        return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]

    def declared(key: str, field: str, what: str) -> dict[str, int] | None:
        """Id -> index of the ids of a section; None when the section is unusable.

        Ids of the wrong shape count as declared: their shape is reported by the structure
        pass, and a reference to them would only repeat it. A bare string item (``- edge``
        instead of ``- name: edge``) is read as its id for the same reason.
        """
        section = data.get(key)
        if not isinstance(section, list):
            return None
        seen: dict[str, int] = {}
        for i, item in enumerate(section):
            ident = item.get(field) if isinstance(item, dict) else item
            if not isinstance(ident, str):
                continue
            if ident in seen:
                add((key, i, field), f"{what} {ident!r} is already declared at "
                    f"{key}[{seen[ident]}]; each {what} appears once")
            else:
                seen[ident] = i
        return seen

    dep_codes = declared("departements", "code", "département code")
    wave_ids = declared("waves", "id", "wave id")
    host_names = declared("hosts", "name", "host name")

    seen_uai: dict[str, int] = {}
    school_hosts: dict[str, int] = {}
    lans: dict[ipaddress.IPv4Network, int] = {}
    for i, etab in items("etablissements"):
        uai = etab.get("uai")
        valid_uai = isinstance(uai, str) and uai_problem(uai) is None
        if isinstance(uai, str) and valid_uai:
            if uai in seen_uai:
                add(("etablissements", i, "uai"),
                    f"UAI {uai!r} is already used by etablissements[{seen_uai[uai]}]; "
                    "each établissement appears once")
            else:
                seen_uai[uai] = i
            if etab.get("school_server") is True:
                school_hosts[f"se-{uai.lower()}"] = i
        dep = etab.get("departement")
        if isinstance(dep, str) and re.match(DEPARTEMENT_RE, dep) and dep_codes is not None:
            if dep not in dep_codes:
                add(("etablissements", i, "departement"),
                    f"unknown département {dep!r}{_suggest(dep, dep_codes)}; declared under "
                    f"departements: {', '.join(dep_codes) or 'none'}")
            elif isinstance(uai, str) and valid_uai and not uai.startswith(_uai_prefix(dep)):
                add(("etablissements", i, "departement"),
                    f"{dep!r} does not match UAI {uai}, whose first three digits give the "
                    f"département ({uai[:3]}); expected departement: \"{uai[:3]}\" "
                    "or check the UAI")
        problems += _lan_problems(src, i, etab, lans)
        wave = etab.get("wave")
        if isinstance(wave, str) and re.match(WAVE_ID_RE, wave) and wave_ids is not None:
            if wave not in wave_ids:
                add(("etablissements", i, "wave"),
                    f"unknown wave {wave!r}{_suggest(wave, wave_ids)}; declared under waves: "
                    f"{', '.join(wave_ids) or 'none'}")

    problems += _lab_subnet_problems(src, data, lans)
    services = data.get("services")
    if not isinstance(services, dict):
        return problems
    known_hosts = None if host_names is None else {**host_names, **school_hosts}
    # public name -> (what defines it, where, set explicitly)
    published: dict[str, list[tuple[str, YamlPath, bool]]] = {}
    farm_domain = data.get("farm", {}).get("domain") if isinstance(data.get("farm"), dict) else None
    for service, placement in services.items():
        if service not in SERVICE_CATALOGUE:
            add(("services", service),
                f"unknown service {service!r}{_suggest(service, SERVICE_CATALOGUE)}; "
                f"known services: {', '.join(SERVICE_CATALOGUE)}")
            continue
        if not isinstance(placement, dict):
            continue
        placed: dict[str, str] = {}
        for field in ("hosts", "replicas"):
            hosts = placement.get(field)
            if not isinstance(hosts, list):
                continue
            for j, host in enumerate(hosts):
                if not isinstance(host, str) or not re.match(DNS_LABEL_RE, host):
                    continue
                here = f"{field}[{j}]"
                if known_hosts is not None and host not in known_hosts:
                    central = ", ".join(host_names or {}) or "none"
                    schools = (f" (and the {len(school_hosts)} school servers se-<uai>)"
                               if school_hosts else "")
                    add(("services", service, field, j),
                        f"service {service!r} is placed on undeclared host {host!r}"
                        f"{_suggest(host, known_hosts)}; declared hosts: {central}{schools}")
                elif host in placed:
                    add(("services", service, field, j),
                        f"host {host!r} is already listed at services.{service}.{placed[host]}; "
                        "a host carries a service once")
                else:
                    placed[host] = here
        label = placement.get("public_name")
        kind = SERVICE_CATALOGUE[service]
        if label is not None and kind.public_name is None:
            publishable = [s for s, k in SERVICE_CATALOGUE.items() if k.public_name]
            add(("services", service, "public_name"),
                f"{service!r} is not published by the proxy, so it takes no public_name; "
                f"services with a public name: {', '.join(publishable)}")
        elif isinstance(farm_domain, str):
            explicit = isinstance(label, str)
            label = label if isinstance(label, str) else kind.public_name
            if label:
                where: YamlPath = ("services", service, "public_name") if explicit else (
                    "services", service)
                published.setdefault(f"{label}.{farm_domain}", []).append(
                    (f"service {service!r}", where, explicit))
    if "portal" in services:
        for i, dep in items("departements"):
            domain = dep.get("domain")
            if isinstance(domain, str):
                published.setdefault(domain, []).append(
                    (f"the portal of departements[{i}]", ("departements", i, "domain"), True))
    for name, users in published.items():
        if len(users) < 2:
            continue
        # Blame the names written in the file rather than the catalogue's defaults.
        blamed = [u for u in users if u[2]] or users[1:]
        for who, where, _ in blamed:
            others = ", ".join(w for w, _, _ in users if w != who)
            add(where, f"public name {name!r} of {who} is also the public name of {others}; "
                "each public name serves one service")
    portal = data.get("portal")
    tiles = portal.get("tiles") if isinstance(portal, dict) else None
    if isinstance(tiles, list):
        publishable = [s for s in services if s in SERVICE_CATALOGUE
                       and (SERVICE_CATALOGUE[s].public_name or (
                           isinstance(services[s], dict) and services[s].get("public_name")))]
        seen_tiles: dict[str, int] = {}
        for i, tile in enumerate(tiles):
            if not isinstance(tile, dict) or not isinstance(tile.get("id"), str):
                continue
            tile_id = tile["id"]
            if tile_id in seen_tiles:
                add(("portal", "tiles", i, "id"),
                    f"tile {tile_id!r} is already declared at portal.tiles[{seen_tiles[tile_id]}]; "
                    "each tile appears once")
                continue
            seen_tiles[tile_id] = i
            if tile.get("url") is None and tile_id not in publishable:
                add(("portal", "tiles", i, "id"),
                    f"tile {tile_id!r} has no url and is not a placed service with a public "
                    f"name{_suggest(tile_id, publishable)}: set url: https://… or use the id of "
                    f"one of: {', '.join(publishable) or 'none'}")
    if "proxy" not in services:
        add(("services",), "no host carries the 'proxy' service: the farm needs an edge "
            "(add services.proxy.hosts: [<host>])")
    return problems


def _check(src: Located) -> tuple[Any, list[Problem]]:
    """The data to build the model from, and every problem found."""
    problems = list(src.problems)
    if not isinstance(src.data, dict):
        got = "the file is empty" if src.data is None else f"got {_kind_of(src.data)}"
        problems.append(src.problem((), f"expected a mapping with the sections "
                                    f"{', '.join(REQUIRED_SECTIONS)}; {got}"))
        return src.data, problems
    data, notes = _normalise(src)
    problems += _structural_problems(src, data, notes) + _reference_problems(src, data)
    # Passes may meet one mistake twice; report it once, in file order.
    unique: dict[tuple[str, str], Problem] = {}
    for p in problems:
        unique.setdefault((p.path, p.message), p)
    return data, sorted(unique.values(), key=lambda p: (p.line or 0, p.path))


def validate_document(src: Located) -> list[Problem]:
    """Every problem of a farm document (empty when it is valid)."""
    return _check(src)[1]


def resolve_inventory(inventory: str | Path) -> Path:
    """An inventory is a directory holding farm.yml (or the farm.yml itself)."""
    path = Path(inventory)
    if path.is_file() or path.name in (FARM_FILE, "farm.yaml"):
        path = path.parent
    return path


def load_farm(inventory: str | Path) -> Farm:
    """Load and validate; raises :class:`ValidationFailed` listing every problem."""
    inventory_dir = resolve_inventory(inventory)
    farm_file = inventory_dir / FARM_FILE
    if not farm_file.is_file():
        where = ("no such directory" if not inventory_dir.is_dir()
                 else f"no {FARM_FILE} in this directory")
        raise ValidationFailed([Problem(
            str(farm_file), "",
            f"{where}; point -i at an inventory directory such as inventories/lab")])
    src = load_located(farm_file, str(farm_file), strict=False)
    data, problems = _check(src)
    if problems:
        raise ValidationFailed(problems)
    return Farm(FarmSpec.model_validate(data), inventory_dir)


def json_schema() -> dict[str, Any]:
    """JSON Schema of farm.yml, for editors (yaml-language-server) and other tools."""
    schema = FarmSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://entfarm.invalid/schema/farm.schema.json"
    schema["title"] = "entfarm farm.yml"
    # Editors complete and check service names against the catalogue, as validation does.
    schema["properties"]["services"]["propertyNames"] = {"enum": list(SERVICE_CATALOGUE)}
    return schema


def schema_text() -> str:
    """The committed schema/farm.schema.json, byte for byte (same as `entfarm schema`)."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
