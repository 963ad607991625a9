"""Benchmark of the portal under load (issue 4, deliverable 5). A measurement, not a test.

This process is the load: threads on the controller sending HTTPS to the lab's edge on
127.0.0.1:8443 with the public names as SNI and Host (the lab tests' loopback ``Browser``,
imported from tests/lab/identity_helpers.py, one connection and TLS handshake per request).
Nothing else is reached: only loopback, and the lab's containers through ``docker exec``.

For each portal layout (both nodes, then portal-2's unit stopped), at ``--users`` concurrent
users:

  healthz     GET /healthz of the portal through the edge: the proxy + TLS floor (reference)
  anonymous   GET / without a session: the portal app's cheapest page, a 302 (reference)
  cas-page    GET the CAS login page alone, anonymous (reference)
  logins      complete CAS logins, one distinct imported account per login where possible:
                portal    GET / anonymous -> 302 to the CAS with service=<site>connexion
                cas       GET the CAS login form, POST the credentials -> 302 with a ticket
                ticket    GET /connexion?ticket=... (the portal validates it server to server)
                home      GET / -> 200 "Bonjour ..."
  home        the portal home of --users logged-in users, each asking it --home-requests times

Accounts: an AAF export generated and imported exactly as the lab tests' ``imported`` fixture
(identity_helpers) does (same seed and size, so that the import changes nothing the lab tests
rely on), every profile with a distributed activation code (élèves, parents, staff: about 250
accounts). Bounded: at most --max-requests requests and --time-limit seconds in all; portal-2 is
restarted in any case.

    .venv/bin/python benchmarks/portal_load.py                  # both layouts, 50 users
    .venv/bin/python benchmarks/portal_load.py --nodes 2 --users 20 --logins 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "lab"))

from identity_helpers import (  # noqa: E402
    Account,
    Browser,
    Cas,
    Response,
    _distributed_accounts,
    entfarm_cli,
    ldap_root_search,
    on_host,
    portal_message,
    read_fact,
)

from entfarm.model import Farm, load_farm  # noqa: E402

# The export of the lab tests' `imported` fixture (identity_helpers): importing it again is a
# no-op.
AAF_SEED = "3"
AAF_ELEVES_PER_COLLEGE = "10"
TARGET_LOGINS_PER_S = 20.0
TARGET_HOME_P95_MS = 500.0
TARGET_USERS = 50
# Browsers keep their connections open (HTTP/1.1 keep-alive); "new" opens a TCP connection and
# does a full TLS handshake for every request, a worst case kept as a reference.
KEEP_ALIVE = {"keep-alive": True, "new": False}
STOPPED_NODE = "portal-2"
CONNECTIONS = ["keep-alive"]  # set from --connections


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# -- bounds and measurements ---------------------------------------------------------------------


class Budget:
    """The run's bounds: a number of requests and a wall-clock deadline, shared by all threads."""

    def __init__(self, max_requests: int, seconds: float) -> None:
        self.left = max_requests
        self.deadline = time.monotonic() + seconds
        self.exhausted = ""
        self._lock = threading.Lock()

    def take(self, n: int = 1) -> bool:
        with self._lock:
            if time.monotonic() > self.deadline:
                self.exhausted = self.exhausted or "time limit"
                return False
            if self.left < n:
                self.exhausted = self.exhausted or "request limit"
                return False
            self.left -= n
            return True


