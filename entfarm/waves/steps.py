"""What onboarding one établissement means: the steps, each with its gate.

A step is a small class (see :class:`Step`): ``plan`` says what it will do, ``check`` whether it
is already done, ``apply`` does it (``apply_batch`` when one action serves a whole batch, as the
AAF import does), ``verify`` is its gate and returns :class:`Evidence`, ``disable`` takes the
établissement out with its data kept. Adding a service's tenant is one class here and one line in
:func:`default_steps`.

Gates never pass what they could not check: a step not built yet answers "not verifiable",
and a service absent from farm.yml is "skipped" (not deployed).
"""

from __future__ import annotations

import csv
import json
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..aaf.transport import LocalTransport, TransportError
from ..errors import UserError
from ..model import Etablissement, Farm

Outcome = Literal["passed", "failed", "not_verifiable", "skipped"]
PASSED: Outcome = "passed"
FAILED_GATE: Outcome = "failed"
NOT_VERIFIABLE: Outcome = "not_verifiable"
SKIPPED: Outcome = "skipped"
NOT_BUILT = "not verifiable: step not built yet"
# How long a tenant step trusts the role facts it read (one batch's checks, apply and gates).
FACTS_TTL_S = 60.0
# The roles whose local facts carry the deployed version of a central service.
CENTRAL_ROLES = ("directory", "cas", "portal", "proxy", "postgresql", "redis")


@dataclass(frozen=True)
class Evidence:
    """The outcome of one gate (or preflight check) and what it saw, for the ledger."""

    gate: str
    outcome: Outcome
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Step:
    """One thing onboarding does to an établissement, and the gate proving it."""

    name = "step"
    title = "Step"  # column title in the plan
    gate = "gate"  # what the gate checks, as progress shows it
    built = True  # False: the role behind it does not exist yet; nothing is applied

    def applicable(self, etab: Etablissement) -> bool:
        """False when the farm has nothing of this kind for the établissement (skipped)."""
        return True

    def skip_reason(self, etab: Etablissement) -> str:
        return "not deployed"

    def plan(self, etab: Etablissement) -> str:
        """What the step will do, in one line, for the plan."""
        raise NotImplementedError

    def preflight(self) -> Evidence | None:
        """A check before any change (e.g. its input exists); None when there is none."""
        return None

    def check(self, etab: Etablissement) -> bool:
        """Already done? (resume and re-apply do not redo it)"""
        return False

    def apply(self, etab: Etablissement) -> None:
        raise NotImplementedError

    def apply_batch(self, etabs: Sequence[Etablissement]) -> dict[str, Exception]:
        """Apply to each; the errors by UAI (an établissement absent from the result is done)."""
        errors: dict[str, Exception] = {}
        for etab in etabs:
            try:
                self.apply(etab)
            except Exception as exc:  # one établissement's failure must not stop the batch
                errors[etab.uai] = exc
        return errors

    def verify(self, etab: Etablissement) -> Evidence:
        return Evidence(self.gate, NOT_VERIFIABLE, NOT_BUILT)

    def disable(self, etab: Etablissement) -> str:
        """Take the établissement out, data kept; what was done, in one line."""
        return "nothing to disable"


# -- reaching hosts -----------------------------------------------------------------------------


def host_transport(farm: Farm, host_name: str) -> LocalTransport:
    """Commands on one farm host, the way the inventory reaches it (docker exec or ssh)."""
    host = next((h for h in farm.hosts() if h.name == host_name), None)
    if host is None:
        raise UserError(f"no host {host_name!r} in {farm.file}")
    reach = farm.reach(host)
    if reach.connection == "docker":
        return LocalTransport(prefix=["docker", "exec", "-i", reach.target])
    return LocalTransport(
        prefix=["ssh", "-o", "BatchMode=yes", f"{reach.user}@{reach.target}", "--"], quote=True)


