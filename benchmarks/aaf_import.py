"""Benchmark of ``entfarm aaf import`` (issue 3, deliverable 5). A measurement, not a test.

Generates a ~100 000-person Complet export and a 1 % Delta for a temporary copy of the lab farm
with enough onboarded collèges, starts a throwaway slapd configured like the unit tests'
(tests/unit/aaf_conftest.py: cn=config by slapadd -n0, the project's SDET schema, mdb with the
indexes and overlays of roles/directory (memberof, refint, syncprov), ldapi, SASL EXTERNAL) but
flushing its transactions to disk as roles/directory's slapd does (olcDbEnvFlags), and
measures, each importer run in a child process so that its peak RSS is its own:

  reference  slapadd -q of the same entries (the importer's own dry-run LDIF of the full import)
             into an empty database of the same configuration, on the same host
  full       first import of the Complet into an empty base DN (the importer's automatic
             rule: an offline bulk load, see entfarm/aaf/bulk.py; --online: ldapmodify only)
  (online)   the same first import with --online into a second fresh server, for comparison
  no-change  the same export again (must write nothing)
  delta      the Complet plus a 1 % Delta

The dry run writes no record cache; the full import parses every file and fills it, so the
no-change and Delta imports load the Complet's records from it, as a daily import loads the
Complet that the day before's import read. ``--no-cache`` parses every file in every import.

``--lab`` targets the lab's directory container (entfarm-lab-idp) through the farm's docker-exec
transport with the real CLI (``python -m entfarm.cli aaf import``); the reference stays a local
slapadd on this host (same machine, the container shares its kernel and disks). Its full import
takes the CLI's bulk path, which stops and starts the lab's slapd (systemctl in the container);
``--online`` keeps slapd up. It needs an empty ``ou=people``: ``--reset`` empties the lab's
directory and redeploys it (``entfarm deploy --tags directory --limit idp``), then empties
every school server's replica so that it refills from the new database (a replica kept
across such a wipe can stay wrong while it believes itself in sync: entfarm/replication.py).

The school servers' replicas are part of what a Delta costs the directory. ``--replicas``
says in which state the Delta finds them:

  sync     (default) every replica holds exactly its share of the provider, at the
           provider's contextCSN, before the no-change and the Delta (waited for, and the
           wait reported): the steady state of a farm
  refresh  as sync, then every replica emptied and restarted just before the Delta, so that
           it runs during their full refresh (a rebuilt school server, the worst case)
  stopped  as sync, then every replica's slapd stopped for the Delta and started after it:
           the Delta without replication, and the replicas' catch-up from the provider's
           session log when they reconnect
  any      no wait, the state only read and reported (the method before 2026-12-07)

After the Delta the script waits until every replica is in sync again and reports how long
that took; a replica still wrong then is refilled, so that no run leaves one behind.

    .venv/bin/python benchmarks/aaf_import.py                 # ~100 000 persons, local slapd
    .venv/bin/python benchmarks/aaf_import.py --persons 20000 # quicker
    .venv/bin/python benchmarks/aaf_import.py --lab --reset   # into the lab directory
    .venv/bin/python benchmarks/aaf_import.py --lab --reset --replicas refresh
    .venv/bin/python benchmarks/aaf_import.py --lab --warm    # its data file read first
    .venv/bin/python benchmarks/aaf_import.py --lab --no-cache  # every file parsed each time
    .venv/bin/python benchmarks/aaf_import.py --lab --reset --more-deltas 3 --drop-cache
                                        # three more Deltas, slapd restarted out of the cache first
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from entfarm.uai import check_letter  # noqa: E402

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
BASE = "dc=ac-orleans-tours,dc=fr"
# Persons per generated collège at 500 élèves: the élèves, ~850 parents (siblings share), 45 staff.
PERSONS_PER_COLLEGE = 1395
STEP_TIMEOUT = 1800
TARGETS = {"full": 120.0, "no-change": 30.0, "delta": 10.0}
MAX_RATIO = 4.0
MAX_RSS_MIB = 1024.0


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# -- inventory and exports ------------------------------------------------------------------------


def make_inventory(target: Path, persons: int, lab_text: str) -> int:
    """A copy of the lab farm with extra onboarded collèges; returns the number of collèges."""
    colleges = max(4, math.ceil(persons / PERSONS_PER_COLLEGE))
    existing = set(re.findall(r"uai: ([0-9]{7}[A-Z])", lab_text))
    extra: list[str] = []
    n = 0
    while len(existing) + len(extra) < colleges:
        dep = ("036", "045")[n % 2]
        stem = f"{dep}{7000 + n:04d}"
        n += 1
        uai = stem + check_letter(stem)
        if uai in existing:
            continue
        extra.append(
            f"  - uai: {uai}\n    name: Collège de banc d'essai {n}\n    type: college\n"
            f"    commune: Banc\n    departement: \"{dep}\"\n    wave: \"{1 + n % 2}\"\n"
            "    school_server: false\n")
    text = lab_text.replace("\nhosts:\n", "\n" + "".join(extra) + "\nhosts:\n", 1) \
        if extra else lab_text
    if extra and "".join(extra) not in text:
        raise SystemExit("cannot place the extra établissements in farm.yml")
    target.mkdir(parents=True, exist_ok=True)
    (target / "farm.yml").write_text(text, encoding="utf-8")
    for sub in ("logos", "news"):
        src = REPO / "inventories" / "lab" / sub
        if src.is_dir():
            shutil.copytree(src, target / sub, dirs_exist_ok=True)
    return len(existing) + len(extra)


def make_exports(inventory: Path, work: Path) -> tuple[Path, list[Path], dict[str, Any]]:
    """The Complet directory, the Delta's files (added to it before the Delta import, as an
    académie's export directory receives the next day's files) and their record counts."""
    from entfarm.aaf.generate import generate, generate_delta
    from entfarm.model import load_farm

    farm = load_farm(inventory)
    complet = work / "complet"
    etabs = [(e.uai, e.name, e.departement) for e in farm.spec.etablissements]
    t0 = time.monotonic()
    full = generate(etabs, complet, date="20250901", seed=1, prefix=farm.spec.academie.code)
    delta_only = work / "delta-only"
    d = generate_delta(complet, delta_only, date="20250902", seed=2, share=0.01,
                       prefix=farm.spec.academie.code)
    info = {"complet_records": full.counts, "delta_records": d.counts,
            "generate_s": round(time.monotonic() - t0, 1)}
    return complet, d.files, info


# -- slapd ----------------------------------------------------------------------------------------


def init_config(root: Path) -> None:
    """The unit tests' configuration (aaf_conftest) but its map size, and flushing each
    transaction to disk as roles/directory's slapd does (the unit tests do not flush)."""
    from aaf_conftest import init_slapd

    init_slapd(root, max_size=8589934592, durable=True)