@dataclass
class Phase:
    name: str
    samples: list[float] = field(default_factory=list)  # seconds, successful operations only
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0  # this process's CPU seconds during the phase (the load's own cost)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ok(self, seconds: float) -> None:
        with self._lock:
            self.samples.append(seconds)

    def fail(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        return {
            "phase": self.name, "ok": len(s), "errors": len(self.errors),
            "p50_ms": _ms(_pct(s, 50)), "p95_ms": _ms(_pct(s, 95)),
            "max_ms": _ms(s[-1] if s else None), "wall_s": round(self.wall, 2),
            "per_s": round(len(s) / self.wall, 1) if self.wall else None,
            "client_cpu_s": round(self.cpu, 1),
            "first_errors": sorted(set(self.errors))[:5],
        }


def _pct(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextmanager
def measured(phase: Phase) -> Iterator[Phase]:
    cpu, start = _cpu(), time.monotonic()
    try:
        yield phase
    finally:
        phase.wall, phase.cpu = time.monotonic() - start, _cpu() - cpu


def run_concurrently(workers: int, job: Callable[[int], None]) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(job, i) for i in range(workers)]:
            future.result()


# -- the lab -------------------------------------------------------------------------------------


def portal_unit(farm: Farm) -> str:
    """The portal's systemd unit, as the portal role records it in its fact."""
    out = on_host(farm.container_name(STOPPED_NODE), "cat /etc/ansible/facts.d/portal.fact")
    if out.returncode != 0:
        raise BenchError(f"{STOPPED_NODE}: no portal fact ({out.stderr.strip()}): is the portal "
                         "deployed?")
    return str(json.loads(out.stdout).get("unit", "entfarm-portal.service"))


def active_nodes(farm: Farm, unit: str) -> list[str]:
    """The portal hosts whose unit is active: the layout really measured."""
    hosts = farm.spec.services["portal"].hosts
    return [h for h in hosts if on_host(farm.container_name(h),
                                        f"systemctl is-active {shlex.quote(unit)}").stdout.strip()
            == "active"]


def set_unit(farm: Farm, unit: str, action: str) -> None:
    out = on_host(farm.container_name(STOPPED_NODE), f"systemctl {action} {shlex.quote(unit)}",
                  timeout=120)
    if out.returncode != 0:
        raise BenchError(f"{STOPPED_NODE}: systemctl {action} {unit}: {out.stderr.strip()}")
    want = "active" if action != "stop" else "inactive"
    for _ in range(60):
        state = on_host(farm.container_name(STOPPED_NODE),
                        f"systemctl is-active {shlex.quote(unit)}").stdout
        if state.strip() == want:
            return
        time.sleep(1)
    raise BenchError(f"{STOPPED_NODE}: {unit} not {want} 60 s after systemctl {action}")


def import_accounts(farm: Farm) -> list[Account]:
    """Generate and import the lab tests' export; every active account with a code."""
    with tempfile.TemporaryDirectory(prefix="portal-load-aaf-") as out:
        generated = entfarm_cli("aaf", "generate", out, "-i", str(farm.inventory_dir),
                                "--seed", AAF_SEED, "--eleves-per-college", AAF_ELEVES_PER_COLLEGE)
        if generated.returncode != 0:
            raise BenchError("aaf generate failed:\n" + generated.stdout + generated.stderr)
        imported = entfarm_cli("aaf", "import", out, "-i", str(farm.inventory_dir))
        if imported.returncode != 0:
            raise BenchError("aaf import failed:\n" + imported.stdout + imported.stderr)
    uais = [e.uai for e in farm.spec.etablissements if e.wave]
    accounts = _distributed_accounts(farm, uais)
    active = set(ldap_root_search(f"ou=people,{farm.spec.academie.base_dn}",
                                  "(ENTPersonEtat=ACTIF)", "uid").get("uid", []))
    return sorted((a for a in accounts.values() if a.login in active), key=lambda a: a.login)


# -- what one user does --------------------------------------------------------------------------


@dataclass
class Session:
    account: Account
    browser: Browser


def get(browser: Browser, url: str, budget: Budget) -> Response:
    if not budget.take():
        raise TimeoutError(budget.exhausted)
    return browser.request("GET", url)


def login(cas: Cas, portal: str, account: Account, budget: Budget,
          phases: dict[str, Phase]) -> Session | None:
    """One complete CAS login; each step's time in its phase, the whole in phases["login"]."""
    browser = Browser(cas.ctx, KEEP_ALIVE[CONNECTIONS[0]])
    start = t = time.monotonic()
    step = "portal"
    try:
        first = get(browser, portal, budget)
        if first.status != 302 or urlsplit(first.location).hostname != cas.host:
            raise AssertionError(f"GET / answered {first.status} {first.location[:60]}")
        service = parse_qs(urlsplit(first.location).query)["service"][0]
        phases["portal"].ok(time.monotonic() - t)
        step, t = "cas", time.monotonic()
        if not budget.take(2):
            raise TimeoutError(budget.exhausted)
        answer = cas.login(browser, service, account.login, account.code)
        if answer.status not in (302, 303) or "ticket=" not in answer.location:
            raise AssertionError(f"no ticket: {portal_message(answer)}")
        phases["cas"].ok(time.monotonic() - t)
        step, t = "ticket", time.monotonic()
        landed = get(browser, answer.location, budget)
        if landed.status not in (302, 303):
            raise AssertionError(f"ticket validation answered {landed.status}")
        phases["ticket"].ok(time.monotonic() - t)
        step, t = "home", time.monotonic()
        home = get(browser, urljoin(portal, landed.location), budget)
        if home.status != 200 or "Bonjour" not in home.body:
            raise AssertionError(f"home answered {home.status}")
        phases["home"].ok(time.monotonic() - t)
    except TimeoutError:
        return None
    except Exception as exc:  # counted and reported, the run goes on
        phases["login"].fail(f"{step}: {type(exc).__name__}: {exc}")
        return None
    phases["login"].ok(time.monotonic() - start)
    return Session(account, browser)


# -- one layout ----------------------------------------------------------------------------------


def simple_phase(name: str, url: str, expect: int, users: int, per_user: int, ctx: ssl.SSLContext,
                 budget: Budget) -> Phase:
    phase = Phase(name)

    def job(_: int) -> None:
        browser = Browser(ctx, KEEP_ALIVE[CONNECTIONS[0]])
        for _ in range(per_user):
            if not budget.take():
                return
            t = time.monotonic()
            try:
                answer = browser.request("GET", url)
            except Exception as exc:
                phase.fail(f"{type(exc).__name__}: {exc}")
                continue
            if answer.status == expect:
                phase.ok(time.monotonic() - t)
            else:
                phase.fail(f"HTTP {answer.status}")

    with measured(phase):
        run_concurrently(users, job)
    return phase


def layout(label: str, cas: Cas, portal: str, accounts: list[Account], args: argparse.Namespace,
           budget: Budget) -> list[dict[str, Any]]:
    users = args.users
    results = []
    _say(f"[{label}] reference: {users} users x {args.reference_requests} GET /healthz")
    results.append(simple_phase("healthz (reference)", portal + "healthz", 200, users,
                                args.reference_requests, cas.ctx, budget).summary())
    _say(f"[{label}] reference: {users} users x {args.reference_requests} GET / anonymous")
    results.append(simple_phase("portal / anonymous, 302 to CAS (reference)", portal, 302, users,
                                args.reference_requests, cas.ctx, budget).summary())
    _say(f"[{label}] reference: {users} users x {args.reference_requests} GET CAS login page")
    results.append(simple_phase("CAS login page (reference)", cas.login_url(portal + "connexion"),
                                200, users, args.reference_requests, cas.ctx, budget).summary())

    _say(f"[{label}] logins: {args.logins} complete CAS logins, {users} at a time, "
         f"{min(args.logins, len(accounts))} distinct accounts")
    phases = {n: Phase(n) for n in ("login", "portal", "cas", "ticket", "home")}
    queue = iter(accounts[i % len(accounts)] for i in range(args.logins))
    lock = threading.Lock()
    sessions: dict[str, Session] = {}

    def next_account() -> Account | None:
        with lock:
            return next(queue, None)

    def job(_: int) -> None:
        while (account := next_account()) is not None:
            session = login(cas, portal, account, budget, phases)
            if session is not None:
                with lock:
                    sessions.setdefault(account.login, session)

    with measured(phases["login"]):
        run_concurrently(users, job)
    for name, phase in phases.items():
        phase.wall, phase.cpu = phases["login"].wall, phases["login"].cpu
        summary = phase.summary()
        summary["phase"] = "complete CAS login" if name == "login" else f"login step: {name}"
        if name != "login":
            summary["per_s"] = None
        results.append(summary)

    logged_in = list(sessions.values())[:users]
    home = Phase(f"home, {len(logged_in)} logged-in users")
    if not logged_in:
        _say(f"[{label}] home: skipped, no user logged in")
        results.append(home.summary())
        for r in results:
            r["layout"] = label
        return results
    _say(f"[{label}] home: {len(logged_in)} logged-in users x {args.home_requests} GET /")

    def browse(i: int) -> None:
        browser = logged_in[i].browser
        for _ in range(args.home_requests):
            if not budget.take():
                return
            t = time.monotonic()
            try:
                answer = browser.request("GET", portal)
            except Exception as exc:
                home.fail(f"{type(exc).__name__}: {exc}")
                continue
            if answer.status == 200 and "Bonjour" in answer.body:
                home.ok(time.monotonic() - t)
            else:
                home.fail(f"HTTP {answer.status} {answer.location[:40]}")

    with measured(home):
        run_concurrently(len(logged_in), browse)
    results.append(home.summary())
    for r in results:
        r["layout"] = label
    return results


# -- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    release = Path("/etc/debian_version").read_text().strip() if Path(
        "/etc/debian_version").exists() else platform.platform()
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem / 2**20, 1),
            "debian": release, "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def verdicts(results: list[dict[str, Any]], users: int) -> list[str]:
    lines = []
    for label in dict.fromkeys(r["layout"] for r in results):
        rows = {r["phase"]: r for r in results if r["layout"] == label}
        logins = rows.get("complete CAS login", {})
        rate = logins.get("per_s") or 0.0
        met = rate >= TARGET_LOGINS_PER_S and not logins.get("errors")
        verdict = ("NOT MEASURED" if not logins.get("ok") and not logins.get("errors")
                   else "MET" if met else "NOT MET")
        lines.append(f"{label}: complete CAS logins {rate}/s (target >= {TARGET_LOGINS_PER_S:g}/s,"
                     f" {logins.get('errors', '?')} errors): {verdict}")
        home = next((r for p, r in rows.items() if p.startswith("home")), {})
        p95 = home.get("p95_ms")
        enough = home.get("phase", "").startswith(f"home, {users} ") and users >= TARGET_USERS
        met = p95 is not None and p95 < TARGET_HOME_P95_MS and enough and not home.get("errors")
        verdict = ("NOT MEASURED" if not enough or (not home.get("ok") and not home.get("errors"))
                   else "MET" if met else "NOT MET")
        lines.append(f"{label}: {home.get('phase')}: p95 {p95} ms (target < {TARGET_HOME_P95_MS:g}"
                     f" ms at {TARGET_USERS} users, {home.get('errors', '?')} errors): {verdict}")
    return lines


