"""A real slapd for the AAF import tests: its own cn=config (slapadd -n0) with the project's SDET
schema, an mdb database for dc=fr with the modules, indexes and overlays of roles/directory
(memberof, refint, syncprov: read from the role's variables, so that tests and the benchmark
write through the same overlays as production), an ldapi socket in a temporary directory, and
SASL EXTERNAL as the current uid for rootdn. Each test gets a fresh base DN dc=tN,dc=fr under it.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from entfarm.aaf.bulk import BulkTarget
from entfarm.aaf.importer import Directory
from entfarm.aaf.transport import LocalTransport

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "directory"
SCHEMA_DIR = ROLE / "files" / "schema"
_ROLE_VARS: dict[str, Any] = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
_ROLE_DEFAULTS: dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
# The schema and its evolutions, in the order roles/directory loads them.
SCHEMAS = [SCHEMA_DIR / f"{name}.ldif" for name in _ROLE_VARS["directory__schemas"]]
_VARIABLE = re.compile(r"^\{\{\s*(\w+)\s*(?:\|\s*string\s*)?\}\}$")
SLAPD = Path("/usr/sbin/slapd")
_counter = itertools.count(1)


def _role_values(value: Any) -> list[str]:
    """A role setting as LDAP values: "{{ directory__x }}" (optionally "| string") is looked up in
    the role's defaults; the overlay settings use no other template."""
    if isinstance(value, str):
        m = _VARIABLE.match(value)
        if m:
            value = _ROLE_DEFAULTS[m.group(1)]
        elif "{{" in value:
            raise ValueError(f"roles/directory setting {value!r}: only plain variables are read")
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def role_access(base: str, root_dn: str, replica_mode: str = "dnattr") -> list[str]:
    """roles/directory's access rules (directory__access) rendered for ``base``, root being
    ``root_dn``, in the role's order, with the replica rules of ``replica_mode`` (dnattr or
    sets: directory__replica_access once resolved)."""
    context = {"directory__base_dn": base, "directory__root_external_dn": root_dn,
               "directory__services_dn": f"ou=services,{base}",
               "directory__replicas_dn": f"ou=replicas,{base}",
               "directory__replica_clause":
                   _ROLE_VARS["directory__replica_clauses"][replica_mode]}
    return [jinja2.Template(rule).render(**context) for rule in _ROLE_VARS["directory__access"]]


def access_ldif(rules: list[str], database: str = "{1}mdb") -> str:
    """An ldapmodify change that makes ``rules`` the access rules of ``database``."""
    access = "".join(f"olcAccess: {{{i}}}{rule}\n" for i, rule in enumerate(rules))
    return (f"dn: olcDatabase={database},cn=config\nchangetype: modify\nreplace: olcAccess\n"
            f"{access}-\n\n")


def replica_filter(uai: str, base: str) -> str:
    """The consumer filter of roles/school_server's syncrepl, rendered for ``uai`` under
    ``base``."""
    template = (REPO / "roles" / "school_server" / "templates" / "etc" / "ldap" / "entfarm"
                / "syncrepl.ldif.j2").read_text(encoding="utf-8")
    found = re.search(r'filter="([^"]+)"', template)
    if not found:
        raise ValueError("no filter in the school_server syncrepl template")
    return jinja2.Template(found.group(1)).render(school_server__uai=uai,
                                                  school_server__base_dn=base)


def ssha(password: str) -> str:
    """An {SSHA} userPassword value, as slappasswd makes them."""
    salt = os.urandom(4)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _overlays() -> str:
    """The role's overlays (directory__overlays), as slapadd -n0 entries of database {1}."""
    out = []
    for o in _ROLE_VARS["directory__overlays"]:
        name = f"{o['index']}{o['name']}"
        lines = [f"dn: olcOverlay={name},olcDatabase={{1}}mdb,cn=config",
                 "objectClass: olcOverlayConfig", f"objectClass: {o['class']}",
                 f"olcOverlay: {name}"]
        lines += [f"{k}: {v}" for k, vs in o["settings"].items() for v in _role_values(vs)]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _config(root: Path, identity: str, durable: bool = False,
            schemas: list[Path] | None = None) -> str:
    # Password hash modules are not needed to store the importer's {SSHA} values.
    modules = "\n".join(f"olcModuleLoad: {m}" for m in _ROLE_DEFAULTS["directory__modules"]
                        if m not in ("argon2", "pw-sha2"))
    indexes = "\n".join(f"olcDbIndex: {i}" for i in _ROLE_DEFAULTS["directory__indexes"])
    # Unit tests skip the disk flushes; a durable server (benchmarks) flushes like the role's.
    sync = ("\n".join(f"olcDbEnvFlags: {f}" for f in _ROLE_DEFAULTS["directory__db_env_flags"])
            if durable else "olcDbNoSync: TRUE")
    ours = "\n".join(f"include: file://{path}\n" for path in schemas or SCHEMAS)
    schemas = "".join(f"include: file:///etc/ldap/schema/{name}.ldif\n\n"
                      for name in ("core", "cosine", "nis", "inetorgperson"))
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {root}/slapd.pid
olcArgsFile: {root}/slapd.args

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
{modules}

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}{ours}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcSizeLimit: unlimited

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: to * by dn.exact={identity} manage by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: dc=fr
olcRootDN: {identity}
olcDbDirectory: {root}/db
olcDbMaxSize: 1073741824
{sync}
{indexes}

