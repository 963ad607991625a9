#!/usr/bin/env python3
"""What each school replica costs the directory when a Delta is written. A measurement, not a
test.

Why it exists: on the lab, a 1 % Delta's apply took about 4 s more with the two school
replicas connected than with them stopped (docs/performance.md, runs 125-131). A farm has one
replica per school server, 50 to 120 of them: if that cost is the provider's and grows with the
number of consumers, a daily Delta would take minutes. On the lab, though, the replicas run on
the same two cores as the directory, so their own work is counted in the provider's wall time.

This script separates the two. It builds the directory of ``benchmarks/aaf_import.py`` (the
same generated ~100 000-person Complet and 1 % Delta, the same throwaway slapd with the role's
schema, modules, indexes and overlays, flushing like the role's) and adds what the lab has:
roles/directory's access rules and one replication account per school server. It keeps a copy
of that database. Then, for each count of consumers asked for (default 0, 2, 8, 16, 0):

  1. the provider's database is put back from the copy and slapd started;
  2. that many consumers start empty: local slapd servers, each with roles/school_server's
     syncrepl filter for one collège, bound as that collège's replication account (the same
     collèges each time: the 2 are among the 8, the 8 among the 16), and fill themselves; the
     time until every one holds exactly its share (entfarm.replication) is the "refresh";
  3. the Delta is imported (the importer in a child process, as in aaf_import.py), timed, with
     the CPU seconds the provider's slapd and the consumers' used meanwhile;
  4. the time until every consumer is in sync again.

The provider's CPU seconds during the Delta are the figure that scales to production, where
each school server is its own machine; the wall time here also holds the consumers' work on the
same cores. The count 0 comes first and last, so that any drift in the run shows.

``--access`` chooses the replica rules (roles/directory's ``directory__replica_access``):
``dnattr`` (what the role takes once every entry carries ENTReplicaAccount, which the importer
writes) or ``sets`` (what it keeps on a directory imported before that); both read the same
entries.

    .venv/bin/python benchmarks/syncprov_consumers.py               # --access dnattr
    .venv/bin/python benchmarks/syncprov_consumers.py --access sets
    .venv/bin/python benchmarks/syncprov_consumers.py --persons 20000 --consumers 0,4,0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
sys.path.insert(0, str(REPO / "benchmarks"))

import aaf_import as bench  # noqa: E402
from aaf_conftest import (  # noqa: E402
    SlapdProcess,
    access_ldif,
    init_slapd,
    replica_filter,
    role_access,
    ssha,
)

from entfarm.model import replica_account_dn, school_server_name  # noqa: E402
from entfarm.replication import wait_in_sync  # noqa: E402

REPLICA_PASSWORD = "secret-of-the-benchmark"
SYNC_TIMEOUT = 900.0
ROOT_DN = (f"gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,"
           "cn=auth")


def pid_of(process: SlapdProcess) -> int:
    return int((process.root / "slapd.pid").read_text().split()[0])


def ldapmodify(uri: str, text: str) -> None:
    done = subprocess.run(["ldapmodify", "-a", "-Q", "-Y", "EXTERNAL", "-H", uri],
                          input=text.encode(), capture_output=True, check=False)
    if done.returncode:
        raise SystemExit(f"ldapmodify on {uri} failed: {done.stderr.decode()[-500:]}")


def replication_accounts(uais: list[str]) -> str:
    """ou=services, ou=replicas and one account per school server, as roles/directory makes
    them (seeAlso: its établissement's structure)."""
    base = bench.BASE
    out = [f"dn: ou={ou},{base}\nchangetype: add\nobjectClass: organizationalUnit\nou: {ou}\n"
           for ou in ("services", "replicas")]
    out += [f"dn: {replica_account_dn(u, base)}\nchangetype: add\n"
            f"objectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: {school_server_name(u)}\nuserPassword: {ssha(REPLICA_PASSWORD)}\n"
            f"seeAlso: ENTStructureUAI={u},ou=structures,{base}\n" for u in uais]
    return "\n".join(out) + "\n"


class Consumer:
    """A school server's replica: an empty local slapd with the school server's syncrepl."""

    def __init__(self, root: Path, provider_uri: str, uai: str, rid: int):
        init_slapd(root)
        self.uai = uai
        self.process = SlapdProcess(root)
        self.process.start()
        dn = replica_account_dn(uai, bench.BASE)
        ldapmodify(self.process.uri, (
            "dn: olcDatabase={1}mdb,cn=config\nchangetype: modify\nadd: olcSyncrepl\n"
            f"olcSyncrepl: rid={rid:03d} provider={provider_uri} bindmethod=simple "
            f'binddn="{dn}" credentials="{REPLICA_PASSWORD}" searchbase="{bench.BASE}" '
            f'scope=sub type=refreshAndPersist retry="1 +" attrs="*" schemachecking=off '
            f'filter="{replica_filter(uai, bench.BASE)}"\n\n'))

    def cpu(self) -> float:
        return bench.cpu_seconds(pid_of(self.process))

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.process.root, ignore_errors=True)


def wait_all(provider: SlapdProcess, consumers: list[Consumer], when: str) -> float:
    """Seconds until every consumer is in sync; SystemExit naming those that are not."""
    start = time.monotonic()
    late = []
    for c in consumers:
        left = max(1.0, SYNC_TIMEOUT - (time.monotonic() - start))
        state, _ = wait_in_sync(provider.runner(), c.process.runner(), timeout=left,
                                interval=0.2)
        if not state.in_sync:
            late.append(f"{c.uai}: {state.describe()}")
    if late:
        raise SystemExit(f"consumers not in sync {when}:\n  " + "\n  ".join(late))
    return time.monotonic() - start