def table(results: list[dict[str, Any]]) -> str:
    head = ("| layout | phase | ok | errors | p50 ms | p95 ms | max ms | per s | wall s "
            "| client CPU s |")
    out = [head, "|" + " --- |" * 10]
    for r in results:
        out.append(f"| {r['layout']} | {r['phase']} | {r['ok']} | {r['errors']} | {r['p50_ms']} "
                   f"| {r['p95_ms']} | {r['max_ms']} | {r['per_s'] or ''} | {r['wall_s']} "
                   f"| {r['client_cpu_s']} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-i", "--inventory", type=Path, default=REPO / "inventories" / "lab")
    parser.add_argument("--nodes", default="2,1", help="layouts to measure, in this order")
    parser.add_argument("--users", type=int, default=TARGET_USERS, help="concurrent users")
    parser.add_argument("--logins", type=int, default=300, help="complete logins per layout")
    parser.add_argument("--home-requests", type=int, default=20, help="per logged-in user")
    parser.add_argument("--reference-requests", type=int, default=10, help="per user")
    parser.add_argument("--warmup", type=int, default=5, help="logins before measuring")
    parser.add_argument("--max-requests", type=int, default=20000, help="in the whole run")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds, whole run")
    parser.add_argument("--connections", choices=sorted(KEEP_ALIVE), default="keep-alive",
                        help="per simulated browser: keep-alive (as browsers do) or a new TLS "
                        "connection per request (worst case)")
    parser.add_argument("--no-import", action="store_true", help="use the accounts already there")
    parser.add_argument("--out", type=Path, default=REPO / "test-artifacts" / "portal-load")
    args = parser.parse_args()
    CONNECTIONS[0] = args.connections
    layouts = [int(n) for n in args.nodes.split(",")]
    if not set(layouts) <= {1, 2}:
        raise BenchError("--nodes takes 2, 1 or 2,1")
    farm = load_farm(args.inventory)
    ca = farm.secrets_dir / "pki" / "ca.crt"
    ctx = ssl.create_default_context(cafile=str(ca))
    cas = Cas(str(read_fact("cas")["portal_url"]), ctx)
    portal = farm.public_url(farm.public_names("portal")[0])
    health = Browser(ctx).request("GET", portal + "healthz")
    if health.status != 200:
        raise BenchError(f"{portal}healthz answered {health.status}: is the portal deployed?")
    unit = portal_unit(farm)
    info = machine()
    _say(f"machine: {info}")
    if args.no_import:
        uais = [e.uai for e in farm.spec.etablissements if e.wave]
        accounts = sorted(_distributed_accounts(farm, uais).values(), key=lambda a: a.login)
    else:
        _say("importing the lab tests' AAF export (seed 3, 10 élèves per collège)")
        accounts = import_accounts(farm)
    if len(accounts) < args.users:
        raise BenchError(f"{len(accounts)} accounts, fewer than --users {args.users}")
    _say(f"{len(accounts)} accounts with a code")
    budget = Budget(args.max_requests, args.time_limit)
    warm = {n: Phase(n) for n in ("login", "portal", "cas", "ticket", "home")}
    for account in accounts[-args.warmup:] if args.warmup else []:
        login(cas, portal, account, budget, warm)
    if args.warmup and not warm["login"].samples:
        # Hundreds of refused logins would measure nothing and feed the CAS's brute-force guard.
        raise BenchError(f"none of the {args.warmup} warm-up logins succeeded: "
                         f"{'; '.join(sorted(set(warm['login'].errors))[:3])}")
    results: list[dict[str, Any]] = []
    started = dt.datetime.now(dt.UTC)
    for nodes in layouts:
        label = f"{nodes} portal node{'s' if nodes > 1 else ''}, {args.connections}"
        if nodes == 1:
            _say(f"stopping {unit} on {STOPPED_NODE}")
            set_unit(farm, unit, "stop")
        try:
            active = active_nodes(farm, unit)
            if len(active) != nodes:
                raise BenchError(f"{label}: {unit} is active on {active or 'no host'}")
            results += layout(label, cas, portal, accounts, args, budget)
        finally:
            if nodes == 1:
                _say(f"starting {unit} on {STOPPED_NODE} again")
                set_unit(farm, unit, "start")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()}, "accounts": len(accounts),
        "warmup_errors": warm["login"].errors[:5], "bounds_hit": budget.exhausted,
        "results": results, "verdicts": verdicts(results, args.users),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"portal_load-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(table(results))
    print()
    print("\n".join(report["verdicts"]))
    if budget.exhausted:
        print(f"bounds reached ({budget.exhausted}): later phases have fewer samples")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"portal_load: {exc}", file=sys.stderr)
        sys.exit(2)
