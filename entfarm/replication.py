"""A directory replica against its provider: does it hold exactly what its syncrepl filter
selects there, at the provider's state?

A syncrepl consumer's own view is not enough. On the lab, replicas in sync with the
directory kept, after a 1 % Delta, the people who had left their établissement: the
directory's access rules made syncprov drop those deletes (roles/directory/vars/main.yml).
Each replica then sent the provider's ``contextCSN`` as its own and believed itself in sync;
only the entries, compared, showed it (docs/performance.md). A provider database restored or
made again under its replicas probably puts them in the same place.

Both sides are read as root over ldapi on their own host (read-only: ldapsearch only). A
``Runner`` runs one shell command on a host and returns its standard output; the verify suite
passes testinfra's ``host.check_output``, the benchmark ``docker exec``.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from entfarm.aaf.ldif import parent, parse

Runner = Callable[[str], str]

SEARCH = "ldapsearch -Q -LLL -Y EXTERNAL -H ldapi:/// -o ldif-wrap=no -z 0"
_SETTING = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
SAMPLE = 5


@dataclass(frozen=True)
class Consumer:
    """What a replica asks its provider for (from its olcSyncrepl; credentials not kept)."""

    searchbase: str
    scope: str
    filter: str


@dataclass(frozen=True)
class ReplicaState:
    consumer: Consumer
    provider_csn: tuple[str, ...]
    replica_csn: tuple[str, ...]
    expected: int  # entries of the provider that the filter selects
    held: int  # entries the replica holds under the search base
    missing: tuple[str, ...]  # a sample of the DNs the replica lacks (at most SAMPLE)
    extra: tuple[str, ...]  # a sample of the DNs it holds and should not
    missing_count: int
    extra_count: int

    @property
    def same_csn(self) -> bool:
        return bool(self.provider_csn) and self.provider_csn == self.replica_csn

    @property
    def in_sync(self) -> bool:
        return self.same_csn and not self.missing_count and not self.extra_count

    def describe(self) -> str:
        """One paragraph an operator can act on."""
        if self.in_sync:
            return (f"in sync: {self.held} entries, the provider's contextCSN "
                    f"{' '.join(self.provider_csn)}")
        parts = [f"holds {self.held} entries where the provider has {self.expected} for its "
                 f"filter"]
        if self.missing_count:
            parts.append(f"{self.missing_count} missing (e.g. {'; '.join(self.missing)})")
        if self.extra_count:
            parts.append(f"{self.extra_count} that the provider does not have for it "
                         f"(e.g. {'; '.join(self.extra)})")
        csn = ("contextCSN equal to the provider's: the replica believes itself in sync; "
               "refill it (empty its database and restart slapd, see roles/school_server)"
               if self.same_csn else
               f"contextCSN {' '.join(self.replica_csn) or 'none'} against the provider's "
               f"{' '.join(self.provider_csn) or 'none'} (still replicating, or cut off)")
        return "; ".join(parts) + "; " + csn


def consumer_of(replica: Runner) -> Consumer:
    """The replica database's syncrepl settings (the first consumer of the first database
    that has one)."""
    out = replica(f"{SEARCH} -b cn=config '(olcSyncrepl=*)' olcSyncrepl")
    entries = parse(out.encode(), ("olcSyncrepl",))
    for entry in entries.values():
        for value in entry.get("olcSyncrepl", []):
            settings = {k.lower(): v for k, v in _SETTING.findall(re.sub(r"^\{\d+\}", "", value))}
            if "searchbase" in settings:
                return Consumer(_unquote(settings["searchbase"]),
                                _unquote(settings.get("scope", "sub")),
                                _unquote(settings.get("filter", "(objectClass=*)")))
    raise ValueError("no database with an olcSyncrepl searchbase: not a replica")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _dns(run: Runner, base: str, scope: str, ldap_filter: str) -> set[str]:
    # Exit 32 (noSuchObject): no search base, as on a replica emptied and not refilled yet,
    # which holds nothing.
    out = run(f"{SEARCH} -b {shlex.quote(base)} -s {shlex.quote(scope)} "
              f"{shlex.quote(ldap_filter)} 1.1 || [ $? -eq 32 ]")
    return {_norm(dn) for dn in parse(out.encode())}


def _norm(dn: str) -> str:
    return ",".join(part.strip() for part in dn.lower().split(","))


def _csn(run: Runner, base: str) -> tuple[str, ...]:
    """The contextCSN of the database holding ``base``: on its suffix entry, which is the
    search base itself on a farm (one database per académie) or one of its parents."""
    dn = base
    while dn:
        # -M: a consumer whose search base is below its suffix keeps its cookie on a glue
        # entry, which only manageDSAit shows.
        out = run(f"{SEARCH} -M -s base -b {shlex.quote(dn)} contextCSN 2>/dev/null; true")
        entry = next(iter(parse(out.encode(), ("contextCSN",)).values()), {})
        if entry.get("contextCSN"):
            return tuple(sorted(entry["contextCSN"]))
        dn = parent(dn)
    return ()


def replica_state(provider: Runner, replica: Runner,
                  consumer: Consumer | None = None) -> ReplicaState:
    consumer = consumer or consumer_of(replica)
    # The replica's CSN first: a change landing in between makes the provider's newer, not
    # a replica wrongly equal.
    replica_csn = _csn(replica, consumer.searchbase)
    held = _dns(replica, consumer.searchbase, "sub", "(objectClass=*)")
    expected = _dns(provider, consumer.searchbase, consumer.scope, consumer.filter)
    provider_csn = _csn(provider, consumer.searchbase)
    missing, extra = sorted(expected - held), sorted(held - expected)
    return ReplicaState(consumer, provider_csn, replica_csn, len(expected), len(held),
                        tuple(missing[:SAMPLE]), tuple(extra[:SAMPLE]), len(missing), len(extra))


def wait_in_sync(provider: Runner, replica: Runner, timeout: float, interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[ReplicaState, float]:
    """The first in-sync state within ``timeout`` seconds, or the last one read; and the
    seconds waited."""
    consumer = consumer_of(replica)
    start = clock()
    while True:
        state = replica_state(provider, replica, consumer)
        waited = clock() - start
        if state.in_sync or waited >= timeout:
            return state, waited
        sleep(min(interval, max(0.0, timeout - waited)))