def read_fact(farm: Farm, host: str, role: str) -> dict[str, Any] | None:
    """``/etc/ansible/facts.d/<role>.fact`` of a host (what the role deployed), None if absent."""
    out = host_transport(farm, host).run(
        ["sh", "-c", f"cat /etc/ansible/facts.d/{role}.fact 2>/dev/null || true"])
    text = out.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def deployed_versions(farm: Farm) -> dict[str, Any]:
    """Versions of the central services as their roles recorded them, and farm.yml's pins."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        entfarm_version = version("entfarm")
    except PackageNotFoundError:
        entfarm_version = "unknown"
    out: dict[str, Any] = {"entfarm": entfarm_version, "pinned": dict(farm.spec.versions)}
    commit = _git_commit()
    if commit:
        out["entfarm_commit"] = commit
    deployed: dict[str, str] = {}
    for role in CENTRAL_ROLES:
        placement = farm.spec.services.get(role)
        if placement is None:
            continue
        try:
            fact = read_fact(farm, placement.hosts[0], role)
        except UserError:
            fact = None
        deployed[role] = str(fact.get("version", "unknown")) if fact else "not deployed"
    out["deployed"] = deployed
    return out


def _git_commit() -> str | None:
    from ..runner import project_root

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(),
                              capture_output=True, text=True, check=False, timeout=10)
    except (OSError, UserError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def central_preflight(farm: Farm, run_dir: Path) -> list[Evidence]:
    """The central services' verify suites (all hosts but school servers): healthy or stop."""
    from ..model import SCHOOL_SERVER_GROUP

    central = [h.name for h in farm.hosts() if SCHOOL_SERVER_GROUP not in h.services]
    return [suite_evidence(farm, "central services verified", [], central,
                           run_dir / "preflight-verify.xml")]


def suite_evidence(farm: Farm, gate: str, roles: list[str], hosts: list[str],
                   report: Path, select: str | None = None) -> Evidence:
    """The roles' verify suites on these hosts, as the evidence of a gate (``select``: only
    the tests of that name)."""
    from ..verify import run_verify

    log = report.with_suffix(".log")
    # pytest keeps the last --junitxml: the report lands in the wave's run directory, and its
    # output in a log beside it (the gate's evidence names both).
    rc = run_verify(farm, roles, hosts=hosts, log=log,
                    extra_args=["-q", f"--junitxml={report}", *(["-k", select] if select else [])])
    counts = _junit_counts(report)
    detail = (f"verify suites: exit {rc}; " + ", ".join(f"{k} {v}" for k, v in counts.items())
              if counts else f"verify suites: exit {rc}")
    if rc != 0:
        detail += f"; output in {log}"
    # Skips are "not verifiable" or "not applicable": a run where nothing else happened
    # checked nothing, and proves nothing.
    checked = counts.get("tests", 0) - counts.get("skipped", 0)
    ok = rc == 0 and checked > 0
    if rc == 0 and checked <= 0:
        detail += f"; no check ran on {', '.join(hosts)}"
    return Evidence(gate, PASSED if ok else FAILED_GATE, detail,
                    {"exit": rc, "report": str(report), "log": str(log), "hosts": hosts,
                     **counts})


def _junit_counts(report: Path) -> dict[str, int]:
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in out:
            out[key] += int(suite.get(key, "0") or 0)
    return out


# -- directory: the établissement's AAF feed, and its accounts logging in through CAS ------------

ScopeProvider = Callable[[], tuple[set[str], set[str]]]


@dataclass(frozen=True)
class DistributedAccount:
    login: str
    code: str
    profil: str
    distributed: str = ""  # the distribution file's name: comptes-<time>.csv


def distributed_accounts(farm: Farm, uai: str) -> dict[str, DistributedAccount]:
    """login -> account, from the établissement's distribution CSVs, latest code winning (a
    re-import of the same export distributes nothing new)."""
    accounts: dict[str, DistributedAccount] = {}
    folder = farm.state_dir / "aaf" / "distribution" / uai
    for path in sorted(folder.glob("comptes-*.csv"), key=lambda p: p.name):
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                accounts[row["login"]] = DistributedAccount(
                    row["login"], row["code_activation"], row["profil"], path.name)
    return accounts