class Server:
    def __init__(self, root: Path):
        from aaf_conftest import SlapdProcess

        self.root = root
        init_config(root)
        # Started and stopped through its pid file: a bulk load in the importer's child process
        # stops and starts it too (aaf_conftest.SlapdProcess, as in the unit tests).
        self.process = SlapdProcess(root)
        self.uri = self.process.uri
        self.process.start()
        self.ldapadd(b"dn: dc=fr\nobjectClass: dcObject\nobjectClass: organization\ndc: fr\n"
                     b"o: fr\n\n" + _base_entry().encode())

    def ldapadd(self, data: bytes) -> None:
        subprocess.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", self.uri], input=data,
                       check=True, capture_output=True)

    def count_people(self) -> int:
        out = subprocess.run(
            ["ldapsearch", "-LLL", "-Q", "-Y", "EXTERNAL", "-H", self.uri, "-z", "0",
             "-b", f"ou=people,{BASE}", "-s", "one", "(ENTPersonJointure=*)", "1.1"],
            check=True, capture_output=True).stdout
        return out.count(b"\ndn: ") + out.startswith(b"dn: ")

    def stop(self) -> None:
        self.process.stop()


def _base_entry() -> str:
    return ("dn: dc=ac-orleans-tours,dc=fr\nobjectClass: dcObject\nobjectClass: organization\n"
            "dc: ac-orleans-tours\no: ac-orleans-tours\n\n")


# -- the lab's directory and its replicas ---------------------------------------------------------

SYNC_TIMEOUT = 600.0
EMPTY = ("systemctl stop slapd && rm -f /var/lib/ldap/data.mdb /var/lib/ldap/lock.mdb && "
         "systemctl start slapd")


