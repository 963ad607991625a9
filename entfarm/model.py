"""The farm model: ``inventories/<farm>/farm.yml`` as validated, typed data.

Everything else (Ansible inventory, lab topology, waves, verification targets, audit scope) is
derived from a :class:`Farm`. Loading validates in two passes and reports every problem at once:
the structure (types, required and unknown keys) through pydantic, then the cross-references
(duplicate UAIs, unknown départements, waves and hosts) on the raw data, so that a structural
mistake in one établissement does not hide a reference mistake in another.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from .errors import Problem, ValidationFailed
from .uai import uai_problem
from .yamlsrc import Located, PathPart, load_located

FARM_FILE = "farm.yml"
DNS_LABEL_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DNS_LABEL = re.compile(DNS_LABEL_RE)
_DOMAIN = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$")

DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_RE)]
Domain = Annotated[str, StringConstraints(pattern=_DOMAIN.pattern, max_length=253)]
DepartementCode = Annotated[str, StringConstraints(pattern=r"^(0[1-9][0-9]|[1-9][0-9]{2}|02[AB])$")]
WaveId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
Color = Annotated[str, StringConstraints(pattern=r"^#[0-9a-fA-F]{6}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


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


class Academie(_Strict):
    code: Annotated[str, StringConstraints(pattern=r"^[0-9]{2}$")] = Field(
        description="Académie code, two digits (Orléans-Tours is 18)."
    )
    name: str = Field(min_length=1)
    base_dn: Annotated[str, StringConstraints(pattern=r"^dc=[a-z0-9-]+(,dc=[a-z0-9-]+)*$")] = Field(
        description="Base DN of the académie's directory, e.g. dc=ac-orleans-tours,dc=fr."
    )


class Colors(_Strict):
    primary: Color
    secondary: Color


class Branding(_Strict):
    name: str = Field(min_length=1, description="Name shown on the portal.")
    logo: str | None = Field(default=None, description="Path relative to the inventory directory.")
    colors: Colors


class Departement(_Strict):
    code: DepartementCode = Field(description="Three characters: 036, 045, 02A …")
    name: str = Field(min_length=1)
    domain: Domain = Field(description="Public domain of the département's portal.")
    branding: Branding


class Wave(_Strict):
    id: WaveId = Field(description="Short id; the Ansible group is wave_<id>.")
    name: str = Field(min_length=1)
    canary: int = Field(default=1, ge=0, description="Établissements onboarded first, alone.")
    failure_threshold: float = Field(
        default=0.1, ge=0, le=1,
        description="Share of the wave's établissements that may fail before the wave stops.",
    )

    @field_validator("id", mode="before")
    @classmethod
    def _int_id(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Etablissement(_Strict):
    uai: str = Field(description="7 digits then the check letter, e.g. 0290009C.")
    name: str = Field(min_length=1)
    type: Literal["college", "lycee", "lycee_professionnel", "erea", "ecole"] = "college"
    commune: str = Field(min_length=1)
    departement: DepartementCode
    wave: WaveId
    school_server: bool = Field(default=False, description="Gets a host named se-<uai>.")

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
        return f"se-{self.uai.lower()}"


class Host(_Strict):
    name: DnsLabel = Field(description="Host name: a DNS label (lower case, digits, '-').")
    address: str | None = Field(default=None, description="Production: address to SSH to.")


class ServicePlacement(_Strict):
    hosts: list[DnsLabel] = Field(min_length=1, description="Hosts carrying the service.")
    public_name: DnsLabel | None = Field(
        default=None, description="Overrides the label under farm.domain."
    )
    replicas: list[DnsLabel] = Field(
        default_factory=list, description="Hosts carrying read replicas (directory, databases)."
    )


class ArtifactSource(_Strict):
    url: str
    sha256: Sha256
    version: str | None = None


class Artifacts(_Strict):
    store: str = Field(default="state/artifacts", description="Relative to the inventory.")
    mirror: str | None = Field(default=None, description="Base URL replacing release URLs.")
    sources: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]+$")], ArtifactSource] = (
        Field(default_factory=dict)
    )


class LabPublish(_Strict):
    https: int = Field(default=8443, ge=1024, le=65535)
    http: int = Field(default=8080, ge=1024, le=65535)


class Lab(_Strict):
    network: DnsLabel = "entfarm-lab"
    publish: LabPublish = Field(default_factory=LabPublish)


class FarmSpec(_Strict):
    """The document as written. :class:`Farm` adds what is derived from it."""

    farm: FarmSection
    academie: Academie
    departements: list[Departement] = Field(min_length=1)
    waves: list[Wave] = Field(min_length=1)
    etablissements: list[Etablissement] = Field(default_factory=list)
    hosts: list[Host] = Field(min_length=1)
    services: dict[str, ServicePlacement]
    versions: dict[str, str] = Field(default_factory=dict)
    artifacts: Artifacts = Field(default_factory=Artifacts)
    lab: Lab | None = None

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
                result.append(FarmHost(name, address, (SCHOOL_SERVER_GROUP,), etab.uai))
        return result

    def _is_school_host(self, name: str) -> bool:
        return any(
            e.school_server and e.school_server_host == name for e in self.spec.etablissements
        )

    def container_name(self, host: str) -> str:
        """Lab container of a host."""
        return f"entfarm-{self.name}-{host}"

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

    def etablissements_of_wave(self, wave_id: str) -> list[Etablissement]:
        return [e for e in self.spec.etablissements if e.wave == wave_id]


# -- loading and validation ----------------------------------------------------------------


def _suggest(bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"valid keys here: {', '.join(sorted(valid))}{hint}"


def _model_at(loc: tuple[PathPart, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` (for unknown-key hints)."""
    model: Any = FarmSpec
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return None
        if part not in fields:
            # a key of a dict[str, Model] (services.<name>, artifacts.sources.<name>)
            return None
        annotation = fields[part].annotation
        model = _unwrap_model(annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if args:
        for arg in reversed(args):  # dict[str, X] -> X, list[X] -> X, X | None -> X
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _structural_problems(src: Located) -> list[Problem]:
    try:
        FarmSpec.model_validate(src.data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc: tuple[PathPart, ...] = tuple(err["loc"])
            # pydantic appends the validator's tag for unions (e.g. 'str'): drop non-path parts
            loc = _clean_loc(src.data, loc)
            value = err.get("input")
            if err["type"] == "extra_forbidden":
                parent = _model_at(loc[:-1])
                valid = list(parent.model_fields) if parent else []
                msg = f"unknown key {loc[-1]!r}; " + _suggest(str(loc[-1]), valid)
            elif err["type"] == "missing":
                msg = f"required key {loc[-1]!r} is missing"
            elif err["type"] == "value_error":
                msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
            else:
                msg = f"{_short(value)}: {_explain(err)}"
            problems.append(src.problem(loc, msg))
        return problems
    return []


def _clean_loc(data: Any, loc: tuple[PathPart, ...]) -> tuple[PathPart, ...]:
    clean: list[PathPart] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            clean.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            clean.append(part)
            node = node[part]
        elif isinstance(node, dict) and not clean or isinstance(node, dict):
            # missing or extra key: keep it as the last element and stop
            clean.append(part)
            node = None
        else:
            continue
    return tuple(clean)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _explain(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx", {})
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        known = {
            DNS_LABEL_RE: "a DNS label: lower-case letters, digits and '-', at most 63, "
            "not starting or ending with '-'",
            _DOMAIN.pattern: "a lower-case domain name such as ent.example.fr",
        }
        return "expected " + known.get(pattern, f"a value matching {pattern}")
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    return str(err["msg"]).lower()


def _reference_problems(src: Located) -> list[Problem]:
    """Cross-reference checks on the raw data; tolerant of structural errors already reported."""
    data = src.data if isinstance(src.data, dict) else {}
    problems: list[Problem] = []

    def items(key: str) -> list[tuple[int, dict[str, Any]]]:
        value = data.get(key)
        if not isinstance(value, list):
            return []
        return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]

    dep_codes = [str(d.get("code")) for _, d in items("departements")]
    wave_ids = [str(w.get("id")) for _, w in items("waves")]
    for key, ids, what in (("departements", dep_codes, "code"), ("waves", wave_ids, "id")):
        seen: dict[str, int] = {}
        for i, item in items(key):
            ident = str(item.get(what))
            if ident in seen:
                problems.append(src.problem(
                    (key, i, what),
                    f"{ident!r} is already used by {key}[{seen[ident]}]; each {what} is unique"))
            seen.setdefault(ident, i)

    host_names: list[str] = [str(h.get("name")) for _, h in items("hosts")]
    seen_hosts: dict[str, int] = {}
    for i, host in items("hosts"):
        name = str(host.get("name"))
        if name in seen_hosts:
            problems.append(src.problem(
                ("hosts", i, "name"),
                f"host {name!r} is already declared at hosts[{seen_hosts[name]}]"))
        seen_hosts.setdefault(name, i)

    seen_uai: dict[str, int] = {}
    for i, etab in items("etablissements"):
        uai = etab.get("uai")
        if isinstance(uai, str):
            if uai in seen_uai:
                problems.append(src.problem(
                    ("etablissements", i, "uai"),
                    f"UAI {uai!r} is already used by etablissements[{seen_uai[uai]}]; "
                    "each établissement appears once"))
            seen_uai.setdefault(uai, i)
            if etab.get("school_server") is True:
                host_names.append(f"se-{uai.lower()}")
        dep = etab.get("departement")
        if dep is not None and str(dep) not in dep_codes:
            problems.append(src.problem(
                ("etablissements", i, "departement"),
                f"unknown département {str(dep)!r}; declared: {', '.join(dep_codes) or 'none'}"))
        wave = etab.get("wave")
        if wave is not None and str(wave) not in wave_ids:
            problems.append(src.problem(
                ("etablissements", i, "wave"),
                f"unknown wave {str(wave)!r}; declared: {', '.join(wave_ids) or 'none'}"))

    services = data.get("services")
    if isinstance(services, dict):
        for service, placement in services.items():
            if service not in SERVICE_CATALOGUE:
                problems.append(src.problem(
                    ("services", service),
                    f"unknown service {service!r}; " + _suggest(service, list(SERVICE_CATALOGUE))
                    .replace("valid keys here", "known services")))
                continue
            if not isinstance(placement, dict):
                continue
            for field in ("hosts", "replicas"):
                hosts = placement.get(field)
                if not isinstance(hosts, list):
                    continue
                for j, host in enumerate(hosts):
                    if str(host) not in host_names:
                        problems.append(src.problem(
                            ("services", service, field, j),
                            f"service {service!r} is placed on undeclared host {host!r}; "
                            f"declared hosts: {', '.join(host_names) or 'none'}"))
        if "proxy" not in services:
            problems.append(src.problem(
                ("services",), "no host carries the 'proxy' service: the farm needs an edge"))
    return problems


def validate_document(src: Located) -> list[Problem]:
    problems = _structural_problems(src) + _reference_problems(src)
    # Structural and reference passes may both see one mistake; report it once.
    unique: dict[tuple[str, str], Problem] = {}
    for p in problems:
        unique.setdefault((p.path, p.message), p)
    return sorted(unique.values(), key=lambda p: (p.line or 0, p.path))


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
    if not farm_file.exists():
        raise ValidationFailed([Problem(
            str(farm_file), "",
            "no farm.yml here; point -i at an inventory directory such as inventories/lab")])
    src = load_located(farm_file, str(farm_file))
    if not isinstance(src.data, dict):
        raise ValidationFailed([src.problem((), "expected a mapping with farm, academie, ...")])
    problems = validate_document(src)
    if problems:
        raise ValidationFailed(problems)
    return Farm(FarmSpec.model_validate(src.data), inventory_dir)


def json_schema() -> dict[str, Any]:
    schema = FarmSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "entfarm farm.yml"
    return schema