# Distributed élèves the gate considers, most recently distributed first.
GATE_CANDIDATES = 50


class CasLoginGate:
    """An imported élève of the établissement logs in through CAS, and the ticket validates
    with the établissement's UAI among the user's attributes.

    The account is one whose one-time code the import distributed: the gate runs right after
    the import, before codes are handed out, so no real person's password is ever needed. The
    code itself is never recorded; the login is.
    """

    name = "CAS logins"

    def __init__(self, farm: Farm, directory: Callable[[], Any] | None = None):
        self.farm = farm
        # Where to check that a distributed account still exists and is active: a login
        # distributed by an earlier import may have left since, or its entry been deleted.
        self.directory = directory

    def client(self) -> Any:
        from ..casclient import CasClient

        names = self.farm.public_names("cas")
        if not names:
            raise UserError(f"{self.farm.file}: no services.cas; the CAS gate needs one")
        ca = self.farm.secrets_dir / "pki" / "ca.crt"
        ctx = (ssl.create_default_context(cafile=str(ca)) if ca.is_file()
               else ssl.create_default_context())
        # The lab's public names do not resolve: the published edge is on the loopback.
        connect_to = "127.0.0.1" if self.farm.kind == "lab" else None
        return CasClient(self.farm.public_url(names[0]), ctx, connect_to)

    def service(self) -> str:
        names = self.farm.public_names("portal")
        if not names:
            raise UserError(f"{self.farm.file}: no services.portal; the CAS gate logs in to it")
        return self.farm.public_url(names[0])

    def _active(self, etab: Etablissement, logins: list[str]) -> set[str]:
        from ..aaf.importer import _filter_escape

        assert self.directory is not None
        base = self.farm.spec.academie.base_dn
        structure = f"ENTStructureUAI={etab.uai},ou=structures,{base}"
        terms = "".join(f"(uid={_filter_escape(login)})" for login in logins)
        found = self.directory().search(
            f"ou=people,{base}",
            f"(&(ENTPersonEtat=ACTIF)(ENTPersonStructRattach={structure})(|{terms}))",
            ("uid",), "one")
        return {v for e in found.values() for v in e.get("uid", [])}

    def account(self, etab: Etablissement, profiles: Sequence[str] = ("élève",)
                ) -> tuple[DistributedAccount | None, str]:
        """An account the import distributed for the établissement, of one of these profiles
        (distribution labels: élève, enseignant …), still active: (account, "") or (None, why)."""
        wanted = set(profiles)
        candidates = sorted((a for a in distributed_accounts(self.farm, etab.uai).values()
                             if a.profil in wanted), key=lambda a: (a.distributed, a.login),
                            reverse=True)[:GATE_CANDIDATES]
        named = "/".join(sorted(wanted))
        if not candidates:
            return None, (f"no {named} account distributed for {etab.uai} (state/aaf/"
                          "distribution): the import provisioned nobody there")
        if self.directory is not None:
            active = self._active(etab, [a.login for a in candidates])
            candidates = [a for a in candidates if a.login in active]
            if not candidates:
                return None, (f"none of the {GATE_CANDIDATES} {named} accounts last "
                              f"distributed for {etab.uai} is active in the directory")
        return candidates[0], ""

    def verify(self, etab: Etablissement) -> Evidence:
        from ..casclient import CasClientError, portal_message, ticket_of

        account, why = self.account(etab)
        if account is None:
            return Evidence(self.name, FAILED_GATE, why)
        service = self.service()
        data: dict[str, Any] = {"account": account.login, "service": service}
        try:
            cas = self.client()
            data["cas"] = cas.base_url
            answer = cas.login(cas.browser(), service, account.login, account.code)
            ticket = ticket_of(answer, service)
            if ticket is None:
                return Evidence(self.name, FAILED_GATE,
                                f"{account.login}: no ticket ({portal_message(answer)})", data)
            validation = cas.validate(service, ticket)
        except CasClientError as exc:
            return Evidence(self.name, FAILED_GATE, f"CAS unreachable or unexpected: {exc}",
                            data)
        data["validated_user"] = validation.user
        if validation.failure:
            return Evidence(self.name, FAILED_GATE,
                            f"serviceValidate refused the ticket: {validation.failure}", data)
        uais = (validation.attributes.get("ENTStructureUAI", [])
                + validation.attributes.get("ENTEtablissementsUAI", []))
        data["profiles"] = validation.attributes.get("ENTPersonProfils", [])
        data["uai_released"] = etab.uai in uais
        if validation.user != account.login or etab.uai not in uais:
            return Evidence(self.name, FAILED_GATE,
                            f"ticket validated for {validation.user!r} without {etab.uai} in "
                            "its attributes", data)
        return Evidence(self.name, PASSED,
                        f"élève {account.login} logged in; ticket validated with {etab.uai}",
                        data)