class LabDirectory:
    """The lab's directory host and its school servers' replicas, reached as the farm reaches
    them (entfarm.aaf.transport.for_host), compared by entfarm.replication."""

    def __init__(self) -> None:
        from entfarm.aaf.transport import for_farm, for_host
        from entfarm.model import SCHOOL_SERVER_GROUP, load_farm

        self.farm = load_farm(REPO / "inventories" / "lab")
        self.transport = for_farm(self.farm)
        self.provider = self._runner(self.transport)
        self.container = self.farm.container_name(self.farm.spec.services["directory"].hosts[0])
        self.replicas = {h.name: self._runner(for_host(self.farm, h.name))
                         for h in self.farm.hosts() if SCHOOL_SERVER_GROUP in h.services}

    @staticmethod
    def _runner(transport: Any) -> Any:
        def run(command: str) -> str:
            return bytes(transport.run(["sh", "-c", command])).decode("utf-8", "replace")
        return run

    def reset(self) -> None:
        """Empty the directory, redeploy it, and empty every replica so that it refills."""
        _say(f"reset: emptying {self.container}'s database and redeploying it")
        self.provider(EMPTY)
        subprocess.run([sys.executable, "-m", "entfarm.cli", "deploy", "-i",
                        str(REPO / "inventories" / "lab"), "--tags", "directory", "--limit",
                        self.farm.spec.services["directory"].hosts[0]],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL, timeout=STEP_TIMEOUT)
        self.empty_replicas()
        self.wait("after the reset", timeout=120)

    def run_on_replicas(self, command: str, what: str) -> None:
        for name, run in self.replicas.items():
            _say(f"replica {name}: {what}")
            run(command)

    def drop_cache(self) -> None:
        """slapd stopped, its database file dropped from the page cache by the bulk load's own
        settle step, slapd started."""
        from entfarm.aaf import bulk

        _say(f"{self.container}: slapd stopped, data.mdb dropped from the page cache, started")
        target = bulk.for_host(self.transport)
        target.stop()
        bulk._settle(target, "/var/lib/ldap")
        target.start()
        self.wait("after the restart")

    def slapd_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the slapd of each lab container (directory and replicas),
        read from /proc on this host (the containers share its kernel)."""
        used = {}
        for host in [self.farm.spec.services["directory"].hosts[0], *self.replicas]:
            name = self.farm.container_name(host)
            top = subprocess.run(["docker", "top", name, "-o", "pid,comm"], capture_output=True,
                                 text=True, check=True).stdout.splitlines()[1:]
            used[host] = sum(cpu_seconds(int(line.split()[0])) for line in top
                             if line.split()[1:2] == ["slapd"])
        return used

    def empty_replicas(self) -> None:
        self.run_on_replicas(EMPTY, "emptied, slapd restarted")

    def states(self) -> list[dict[str, Any]]:
        from entfarm.replication import replica_state

        return [self._row(name, replica_state(self.provider, run), None)
                for name, run in self.replicas.items()]

    def wait(self, when: str, timeout: float = SYNC_TIMEOUT, strict: bool = True
             ) -> list[dict[str, Any]]:
        """Wait until every replica is in sync (seconds from the call); ``strict``: SystemExit
        naming the ones that are not."""
        from entfarm.replication import wait_in_sync

        rows, late = [], []
        start = time.monotonic()
        for name, run in self.replicas.items():
            left = max(1.0, timeout - (time.monotonic() - start))
            state, _ = wait_in_sync(self.provider, run, timeout=left)
            rows.append(self._row(name, state, time.monotonic() - start))
            if not state.in_sync:
                late.append(f"{name}: {state.describe()}")
        _say(f"replicas {when}: " + ", ".join(
            f"{r['host']} {'in sync' if r['in_sync'] else 'NOT in sync'} ({r['held']} entries, "
            f"{r['seconds']:.1f} s)" for r in rows))
        if late and strict:
            raise SystemExit(f"replicas not in sync {when} after {timeout:.0f} s:\n  "
                             + "\n  ".join(late))
        return rows

    def repair(self) -> list[str]:
        """Refill every replica that is not in sync within a minute; the names refilled."""
        from entfarm.replication import wait_in_sync

        refilled = []
        for name, run in self.replicas.items():
            state, _ = wait_in_sync(self.provider, run, timeout=60)
            if not state.in_sync:
                _say(f"replica {name} left wrong ({state.describe()}): refilling it")
                run(EMPTY)
                refilled.append(name)
        if refilled:
            self.wait("after refilling", timeout=SYNC_TIMEOUT)
        return refilled

    @staticmethod
    def _row(name: str, state: Any, seconds: float | None) -> dict[str, Any]:
        return {"host": name, "in_sync": state.in_sync, "same_csn": state.same_csn,
                "held": state.held, "expected": state.expected,
                "missing": state.missing_count, "extra": state.extra_count,
                "seconds": None if seconds is None else round(seconds, 1)}


# -- measured steps -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cli_summary(out: str) -> dict[str, Any]:
    """The change count and step timings of the CLI's summary line ("N change(s) applied;
    read 1.0 s, …")."""
    said = re.search(r"(\d+) change\(s\) (?:applied|computed); (.*)", out)
    if not said:
        return {}
    how = re.search(r"persons' state ([\w ]+?)\s*$", said.group(2))
    return {"changes": int(said.group(1)),
            "timings": {k: float(v) for k, v in re.findall(r"([\w-]+) ([\d.]+) s",
                                                            said.group(2))},
            **({"people_state": how.group(1)} if how else {})}


