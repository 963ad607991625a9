#!/usr/bin/env python3
"""Does this host's slapd survive LDAP transactions (RFC 5805) while other connections search?

Why it exists: writing the AAF import's change set in transactions cuts its disk flushes from
one per record to one per transaction (a 1 % Delta's apply: 0.55-0.64 s against 1.9-4.9 s on
the lab), but Debian 12's slapd 2.5.13 dies under that load, so the importer writes record by
record (docs/architecture.md, "Not taken: LDAP transactions"). Run this again on a newer slapd
before using them.

Each round starts a throwaway slapd configured like the unit tests' and the role's
(tests/unit/aaf_conftest.py: the SDET schema, the role's modules, indexes and overlays, every
transaction flushed), then one client commits ``--transactions`` transactions of 100 person
adds and one of 10 groups of 10 of them each, while ``--searchers`` clients search the whole
tree in a loop (as CAS, the portal and the replicas do). A round fails when slapd is gone at
the end. The summary gives the rounds survived and the time of the same writes with and
without transactions on an idle server.

    .venv/bin/python benchmarks/slapd_transactions.py              # 8 rounds, 2 searchers
    .venv/bin/python benchmarks/slapd_transactions.py --searchers 0  # transactions alone

Exit code 0 when every round survived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "unit"))

from aaf_conftest import Slapd, init_slapd  # noqa: E402

BASE = "dc=fr"


def person(uid: str) -> str:
    return (f"dn: uid={uid},ou=p,{BASE}\nchangetype: add\nobjectClass: inetOrgPerson\n"
            f"uid: {uid}\ncn: {uid}\nsn: {uid}\n\n")


def group(cn: str, members: list[str]) -> str:
    return (f"dn: cn={cn},ou=g,{BASE}\nchangetype: add\nobjectClass: groupOfNames\ncn: {cn}\n"
            + "".join(f"member: uid={m},ou=p,{BASE}\n" for m in members) + "\n")


def modify(server: Slapd, text: str, transaction: bool) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", server.uri,
                           *(["-E", "txn"] if transaction else [])],
                          input=text.encode(), capture_output=True)


def started(root: Path) -> Slapd:
    init_slapd(root, durable=True)
    server = Slapd(root)
    server.start()
    top = (f"dn: {BASE}\nchangetype: add\nobjectClass: dcObject\nobjectClass: organization\n"
           f"dc: fr\no: fr\n\n")
    for ou in ("p", "g"):
        top += f"dn: ou={ou},{BASE}\nchangetype: add\nobjectClass: organizationalUnit\nou: {ou}\n\n"
    modify(server, top, transaction=False).check_returncode()
    return server


def writes(server: Slapd, rounds: int, transaction: bool, tag: str) -> str | None:
    """The transactions (or the same records one by one); the first error, or None."""
    for k in range(rounds):
        uids = [f"{tag}{k}x{i}" for i in range(100)]
        for text in ("".join(person(u) for u in uids),
                     "".join(group(f"{tag}{k}g{j}", uids[j * 10:j * 10 + 10])
                             for j in range(10))):
            done = modify(server, text, transaction)
            if done.returncode:
                return f"{tag}{k}: " + done.stderr.decode(errors="replace").strip()[-200:]
    return None


def one_round(root: Path, transactions: int, searchers: int) -> tuple[bool, str | None]:
    server = started(root)
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            subprocess.run(["ldapsearch", "-LLL", "-Q", "-Y", "EXTERNAL", "-H", server.uri,
                            "-b", BASE, "(objectClass=*)", "cn"], capture_output=True)

    loops = [threading.Thread(target=search) for _ in range(searchers)]
    for t in loops:
        t.start()
    try:
        error = writes(server, transactions, transaction=True, tag="t")
    finally:
        stop.set()
        for t in loops:
            t.join()
    alive = server.proc is not None and server.proc.poll() is None
    if alive:
        server.stop()
    return alive, error


def timed(root: Path, transactions: int, transaction: bool) -> float:
    server = started(root)
    try:
        t0 = time.monotonic()
        error = writes(server, transactions, transaction=transaction, tag="w")
        elapsed = time.monotonic() - t0
    finally:
        server.stop()
    if error:
        raise SystemExit(f"the writes failed on an idle server: {error}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--transactions", type=int, default=30,
                   help="transactions of persons (each followed by one of groups) per round")
    p.add_argument("--searchers", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slapd-txn-"))
    try:
        survived = 0
        for r in range(args.rounds):
            alive, error = one_round(work / f"round{r}", args.transactions, args.searchers)
            survived += alive
            print(f"round {r + 1}: slapd {'alive' if alive else 'GONE'}"
                  + (f" ({error})" if error else ""), flush=True)
        records = args.transactions * 110
        one_by_one = timed(work / "plain", args.transactions, transaction=False)
        batched = timed(work / "txn", args.transactions, transaction=True)
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "slapd"],
                                 capture_output=True, text=True).stdout or "unknown"
        print(f"\nslapd {version}: {survived} of {args.rounds} rounds survived "
              f"{args.transactions * 2} transactions with {args.searchers} searcher(s) beside")
        print(f"idle server, {records} records: one by one {one_by_one:.2f} s, "
              f"in {args.transactions * 2} transactions {batched:.2f} s")
        return 0 if survived == args.rounds else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