def restore(db: Path, snapshot: Path) -> None:
    shutil.rmtree(db)
    subprocess.run(["cp", "-a", "--sparse=always", str(snapshot), str(db)], check=True)


def one_round(args: argparse.Namespace, work: Path, provider: SlapdProcess, snapshot: Path,
              uais: list[str], count: int, complet: Path, inventory: Path,
              index: int) -> dict[str, Any]:
    restore(provider.root / "db", snapshot)
    provider.start()
    consumers: list[Consumer] = []
    try:
        t0 = time.monotonic()
        for k, uai in enumerate(uais[:count]):
            consumers.append(Consumer(work / f"consumer-{index}-{k}", provider.uri, uai, k + 1))
        wait_all(provider, consumers, "after their first refresh")
        refresh = time.monotonic() - t0
        bench._say(f"{count} consumer(s): in sync {refresh:.1f} s after their start")
        held = [c.process.runner()(
            f"ldapsearch -LLL -Q -Y EXTERNAL -H ldapi:/// -b {bench.BASE} 1.1").count("dn: ")
            for c in consumers]
        time.sleep(args.settle)
        before = bench.cpu_seconds(pid_of(provider)), sum(c.cpu() for c in consumers)
        wall, rss, out, _ = bench.run_child(bench.importer_argv(
            argparse.Namespace(lab=False, online=False, no_cache=False), complet, inventory,
            provider.uri, root=provider.root))
        after = bench.cpu_seconds(pid_of(provider)), sum(c.cpu() for c in consumers)
        caught_up = wait_all(provider, consumers, "after the Delta")
        child = json.loads(out)
        row = {"consumers": count, "refresh_s": round(refresh, 1),
               "held_min": min(held, default=0), "held_max": max(held, default=0),
               "delta_s": round(wall, 2), "timings": child["timings"],
               "changes": child["changes"], "importer_rss_mib": round(rss),
               "provider_cpu_s": round(after[0] - before[0], 2),
               "consumers_cpu_s": round(after[1] - before[1], 2),
               "in_sync_after_s": round(caught_up, 1)}
        bench._say(f"{count} consumer(s): {row}")
        return row
    finally:
        for c in consumers:
            c.stop()
        provider.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--persons", type=int, default=100_000)
    p.add_argument("--consumers", default="0,2,8,16,0",
                   help="comma-separated consumer counts, one round each, in this order")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds between the consumers' refresh and the Delta")
    p.add_argument("--access", choices=("dnattr", "sets"), default="dnattr",
                   help="the replica rules (directory__replica_access once resolved)")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default: syncprov_consumers.json in the scratch directory)")
    args = p.parse_args()
    try:
        counts = [int(c) for c in args.consumers.split(",")]
    except ValueError:
        raise SystemExit(f"--consumers {args.consumers!r}: give counts like 0,2,8,16,0") from None
    if not bench.SLAPD.exists() or shutil.which("ldapmodify") is None:
        raise SystemExit("not run: slapd / ldap-utils not installed")
    work = args.work or Path(tempfile.mkdtemp(prefix="entfarm-syncprov-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lab_text = (REPO / "inventories" / "lab" / "farm.yml").read_text(encoding="utf-8")
    inventory = work / "inventory"
    colleges = bench.make_inventory(inventory, args.persons, lab_text)
    from entfarm.model import load_farm

    uais = sorted(e.uai for e in load_farm(inventory).spec.etablissements)
    if max(counts) > len(uais):
        raise SystemExit(f"--consumers: at most {len(uais)} (one per collège of the export)")
    bench._say(f"generating exports for {colleges} collèges in {work}")
    complet, delta_files, info = bench.make_exports(inventory, work)

    server = bench.Server(work / "provider")
    provider = server.process
    try:
        bench._say("full import (bulk load), then the role's access rules and replica accounts")
        bench.run_child(bench.importer_argv(
            argparse.Namespace(lab=False, online=False, no_cache=False), complet, inventory,
            server.uri, root=provider.root))
        ldapmodify(server.uri, access_ldif(role_access(bench.BASE, ROOT_DN, args.access)))
        ldapmodify(server.uri, replication_accounts(uais[:max(counts)]))
    finally:
        server.stop()
    snapshot = work / "provider-db"
    subprocess.run(["cp", "-a", "--sparse=always", str(provider.root / "db"), str(snapshot)],
                   check=True)
    for f in delta_files:
        shutil.copy(f, complet / f.name)
    load_at_start = os.getloadavg()
    rows = [one_round(args, work, provider, snapshot, uais, count, complet, inventory, i)
            for i, count in enumerate(counts)]
    results = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "host": {"cpus": os.cpu_count(), "load_at_start": load_at_start,
                        "load_at_end": os.getloadavg()},
               "access": args.access, "colleges": colleges, "exports": info, "rows": rows}
    print(f"\nsyncprov consumers, access rules: {args.access}, {colleges} collèges, 1 % Delta "
          f"({rows[0]['changes']} changes), {os.cpu_count()} CPUs")
    print(f"{'consumers':>9} {'refresh s':>9} {'entries':>11} {'Delta s':>8} {'apply s':>8} "
          f"{'slapd CPU s':>11} {'consumers CPU s':>15} {'in sync after s':>15}")
    for r in rows:
        held = f"{r['held_min']}-{r['held_max']}" if r["consumers"] else "-"
        print(f"{r['consumers']:>9} {r['refresh_s']:>9.1f} {held:>11} {r['delta_s']:>8.2f} "
              f"{r['timings'].get('apply', 0):>8.2f} {r['provider_cpu_s']:>11.2f} "
              f"{r['consumers_cpu_s']:>15.2f} {r['in_sync_after_s']:>15.1f}")
    args.json = args.json or work / "syncprov_consumers.json"
    args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