def run_child(argv: list[str], env: dict[str, str] | None = None
              ) -> tuple[float, float, str, float]:
    """Wall seconds, peak RSS (MiB) of the child alone, stdout, CPU seconds (the importer and
    the client tools it ran; not slapd's)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        deadline = t0 + STEP_TIMEOUT
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"timed out after {STEP_TIMEOUT} s: {argv}")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024, stdout, usage.ru_utime + usage.ru_stime


def child_main(args: argparse.Namespace) -> None:
    """The importer alone, as the CLI runs it, with a local transport to the benchmark's slapd."""
    from aaf_conftest import SlapdProcess

    from entfarm.aaf.importer import Directory, run_import
    from entfarm.aaf.transport import LocalTransport
    from entfarm.model import load_farm

    farm = load_farm(args.inventory)
    directory = Directory(LocalTransport(uri=args.uri), farm.spec.academie.base_dn)
    # As the CLI gives the farm's directory host: a target the importer may take offline for a
    # bulk load (chosen by the importer's own rule; --online forces ldapmodify).
    target = SlapdProcess(Path(args.root)).bulk_target() if args.root else None
    result = run_import(Path(args.export), farm, directory, dry_run=bool(args.ldif_out),
                        now=dt.datetime(2025, 9, 3, 6, 0, tzinfo=dt.UTC),
                        bulk=False if args.online else None, bulk_target=target,
                        use_cache=not args.no_cache,
                        progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    if args.ldif_out:
        Path(args.ldif_out).write_text(result.changes.ldif, encoding="utf-8")
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    print(json.dumps({"counts": dict(result.changes.counts), "changes": result.changes.changes,
                      "timings": {k: round(v, 2) for k, v in result.timings.items()},
                      "people_state": result.people_state,
                      # The importer's Python process alone (rss_mib: with the tools it ran).
                      "importer_rss_mib": round(int(hwm.group(1)) / 1024, 1) if hwm else None}))


def importer_argv(args: argparse.Namespace, export: Path, inventory: Path, uri: str,
                  ldif_out: Path | None = None, root: Path | None = None,
                  online: bool = False) -> list[str]:
    if args.lab and ldif_out is None:
        return [sys.executable, "-m", "entfarm.cli", "aaf", "import", str(export),
                "-i", str(inventory)] + (["--online"] if args.online else []) + (
                    ["--no-cache"] if args.no_cache else [])
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--export", str(export),
            "--inventory", str(inventory), "--uri", uri]
    if root is not None:
        argv += ["--root", str(root)]
    if args.online or online:
        argv.append("--online")
    if args.no_cache:
        argv.append("--no-cache")
    return argv + (["--ldif-out", str(ldif_out)] if ldif_out else [])