{_overlays()}"""


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: its parent may not be this process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class SlapdProcess:
    """Start and stop the slapd of a root directory (conf/, db/, ldapi, slapd.pid, slapd.log).

    Stopping goes through the pid file, so that another process than the one that started it
    (the benchmark's importer child, for a bulk load) can stop and start it too.
    """

    def __init__(self, root: Path):
        self.root = root
        self.uri = "ldapi://" + urllib.parse.quote(str(root / "ldapi"), safe="")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        with (self.root / "slapd.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(SLAPD), "-d", "0", "-F", str(self.root / "conf"), "-h", self.uri],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.proc = proc
        # The socket file appears at bind(), before slapd accepts connections: under load a
        # first client can be refused. Wait until an EXTERNAL bind really answers.
        deadline = time.monotonic() + timeout
        while subprocess.run(["ldapwhoami", "-Q", "-Y", "EXTERNAL", "-H", self.uri],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log_text = (self.root / "slapd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"slapd did not start: {log_text}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        pidfile = self.root / "slapd.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = self.proc.pid if self.proc else 0
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while pid and not _gone(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"slapd (pid {pid}) did not stop")
            time.sleep(0.05)
        self.proc = None

    def runner(self) -> Callable[[str], str]:
        """entfarm.replication's Runner for this server: its commands, ``ldapi:///`` (a farm
        host's own socket) pointed at this server's socket; a failed command fails the test."""
        def run(command: str) -> str:
            done = subprocess.run(["sh", "-c", command.replace("ldapi:///", self.uri)],
                                  capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"{command}: {done.stderr}"
            return done.stdout
        return run

    def bulk_target(self) -> BulkTarget:
        """The importer's offline-load target for this slapd."""
        return BulkTarget(LocalTransport(uri=self.uri), stop=self.stop, start=self.start,
                          config_dir=str(self.root / "conf"), name="the test slapd")


def init_slapd(root: Path, max_size: int | None = None, durable: bool = False,
               schemas: list[Path] | None = None) -> None:
    """cn=config of a new server under root (slapadd -n0), and its empty database directory.

    ``durable``: flush every transaction as roles/directory configures it (olcDbEnvFlags);
    otherwise never flush (olcDbNoSync), which is all the unit tests need. ``schemas``: the
    project's schema files to load (default: all of roles/directory's, in its order)."""
    (root / "conf").mkdir(parents=True)
    (root / "db").mkdir()
    identity = (f"gidNumber={os.getgid()}+uidNumber={os.getuid()},"
                "cn=peercred,cn=external,cn=auth")
    text = _config(root, identity, durable, schemas)
    if max_size is not None:
        text = text.replace("olcDbMaxSize: 1073741824", f"olcDbMaxSize: {max_size}")
    (root / "config.ldif").write_text(text, encoding="utf-8")
    subprocess.run([str(SLAPD), "-T", "add", "-n0", "-F", str(root / "conf"),
                    "-l", str(root / "config.ldif")], check=True, capture_output=True)


class Slapd(SlapdProcess):
    def __init__(self, root: Path):
        super().__init__(root)
        self.transport = LocalTransport(uri=self.uri)

    def new_base(self) -> Directory:
        base = f"dc=t{next(_counter)},dc=fr"
        name = base.split(",")[0][3:]
        self.transport.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", self.uri], stdin=(
            f"dn: {base}\nobjectClass: dcObject\nobjectClass: organization\ndc: {name}\n"
            f"o: {name}\n\n").encode())
        return Directory(self.transport, base)


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    if not SLAPD.exists() or shutil.which("ldapmodify") is None:
        pytest.skip("not verifiable: slapd not installed (apt-get install slapd ldap-utils)")
    for path in SCHEMAS:
        if not path.exists():
            pytest.skip(f"not verifiable: {path.relative_to(REPO)} missing")
    root = tmp_path_factory.mktemp("slapd")
    init_slapd(root)
    server = Slapd(root)
    server.start()
    server.transport.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", server.uri], stdin=(
        b"dn: dc=fr\nobjectClass: dcObject\nobjectClass: organization\ndc: fr\no: fr\n\n"))
    try:
        yield server
    finally:
        server.stop()