class DirectoryStep(Step):
    """The établissement's structure and accounts from its AAF feed.

    One import per batch: the whole export, restricted to the ledger's scope (établissements
    onboarding, live or failed; the batch is already onboarding when it runs)."""

    name = "directory"
    title = "Annuaire (AAF)"
    gate = CasLoginGate.name

    def __init__(self, farm: Farm, export: Path | None, scope: ScopeProvider,
                 progress: Callable[[str], None] = lambda _line: None,
                 counts: dict[str, dict[str, int]] | None = None,
                 directory: Callable[[], Any] | None = None):
        self.farm = farm
        self.export = export
        self.directory_factory = directory  # tests: a local slapd instead of the farm's
        self.scope = scope
        self.progress = progress
        self.counts = counts or {}  # UAI -> category -> persons, for the plan
        self.gate_impl = CasLoginGate(farm, self._directory)
        # The export as read by the first batch, with the signature of its files: every batch
        # of a run imports the same export, and reading 50 collèges' XML costs more than a
        # batch's own accounts. Kept in memory for this run; on disk only the records cache
        # in the export directory itself (see entfarm.aaf.export.RecordCache).
        self._read: tuple[tuple[tuple[str, int, int], ...], Any] | None = None

    def _export(self) -> Any:
        """The export, read again only when a file of it was added, removed or rewritten."""
        from ..aaf.export import load
        from ..aaf.importer import record_cache

        assert self.export is not None
        files = sorted(f for f in self.export.iterdir() if f.is_file())
        signature = tuple((f.name, st.st_size, st.st_mtime_ns) for f in files
                          for st in [f.stat()])
        if self._read is None or self._read[0] != signature:
            self._read = (signature, load(self.export, progress=self.progress,
                                          cache=record_cache(self.farm, self.export)))
        return self._read[1]

    def _directory(self) -> Any:
        from ..aaf.importer import Directory

        if self.directory_factory is not None:
            return self.directory_factory()
        from ..aaf.transport import for_farm

        return Directory(for_farm(self.farm), self.farm.spec.academie.base_dn)

    def plan(self, etab: Etablissement) -> str:
        what = f"structure {etab.uai} (ou=structures)"
        c = self.counts.get(etab.uai)
        if c is None:
            return f"{what}; accounts and class groups of its AAF feed"
        return (f"{what}; {c.get('Eleve', 0)} élèves, {c.get('PersRelEleve', 0)} parents, "
                f"{c.get('PersEducNat', 0)} personnels; class groups")

    def preflight(self) -> Evidence | None:
        if self.export is None or not self.export.is_dir():
            return Evidence("AAF export", FAILED_GATE,
                            f"no AAF export directory at {self.export} (--aaf PATH)")
        return Evidence("AAF export", PASSED, f"AAF export {self.export}")

    def check(self, etab: Etablissement) -> bool:
        base = self.farm.spec.academie.base_dn
        structure = f"ENTStructureUAI={etab.uai},ou=structures,{base}"
        directory = self._directory()
        if not directory.search(structure, "(objectClass=ENTStructure)", ("ou",), "base"):
            return False
        active = directory.search(f"ou=people,{base}",
                                  f"(&(ENTPersonEtat=ACTIF)(ENTPersonStructRattach={structure}))",
                                  ("uid",), "one")
        return bool(active)

    def apply(self, etab: Etablissement) -> None:
        errors = self.apply_batch([etab])
        if errors:
            raise errors[etab.uai]

    def apply_batch(self, etabs: Sequence[Etablissement]) -> dict[str, Exception]:
        from ..aaf.importer import run_import

        if not etabs:
            return {}
        if self.export is None:
            error = UserError("no AAF export given (--aaf PATH)")
            return {e.uai: error for e in etabs}
        scope, held = self.scope()
        scope |= {e.uai for e in etabs}
        held -= scope
        try:
            result = run_import(self.export, self.farm, self._directory(), scope=scope,
                                held=held, progress=self.progress, export=self._export())
        except UserError as exc:  # a refusal or a failed ldapmodify: the whole batch failed
            return {e.uai: exc for e in etabs}
        for uai, counts in sorted(result.changes.per_uai.items()):
            if uai in {e.uai for e in etabs}:
                self.progress(f"{uai}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
        return {}

    def verify(self, etab: Etablissement) -> Evidence:
        return self.gate_impl.verify(etab)

    def disable(self, etab: Etablissement) -> str:
        from ..aaf.importer import run_import

        if self.export is None:
            raise UserError("rolling back the directory needs the AAF export (--aaf PATH)")
        scope, held = self.scope()
        scope.discard(etab.uai)
        held.add(etab.uai)
        result = run_import(self.export, self.farm, self._directory(), scope=scope, held=held,
                            progress=self.progress, export=self._export())
        counts = result.changes.per_uai.get(etab.uai)
        n = counts["people deactivate"] if counts else 0
        return (f"{n} account(s) deactivated (ENTPersonEtat DESACTIVE), entries and groups "
                "kept; later imports keep them deactivated and never purge them")


# -- portal ----------------------------------------------------------------------------------------


class PortalStep(Step):
    """The établissement on the portal of its département. The portal role renders farm.yml's
    établissements: nothing to apply; the gate reads the deployed configuration."""

    name = "portal"
    title = "Portail"
    gate = "portal lists it"

    def __init__(self, farm: Farm):
        self.farm = farm

    def applicable(self, etab: Etablissement) -> bool:
        return "portal" in self.farm.spec.services

    def skip_reason(self, etab: Etablissement) -> str:
        return "not deployed (no services.portal in farm.yml)"

    def plan(self, etab: Etablissement) -> str:
        dep = next((d for d in self.farm.spec.departements if d.code == etab.departement), None)
        where = dep.domain if dep else "its département's domain"
        return f"listed on the portal ({where}) with its tiles"

    def check(self, etab: Etablissement) -> bool:
        return True  # rendered from farm.yml by the portal role at deploy time

    def verify(self, etab: Etablissement) -> Evidence:
        placement = self.farm.spec.services["portal"]
        data: dict[str, Any] = {}
        for host in placement.hosts:
            try:
                fact = read_fact(self.farm, host, "portal")
                if not fact or not fact.get("config_file"):
                    return Evidence(self.gate, NOT_VERIFIABLE,
                                    f"not verifiable: no portal fact on {host} (portal role "
                                    "not deployed there)", data)
                raw = host_transport(self.farm, host).run(["cat", str(fact["config_file"])])
                config = json.loads(raw.decode("utf-8"))
            except (TransportError, json.JSONDecodeError) as exc:
                return Evidence(self.gate, FAILED_GATE, f"{host}: {exc}", data)
            listed = {str(e.get("uai")) for e in config.get("etablissements", [])
                      if isinstance(e, dict)}
            data[host] = {"version": fact.get("version"), "listed": etab.uai in listed}
            if etab.uai not in listed:
                return Evidence(self.gate, FAILED_GATE,
                                f"{host}: {etab.uai} missing from {fact['config_file']}", data)
        return Evidence(self.gate, PASSED,
                        f"listed by {len(placement.hosts)} portal host(s)", data)

    def disable(self, etab: Etablissement) -> str:
        return ("still listed (the portal lists farm.yml's établissements); its accounts are "
                "deactivated, so nobody of it can log in")


# -- service tenants --------------------------------------------------------------------------


class AppTenantStep(Step):
    """The établissement's objects in a PHP application (Moodle's category and cohort,
    Nextcloud's group folder): the role's ``<role>:tenants`` tag on the application's hosts
    with the batch's UAIs added to those its fact lists, one playbook run per batch; the gate
    is the role's own verify check of its tenants, on each host.

    Without the application's release (the role's fact says "artifact missing", as in the
    lab) there is nothing to create in: the step applies nothing and its gate answers "not
    verifiable", never passed."""

    def __init__(self, farm: Farm, role: str, title: str, what: str, check_name: str,
                 progress: Callable[[str], None] = lambda _line: None,
                 needs_app: str | None = None):
        self.farm = farm
        self.needs_app = needs_app  # an application plugin the tenants live in
        self.name = role
        self.title = title
        self.gate = f"{role} tenant"
        self.what = what
        self.check_name = check_name  # the test of roles/<role>/verify that checks tenants
        self.progress = progress
        self._read: tuple[float, dict[str, dict[str, Any] | None]] | None = None

    def applicable(self, etab: Etablissement) -> bool:
        return self.name in self.farm.spec.services

    def skip_reason(self, etab: Etablissement) -> str:
        return f"not deployed (no services.{self.name} in farm.yml)"

    def plan(self, etab: Etablissement) -> str:
        return (self.what.format(uai=etab.uai, name=etab.name)
                + f": playbooks/apps.yml --tags {self.name}:tenants")

    def _hosts(self) -> list[str]:
        return list(self.farm.spec.services[self.name].hosts)

    def _facts(self) -> dict[str, dict[str, Any] | None]:
        """The role's fact on each host, read once per batch: checks, apply and gates of one
        batch follow each other within seconds (the apply forgets them, as it rewrites them)."""
        now = time.monotonic()
        if self._read is None or now - self._read[0] > FACTS_TTL_S:
            self._read = (now, {host: read_fact(self.farm, host, self.name)
                                for host in self._hosts()})
        return self._read[1]

    @staticmethod
    def _installed(fact: dict[str, Any] | None) -> bool:
        return bool(fact) and fact.get("state") == "installed"  # type: ignore[union-attr]

    def check(self, etab: Etablissement) -> bool:
        facts = self._facts()
        return all(self._installed(f) and etab.uai in (f or {}).get("tenants", [])
                   for f in facts.values())

    def apply_batch(self, etabs: Sequence[Etablissement]) -> dict[str, Exception]:
        from ..runner import run_playbook

        facts = self._facts()
        missing = [h for h, f in facts.items() if not f]
        if missing:
            error = UserError(f"{self.name} is not deployed on {', '.join(missing)} (no "
                              f"{self.name} fact): deploy it first (entfarm deploy --tags "
                              f"{self.name})")
            return {e.uai: error for e in etabs}
        live = [h for h, f in facts.items() if self._installed(f)]
        if not live:
            states = sorted({str((f or {}).get("state")) for f in facts.values()})
            self.progress(f"{self.name}: {', '.join(states)}; no tenant to create")
            return {}
        tenants = sorted({u for h in live for u in (facts[h] or {}).get("tenants", [])}
                         | {e.uai for e in etabs})
        self.progress(f"{self.name}: creating the tenants of {len(etabs)} établissement(s) "
                      f"on {', '.join(live)}")
        self._read = None  # the play rewrites the facts
        result = run_playbook(self.farm, "playbooks/apps.yml", limit=",".join(live),
                              tags=f"{self.name}:tenants",
                              extravars={f"{self.name}__tenants": tenants})
        if result.exit_code != 0:
            failures = "; ".join(f"{f['task']}: {f['message']}" for f in result.failures[:3])
            error = UserError(f"{self.name} tenants: the apps play failed (exit "
                              f"{result.exit_code}, run directory {result.run_dir})"
                              f"{': ' + failures if failures else ''}")
            return {e.uai: error for e in etabs}
        return {}

    def verify(self, etab: Etablissement) -> Evidence:
        try:
            facts = self._facts()
        except TransportError as exc:
            return Evidence(self.gate, FAILED_GATE, str(exc))
        data: dict[str, Any] = {h: {"state": (f or {}).get("state"),
                                    "version": (f or {}).get("version")}
                                for h, f in facts.items()}
        for host, fact in facts.items():
            if not fact:
                return Evidence(self.gate, FAILED_GATE,
                                f"{host}: no {self.name} fact ({self.name} role not deployed)",
                                data)
            if not self._installed(fact):
                return Evidence(self.gate, NOT_VERIFIABLE,
                                f"not verifiable: {fact.get('state')} on {host} "
                                f"({fact.get('artifact')}); no tenant exists to check", data)
            if self.needs_app and self.needs_app in fact.get("apps_missing", []):
                return Evidence(self.gate, NOT_VERIFIABLE,
                                f"not verifiable: the {self.needs_app} app is missing on "
                                f"{host}", data)
            if etab.uai not in fact.get("tenants", []):
                return Evidence(self.gate, FAILED_GATE,
                                f"{host}: {etab.uai} is not among the {self.name} tenants its "
                                "role was given", data)
        return self.tenant_evidence(etab, facts, data)

    def disable(self, etab: Etablissement) -> str:
        return (f"{self.name} tenant kept with its data; nobody of {etab.uai} can sign in to "
                "it (its accounts are deactivated in the directory, which the CAS reads)")

    def tenant_evidence(self, etab: Etablissement, facts: dict[str, dict[str, Any] | None],
                        data: dict[str, Any]) -> Evidence:
        """The tenant itself, once every host's fact lists it: the role's verify check."""
        from ..runner import new_run_dir

        report = new_run_dir(self.farm, f"verify-{self.name}-tenants") / "verify.xml"
        evidence = suite_evidence(self.farm, self.gate, [self.name], self._hosts(), report,
                                  select=self.check_name)
        return Evidence(evidence.gate, evidence.outcome, evidence.detail,
                        {**evidence.data, "hosts_state": data})


# The établissement pad the Etherpad gate opens (its page only: the pad is not created).
ETHERPAD_GATE_PAD = "accueil"


class EtherpadTenantStep(AppTenantStep):
    """The établissement's pads (``<UAI>.<name>``, plugin ep_entfarm_cas): its UAI added to the
    etherpad role's tenants (``etherpad:tenants``, no restart). The gate signs in through the
    CAS as one of the établissement's distributed accounts whose profile may use Etherpad, and
    opens the page of the pad ``<UAI>.accueil`` through the edge: Etherpad must serve it (a pad
    of an établissement not onboarded, or of another one, is refused with 403)."""

    def __init__(self, farm: Farm, accounts: CasLoginGate,
                 progress: Callable[[str], None] = lambda _line: None):
        super().__init__(farm, "etherpad", "Etherpad",
                         "pads «{uai}.<nom>» open to its people", "", progress)
        self.accounts = accounts

    def tenant_evidence(self, etab: Etablissement, facts: dict[str, dict[str, Any] | None],
                        data: dict[str, Any]) -> Evidence:
        from ..aaf.mapping import PROFILE_LABELS
        from ..casclient import CasClientError, portal_message, ticket_of
        from ..portal.identity import PROFILE_TABLE

        fact = next(f for f in facts.values() if f)
        # Distribution labels (élève …) of the portal profiles the role lets in (eleve …).
        allowed = set(fact.get("profiles", []))
        labels = sorted({label for code, label in PROFILE_LABELS.items()
                         if PROFILE_TABLE.get(code) in allowed})
        if not labels:
            return Evidence(self.gate, NOT_VERIFIABLE,
                            "not verifiable: Etherpad lets in none of the profiles the AAF "
                            f"import distributes accounts to ({sorted(allowed)})", data)
        account, why = self.accounts.account(etab, labels)
        if account is None:
            return Evidence(self.gate, FAILED_GATE, why, data)
        pad = f"{fact['url']}p/{etab.uai}.{ETHERPAD_GATE_PAD}"
        data = {**data, "account": account.login, "profile": account.profil, "pad": pad}
        try:
            cas = self.accounts.client()
            browser = cas.browser()
            answer = cas.login(browser, pad, account.login, account.code)
            if ticket_of(answer, pad) is None:
                return Evidence(self.gate, FAILED_GATE,
                                f"{account.login}: no CAS ticket for {pad} "
                                f"({portal_message(answer)})", data)
            back = browser.request("GET", answer.location)  # the plugin opens the session
            page = browser.request("GET", pad) if back.status in (302, 303) else back
        except CasClientError as exc:
            return Evidence(self.gate, FAILED_GATE, f"through the edge: {exc}", data)
        data["status"] = page.status
        if page.status != 200:
            return Evidence(self.gate, FAILED_GATE,
                            f"{account.login} ({account.profil}) got HTTP {page.status} for "
                            f"{pad}", data)
        return Evidence(self.gate, PASSED,
                        f"{account.profil} {account.login} opened {etab.uai}'s pad page "
                        f"through the CAS", data)


class SchoolServerStep(Step):
    """The établissement's school server se-<uai>: the schools play limited to it, then the
    school_server verify suite on it as the gate. A school link that is down fails this
    établissement only (its host is unreachable); the wave's threshold decides the rest."""

    name = "school_server"
    title = "Serveur d'établissement"
    gate = "school server verified"

    def __init__(self, farm: Farm, progress: Callable[[str], None] = lambda _line: None):
        self.farm = farm
        self.progress = progress

    def applicable(self, etab: Etablissement) -> bool:
        return etab.school_server

    def skip_reason(self, etab: Etablissement) -> str:
        return "none declared (school_server: false)"

    def plan(self, etab: Etablissement) -> str:
        return f"host {etab.school_server_host}: playbooks/schools.yml, then its verify suite"

    def check(self, etab: Etablissement) -> bool:
        try:
            return read_fact(self.farm, etab.school_server_host, "school_server") is not None
        except TransportError:
            return False

    def apply(self, etab: Etablissement) -> None:
        from ..runner import run_playbook

        host = etab.school_server_host
        self.progress(f"{etab.uai}: converging {host}")
        result = run_playbook(self.farm, "playbooks/schools.yml", limit=host)
        if result.exit_code != 0:
            failures = "; ".join(f"{f['task']}: {f['message']}" for f in result.failures[:3])
            raise UserError(f"{host}: schools play failed (exit {result.exit_code}, run "
                            f"directory {result.run_dir}){': ' + failures if failures else ''}")

    def verify(self, etab: Etablissement) -> Evidence:
        from ..runner import new_run_dir

        host = etab.school_server_host
        report = new_run_dir(self.farm, f"verify-{host}") / "verify.xml"
        return suite_evidence(self.farm, self.gate, ["school_server"], [host], report)

    def disable(self, etab: Etablissement) -> str:
        return (f"{etab.school_server_host} left as it is (read-only replica, shares and "
                "backups kept); its people are deactivated centrally, which replicates")


def default_steps(farm: Farm, export: Path | None, scope: ScopeProvider,
                  progress: Callable[[str], None] = lambda _line: None,
                  counts: dict[str, dict[str, int]] | None = None) -> list[Step]:
    """The steps of onboarding, in order: accounts first (every tenant maps them)."""
    directory = DirectoryStep(farm, export, scope, progress, counts)
    return [
        directory,
        PortalStep(farm),
        EtherpadTenantStep(farm, directory.gate_impl, progress),
        AppTenantStep(farm, "moodle", "Moodle",
                      "course category «{name}» and its cohort (idnumber {uai})",
                      "test_etablissements_have_their_category_and_cohort", progress),
        AppTenantStep(farm, "nextcloud", "Nextcloud",
                      "group folder «{name} ({uai})» with its quota",
                      "test_each_etablissement_has_its_group_folder", progress,
                      needs_app="groupfolders"),
        SchoolServerStep(farm, progress),
    ]