def warm(args: argparse.Namespace, server: Server | None) -> float:
    """Read the directory's data file once, so that its pages are in the page cache (seconds,
    not counted in the step). These VMs run a DAMON ``pageout`` scheme (/sys/kernel/mm/damon):
    pages not touched for about a minute are reclaimed, and an import then reads back the
    index pages it updates. Caveat (docs/performance.md): on this kernel, reading the file
    sequentially also made slapd's later writes about twice as slow on the local test slapd,
    so a --warm figure is not a clean "database in memory" one."""
    if args.lab:
        cmd = ["docker", "exec", "entfarm-lab-idp", "sh", "-c",
               "cat /var/lib/ldap/data.mdb > /dev/null"]
    elif server is not None:
        cmd = ["sh", "-c", f"cat {server.root / 'db' / 'data.mdb'} > /dev/null"]
    else:
        return 0.0
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=STEP_TIMEOUT)
    return time.monotonic() - t0


def reference_slapadd(work: Path, ldif_path: Path) -> tuple[float, int]:
    """slapadd -q of the importer's entries into an empty DB of the same configuration.

    The LDIF is rewritten line by line: a child's peak RSS (wait4) starts from its parent's
    RSS at fork, so this process must not hold the whole LDIF when the importer runs next."""
    root = work / "slapadd"
    init_config(root)
    path = root / "entries.ldif"
    records = 0
    with ldif_path.open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as out:
        out.write("dn: dc=fr\nobjectClass: dcObject\nobjectClass: organization\ndc: fr\n"
                  "o: fr\n\n" + _base_entry())
        for line in src:
            if line == "changetype: add\n":
                continue
            records += line.startswith("dn:")
            out.write(line)
    t0 = time.monotonic()
    subprocess.run([str(SLAPADD), "-q", "-F", str(root / "conf"), "-b", "dc=fr", "-l", str(path)],
                   check=True, capture_output=True, timeout=STEP_TIMEOUT)
    return time.monotonic() - t0, records + 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--persons", type=int, default=100_000)
    p.add_argument("--lab", action="store_true", help="import into the lab directory container")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default: aaf_import.json in the scratch directory)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    p.add_argument("--inventory", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--ldif-out", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--online", action="store_true",
                   help="import with ldapmodify only (no offline bulk load of the first import)")
    p.add_argument("--no-cache", action="store_true",
                   help="every import parses every export file (no record cache: see "
                        "entfarm.aaf.export.RecordCache)")
    p.add_argument("--reset", action="store_true",
                   help="--lab: empty the lab's directory, redeploy it and refill the school "
                        "servers' replicas first")
    p.add_argument("--replicas", choices=("sync", "refresh", "stopped", "any"), default="sync",
                   help="--lab: the replicas' state when the Delta starts (see above)")
    p.add_argument("--more-deltas", type=int, default=0,
                   help="--lab: after the Delta, this many more 1 %% Deltas, each on top of the "
                        "last, with the CPU each slapd used during each")
    p.add_argument("--drop-cache", action="store_true",
                   help="--lab, with --more-deltas: restart the directory's slapd with its "
                        "database file dropped from the page cache before them")
    p.add_argument("--warm", action="store_true",
                   help="read the directory's data file into the page cache before the "
                        "no-change and Delta steps (see warm() and its caveat)")
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    if not SLAPD.exists() or shutil.which("ldapmodify") is None:
        raise SystemExit("not run: slapd / ldap-utils not installed")
    load_at_start = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="entfarm-aaf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lab_text = (REPO / "inventories" / "lab" / "farm.yml").read_text(encoding="utf-8")
    inventory = work / "inventory"
    colleges = make_inventory(inventory, args.persons, lab_text)
    _say(f"generating exports for {colleges} collèges in {work}")
    complet, delta_files, info = make_exports(inventory, work)
    _say(f"exports: {info}")

    server: Server | None = None
    lab_dir: LabDirectory | None = None
    if args.lab:
        lab_dir = LabDirectory()
        container = lab_dir.container
        if args.reset:
            lab_dir.reset()
        probe = subprocess.run(["docker", "exec", container, "ldapsearch", "-LLL", "-Q", "-Y",
                                "EXTERNAL", "-H", "ldapi:///", "-s", "base", "-b", BASE, "1.1"],
                               capture_output=True, check=False)
        if probe.returncode != 0:
            raise SystemExit(f"not run: the lab directory ({container}) has no {BASE} "
                             f"reachable over ldapi: {probe.stderr.decode()[-300:]}")
        held = subprocess.run(["docker", "exec", container, "ldapsearch", "-LLL", "-Q", "-Y",
                               "EXTERNAL", "-H", "ldapi:///", "-s", "one", "-b",
                               f"ou=people,{BASE}", "1.1"], capture_output=True, check=False)
        if held.stdout.count(b"dn: "):
            raise SystemExit(f"not run: the lab directory already holds "
                             f"{held.stdout.count(b'dn: ')} person(s); the benchmark measures a "
                             "first import into an empty people branch (recreate the lab "
                             "directory first, e.g. after the lab tests)")
        uri = "ldapi:///"
        scratch = Server(work / "dry")  # dry-run LDIF of a full import comes from an empty base
        dry_uri = scratch.uri
    else:
        server = Server(work / "server")
        uri = dry_uri = server.uri
        scratch = None
    rows: dict[str, dict[str, Any]] = {}
    try:
        _say("dry run (LDIF of the full import, the reference's input)")
        ldif_path = work / "full.ldif"
        wall, rss, out, cpu = run_child(
            importer_argv(args, complet, inventory, dry_uri, ldif_path))
        rows["dry-run"] = {"seconds": wall, "cpu_s": cpu, "rss_mib": rss, **json.loads(out)}
        _say("reference: slapadd -q")
        ref, entries = reference_slapadd(work, ldif_path)
        rows["slapadd"] = {"seconds": ref, "entries": entries}
        steps = ["full", "no-change", "delta"]
        if server and not args.online:
            # Comparison in the same run: the same first import with ldapmodify only, into a
            # second fresh server (stopped right after).
            steps.insert(1, "full-online")
        for name in steps:
            if name == "delta":
                for f in delta_files:
                    shutil.copy(f, complet / f.name)
            _say(f"import: {name}")
            if name == "full-online":
                other = Server(work / "online")
                try:
                    wall, rss, out, cpu = run_child(importer_argv(
                        args, complet, inventory, other.uri, online=True))
                finally:
                    other.stop()
                rows[name] = {"seconds": wall, "cpu_s": cpu, "rss_mib": rss, **json.loads(out)}
                continue
            replicas: dict[str, Any] = {}
            if lab_dir and name != "full":
                replicas["before"] = lab_dir.states() if args.replicas == "any" else \
                    lab_dir.wait(f"before the {name}")
                if name == "delta" and args.replicas == "refresh":
                    lab_dir.empty_replicas()
                if name == "delta" and args.replicas == "stopped":
                    lab_dir.run_on_replicas("systemctl stop slapd", "slapd stopped")
            warmed = warm(args, server) if args.warm and name != "full" else None
            wall, rss, out, cpu = run_child(importer_argv(
                args, complet, inventory, uri, root=server.root if server else None))
            row: dict[str, Any] = {"seconds": wall, "cpu_s": cpu, "rss_mib": rss}
            if lab_dir and name == "delta":
                if args.replicas == "stopped":
                    lab_dir.run_on_replicas("systemctl start slapd", "slapd started")
                # How long the Delta takes to reach every school server (from its end; with
                # --replicas stopped, from their restart).
                replicas["after"] = lab_dir.wait("after the delta", strict=False)
                replicas["refilled"] = lab_dir.repair()
            if replicas:
                row["replicas"] = replicas
            if warmed is not None:
                row["warm_s"] = round(warmed, 2)
            if not args.lab:
                row.update(json.loads(out))
            else:
                row.update(_cli_summary(out))
            rows[name] = row
        if lab_dir and args.more_deltas:
            from entfarm.aaf.generate import generate_delta
            from entfarm.model import load_farm

            code = load_farm(inventory).spec.academie.code
            if args.drop_cache:
                lab_dir.drop_cache()
            for k in range(args.more_deltas):
                name = f"delta {k + 2}"
                more = generate_delta(complet, work / f"delta-{k + 2}", seed=100 + k,
                                      share=0.01, prefix=code)
                for f in more.files:
                    shutil.copy(f, complet / f.name)
                lab_dir.wait(f"before the {name}")
                _say(f"import: {name}")
                cpu_before = lab_dir.slapd_cpu()
                wall, rss, out, cpu = run_child(importer_argv(args, complet, inventory, uri))
                cpu_after = lab_dir.slapd_cpu()
                rows[name] = {"seconds": wall, "cpu_s": cpu, "rss_mib": rss,
                              "slapd_cpu_s": {h: round(cpu_after[h] - cpu_before.get(h, 0), 2)
                                              for h in cpu_after},
                              **_cli_summary(out)}
        people = server.count_people() if server else None
    finally:
        if server:
            server.stop()
        if scratch:
            scratch.stop()

    persons = rows["dry-run"]["counts"].get("people add", 0)
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "load_at_start": load_at_start,
                 "load_at_end": os.getloadavg(),
                 "python": sys.version.split()[0]},
        "target": "lab container entfarm-lab-idp" if args.lab else "local throwaway slapd",
        "colleges": colleges, "persons": persons, "people_in_directory": people,
        "warm": args.warm, "record_cache": not args.no_cache,
        "replicas": args.replicas if args.lab else None,
        "exports": info, "rows": rows,
    }
    print(f"\nAAF import, {persons} persons, {colleges} collèges, {results['target']}, "
          f"{os.cpu_count()} CPUs, record cache {'off' if args.no_cache else 'on'}")
    print(f"{'step':<10} {'seconds':>8} {'x slapadd':>10} {'CPU s':>6} {'peak RSS MiB':>13} "
          f"{'changes':>8}  target")
    print(f"{'slapadd':<10} {ref:8.1f} {1.0:10.2f} {'':>6} {'':>13} {entries:8d}  reference")
    for name in ("full", "no-change", "delta"):
        r = rows[name]
        ok = r["seconds"] <= TARGETS[name] and r["rss_mib"] <= MAX_RSS_MIB
        if name == "full":
            ok = ok and r["seconds"] <= MAX_RATIO * ref
        limit = f"<= {TARGETS[name]:.0f} s" + (f", <= {MAX_RATIO:.0f}x" if name == "full" else "")
        print(f"{name:<10} {r['seconds']:8.1f} {r['seconds'] / ref:10.2f} {r['cpu_s']:6.1f} "
              f"{r['rss_mib']:13.0f} "
              f"{r.get('changes', '?'):>8}  {limit}, <= 1 GiB: {'MET' if ok else 'NOT MET'}")
    for name in ("no-change", "delta"):
        seen = rows[name].get("replicas")
        if not seen:
            continue
        before = ", ".join(f"{r['host']} {r['held']}/{r['expected']}"
                           f"{'' if r['in_sync'] else ' NOT in sync'}" for r in seen["before"])
        line = f"  replicas before the {name} ({args.replicas}): {before}"
        if name == "delta" and args.replicas == "refresh":
            line += "; then emptied, refreshing during the Delta"
        if name == "delta" and args.replicas == "stopped":
            line += "; then stopped for the Delta and started after it"
        if "after" in seen:
            line += "; in sync again " + ", ".join(
                f"{r['host']} {r['seconds']:.1f} s" if r["in_sync"] else
                f"{r['host']} NOT (refilled)" for r in seen["after"]) + " after it"
        print(line)
    for name, r in rows.items():
        if name.startswith("delta "):
            shown = ", ".join(f"{k} {v:.1f} s" for k, v in r.get("timings", {}).items())
            slapd = ", ".join(f"{h} {v:.1f} s" for h, v in r["slapd_cpu_s"].items())
            print(f"{name:<10} {r['seconds']:8.1f} {r['seconds'] / ref:10.2f} {r['cpu_s']:6.1f} "
                  f"{r['rss_mib']:13.0f} {r.get('changes', '?'):>8}  {shown}; slapd CPU: {slapd}")
    print("persons' state read: " + ", ".join(
        f"{name} {r['people_state']}" for name, r in rows.items() if "people_state" in r))
    if "full-online" in rows:
        r = rows["full-online"]
        print(f"{'(online)':<10} {r['seconds']:8.1f} {r['seconds'] / ref:10.2f} "
              f"{r['cpu_s']:6.1f} {r['rss_mib']:13.0f} {r.get('changes', '?'):>8}  "
              "comparison: full import with --online (ldapmodify only)")
    args.json = args.json or work / "aaf_import.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
