"""The ``entfarm`` command: parses, calls the package, renders. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .errors import UserError
from .model import Farm, load_farm

console = Console(highlight=False, soft_wrap=True, emoji=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def _default_inventory() -> str:
    env = os.environ.get("ENTFARM_INVENTORY")
    if env:
        return env
    from .runner import project_root

    try:
        return str(project_root() / "inventories" / "lab")
    except UserError:
        return "inventories/lab"


inventory_option = click.option(
    "-i", "--inventory", "inventory", metavar="INVENTORY", default=None,
    help="Inventory directory holding farm.yml (default: the lab, inventories/lab).",
)


def _farm(inventory: str | None) -> Farm:
    return load_farm(inventory or _default_inventory())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="entfarm")
def cli() -> None:
    """entfarm: deploy and operate a mutualised ENT farm."""


# -- validate / inventory / schema -----------------------------------------------------------


@cli.command()
@inventory_option
def validate(inventory: str | None) -> None:
    """Check farm.yml; report every problem at once (exit 2 when there is one)."""
    farm = _farm(inventory)
    spec = farm.spec
    console.print(
        f"[green]ok[/green] {farm.file}: académie {spec.academie.name}, "
        f"{len(spec.departements)} département(s), {len(spec.etablissements)} établissement(s) "
        f"in {len(spec.waves)} wave(s), {len(farm.hosts())} host(s)"
    )


@cli.command()
@inventory_option
@click.option("--list", "as_list", is_flag=True, help="The whole inventory as JSON (default).")
@click.option("--host", "host", default=None, help="One host's variables as JSON.")
def inventory(inventory: str | None, as_list: bool, host: str | None) -> None:
    """Print the Ansible inventory derived from farm.yml (static export)."""
    from .inventory import as_json_inventory

    data = as_json_inventory(_farm(inventory))
    if host is not None:
        hostvars = data["_meta"]["hostvars"]
        if host not in hostvars:
            raise UserError(f"no host {host!r} in this farm; hosts: {', '.join(hostvars)}")
        data = hostvars[host]
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@cli.command()
def schema() -> None:
    """Print the JSON Schema of farm.yml (for editors)."""
    from .model import schema_text

    click.echo(schema_text(), nl=False)


# -- lab ----------------------------------------------------------------------------------------


@cli.group()
def lab() -> None:
    """The local lab: every farm host as a systemd container (Docker)."""


def _render_lab(states: list[Any]) -> None:
    table = Table(title="lab hosts", show_edge=False)
    for column in ("host", "container", "state", "action", "address", "published"):
        table.add_column(column)
    for s in states:
        published = ", ".join(f"{k}->{v}" for k, v in (s.published or {}).items())
        table.add_row(s.host, s.container, s.state, s.action or "", s.ip or "", published)
    console.print(table)


def _lab_progress(line: str) -> None:
    console.print(f"[dim]lab[/dim] {line}")


@lab.command("up")
@inventory_option
def lab_up(inventory: str | None) -> None:
    """Build the base image if needed and start every host (idempotent)."""
    from . import lab as lab_mod

    states = lab_mod.up(_lab_farm(inventory), progress=_lab_progress)
    _render_lab(states)
    changed = [s for s in states if s.action not in ("unchanged", "")]
    console.print(f"{len(changed)} host(s) changed, {len(states) - len(changed)} unchanged")


@lab.command("down")
@inventory_option
def lab_down(inventory: str | None) -> None:
    """Remove the lab's containers and network (the base image is kept)."""
    from . import lab as lab_mod

    lab_mod.down(_lab_farm(inventory), progress=_lab_progress)


@lab.command("reset")
@inventory_option
def lab_reset(inventory: str | None) -> None:
    """Recreate every host from the base image: a fresh lab."""
    from . import lab as lab_mod

    _render_lab(lab_mod.reset(_lab_farm(inventory), progress=_lab_progress))


@lab.command("status")
@inventory_option
def lab_status(inventory: str | None) -> None:
    """Show each lab host's container, state, address and published ports."""
    from . import lab as lab_mod

    _render_lab(lab_mod.status(_lab_farm(inventory)))


def _lab_farm(inventory: str | None) -> Farm:
    farm = _farm(inventory)
    if farm.kind != "lab":
        raise UserError(f"{farm.file}: farm.kind is {farm.kind!r}; `entfarm lab` needs a lab farm")
    return farm


# -- deploy -------------------------------------------------------------------------------------


@cli.command()
@inventory_option
@click.option("--limit", "-l", default=None, help="Ansible host pattern, e.g. wave_1 or edge.")
@click.option("--tags", "-t", default=None, help="Only these tags, e.g. proxy or common:ssh.")
@click.option("--skip-tags", default=None, help="Skip these tags.")
@click.option("--check", "-C", is_flag=True, help="Dry run: report what would change.")
@click.option("--diff", "-D", is_flag=True, help="Show the differences in changed files.")
@click.option("--playbook", default="playbooks/site.yml", show_default=True)
@click.option("-v", "--verbose", count=True, help="Ansible verbosity (-v … -vvvv).")
def deploy(inventory: str | None, limit: str | None, tags: str | None, skip_tags: str | None,
           check: bool, diff: bool, playbook: str, verbose: int) -> None:
    """Converge the farm: run playbooks/site.yml through ansible-runner."""
    from . import artifacts as store
    from . import runner

    farm = _farm(inventory)
    # Before any host is contacted: a missing or altered artifact stops here, not mid-deploy.
    store.require(farm)
    if farm.kind == "lab":
        _require_lab_up(farm)
    renderer = _DeployRenderer(diff=diff)
    mode = " (check mode)" if check else ""
    console.print(f"deploy {playbook} on farm {farm.name}{mode}; run directory follows")
    result = runner.run_playbook(
        farm, playbook, limit=limit, tags=tags, skip_tags=skip_tags, check=check, diff=diff,
        verbosity=verbose, on_event=renderer,
    )
    renderer.close()
    _render_summary(result)
    sys.exit(result.exit_code)


def _require_lab_up(farm: Farm) -> None:
    from . import lab as lab_mod

    down = [s.host for s in lab_mod.status(farm) if s.state != "running"]
    if down:
        raise UserError(
            f"lab host(s) not running: {', '.join(down)}; run `entfarm lab up` first"
        )


class _DeployRenderer:
    """Live progress: play, task, hosts N of M. One line per task when not on a terminal."""

    def __init__(self, diff: bool) -> None:
        self.diff = diff
        self.live = console.is_terminal
        self.status: Any = None
        self.last_task = ""
        if self.live:
            self.status = console.status("starting…")
            self.status.start()

    def __call__(self, kind: str, progress: Any, data: dict[str, Any]) -> None:
        if kind == "playbook_on_play_start":
            self._print(f"[bold]PLAY {progress.play_index}[/bold] {progress.play}")
        elif kind == "playbook_on_task_start":
            self.last_task = progress.task
        elif kind in ("runner_on_failed", "runner_on_unreachable"):
            if data.get("ignore_errors"):
                return
            res = data.get("res", {}) or {}
            msg = res.get("msg") or res.get("stderr") or ""
            if res.get("censored"):
                msg = "(output hidden: no_log)"
            what = "UNREACHABLE" if kind == "runner_on_unreachable" else "FAILED"
            self._print(f"[red]{what}[/red] {data.get('host')} | {progress.task}: {msg}")
        elif kind == "runner_on_ok" and self.diff and data.get("res", {}).get("diff"):
            self._print_diff(data)
        if kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped",
                    "runner_on_unreachable"):
            line = (f"play {progress.play_index} · task {progress.task_index}: {progress.task} · "
                    f"host {len(progress.hosts_done)} of {len(progress.hosts_started)}"
                    f"{' · changed ' + str(progress.changed) if progress.changed else ''}")
            if self.live:
                self.status.update(line)
            elif len(progress.hosts_done) == len(progress.hosts_started):
                console.print(line)

    def _print_diff(self, data: dict[str, Any]) -> None:
        diffs = data["res"]["diff"]
        for d in diffs if isinstance(diffs, list) else [diffs]:
            if not isinstance(d, dict):
                continue
            if "prepared" in d:
                self._print(d["prepared"])
                continue
            before, after = d.get("before"), d.get("after")
            if isinstance(before, str) and isinstance(after, str) and before != after:
                import difflib

                header = d.get("after_header") or d.get("before_header") or ""
                lines = difflib.unified_diff(
                    before.splitlines(), after.splitlines(),
                    f"{data.get('host')}: {header} (before)", f"{header} (after)", lineterm="")
                self._print("\n".join(lines))

    def _print(self, text: str) -> None:
        console.print(text, markup=not text.startswith(("---", "+++", "@@")))

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def _render_summary(result: Any) -> None:
    table = Table(title=f"{result.playbook}: {result.status} in {result.duration:.0f} s",
                  show_edge=False)
    table.add_column("host")
    for key in ("ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(key, justify="right")
    for host, s in result.hosts.items():
        style = "red" if s.failed or s.unreachable else ("yellow" if s.changed else "green")
        table.add_row(f"[{style}]{host}[/{style}]", str(s.ok), str(s.changed), str(s.failed),
                      str(s.unreachable), str(s.skipped))
    console.print(table)
    for failure in result.failures:
        console.print(f"[red]{failure['kind']}[/red] {failure['host']} | {failure['task']}: "
                      f"{failure['message']}", markup=False)
    console.print(f"run directory: {result.run_dir}")


# -- artifacts ----------------------------------------------------------------------------------


@cli.group()
def artifacts() -> None:
    """The artifact store: releases fetched and checked, wheelhouses built, all checksummed."""


def _artifacts_progress(line: str) -> None:
    console.print(f"[dim]artifacts[/dim] {line}", markup=True, highlight=False)


def _render_outcomes(outcomes: list[Any], verb: str) -> None:
    from .artifacts import human_size

    table = Table(title=f"artifacts {verb}", show_edge=False)
    for column in ("name", "version", "action", "files", "size", "time"):
        table.add_column(column, justify="right" if column in ("files", "size", "time") else "left")
    for o in outcomes:
        table.add_row(o.name, o.version or "", o.action, str(o.files), human_size(o.size),
                      f"{o.seconds:.1f} s")
    console.print(table)


_STATUS_STYLE = {"ok": "green", "unused": "dim"}


def _render_states(states: list[Any], store_dir: Any) -> None:
    from .artifacts import human_size

    table = Table(title=f"artifact store {store_dir}", show_edge=False)
    for column in ("name", "kind", "version", "files", "size", "status", "used by"):
        table.add_column(column, justify="right" if column in ("files", "size") else "left")
    for s in states:
        style = _STATUS_STYLE.get(s.status, "red")
        table.add_row(s.name, s.kind, s.version or "", str(s.files), human_size(s.size),
                      f"[{style}]{s.status}[/{style}]", ", ".join(s.used_by))
    console.print(table)


@artifacts.command("fetch")
@inventory_option
@click.argument("names", nargs=-1)
def artifacts_fetch(inventory: str | None, names: tuple[str, ...]) -> None:
    """Download the releases named in farm.yml (default: all), each checked against its sha256."""
    from . import artifacts as store

    farm = _farm(inventory)
    outcomes = store.fetch(farm, list(names), progress=_artifacts_progress)
    if not outcomes:
        console.print(f"no release to fetch: {farm.file} has no artifacts.sources")
        return
    _render_outcomes(outcomes, "fetch")


@artifacts.command("build")
@inventory_option
@click.argument("names", nargs=-1)
def artifacts_build(inventory: str | None, names: tuple[str, ...]) -> None:
    """Build artifacts from their recipes (default: every recipe, e.g. the portal wheelhouse)."""
    from . import artifacts as store

    farm = _farm(inventory)
    outcomes = store.build(farm, list(names), progress=_artifacts_progress)
    if not outcomes:
        console.print(f"nothing to build: every recipe's name is a source in {farm.file}")
        return
    _render_outcomes(outcomes, "build")


@artifacts.command("list")
@inventory_option
def artifacts_list(inventory: str | None) -> None:
    """Show every artifact: kind, version, files, size, status (checksums recomputed)."""
    from . import artifacts as store

    farm = _farm(inventory)
    _render_states(store.states(farm), store.Store(farm).root)


@artifacts.command("verify")
@inventory_option
@click.argument("names", nargs=-1)
def artifacts_verify(inventory: str | None, names: tuple[str, ...]) -> None:
    """Recompute every checksum (default: all artifacts); exit 2 with one line per problem."""
    from . import artifacts as store

    farm = _farm(inventory)
    states, problems = store.verify(farm, list(names))
    if problems:
        raise store.ArtifactError(
            f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the artifact store "
            f"{store.Store(farm).root}:\n" + "\n".join(problems))
    files = sum(s.files for s in states if s.kind != "unused")
    console.print(f"[green]ok[/green] {len(states)} artifact(s), {files} file(s) verified")


# -- verify -------------------------------------------------------------------------------------


@cli.command()
@inventory_option
@click.option("--limit", "-l", default="all", show_default=True, help="Ansible host pattern.")
@click.argument("roles", nargs=-1)
def verify(inventory: str | None, limit: str, roles: tuple[str, ...]) -> None:
    """Run the roles' read-only verify suites (testinfra) against the farm's hosts."""
    from .verify import run_verify

    farm = _farm(inventory)
    sys.exit(run_verify(farm, list(roles), limit))


# -- aaf ------------------------------------------------------------------------------------------


@cli.group()
def aaf() -> None:
    """AAF feeds: check an export, import it into the directory, generate synthetic ones."""


def _aaf_progress(line: str) -> None:
    err_console.print(f"[dim]aaf[/dim] {line}", markup=True)


@aaf.command("check")
@click.argument("path", type=click.Path(path_type=str))
def aaf_check(path: str) -> None:
    """Validate an export directory offline: counts, and every problem (exit 2 if blocking)."""
    from pathlib import Path

    from .aaf.export import load

    export = load(Path(path), progress=_aaf_progress)
    _render_export(export)
    blocking = export.blocking
    if blocking:
        raise UserError(f"{len(blocking)} blocking problem(s) in {path}; nothing to import")
    console.print(f"[green]ok[/green] {path}: {len(export.persons)} person(s), "
                  f"{len(export.structures)} structure(s), {len(export.files)} file(s) applied")


def _render_export(export: Any) -> None:
    for f in export.files:
        console.print(f"applied  {f.path.name}", markup=False)
    for f in export.ignored_files:
        console.print(f"ignored  {f.path.name} (older than the latest Complet)", markup=False)
    records = Table(title="records", show_edge=False)
    records.add_column("category · request")
    records.add_column("count", justify="right")
    for key, count in sorted(export.records.items()):
        records.add_row(key, str(count))
    console.print(records)
    per_uai = Table(title="persons per UAI", show_edge=False)
    for column in ("UAI", "structure", "Eleve", "PersRelEleve", "PersEducNat"):
        per_uai.add_column(column)
    names = {v.get("ENTStructureUAI", ["?"])[0]: v.get("ENTStructureNomCourant", [""])[0]
             for v in export.structures.values()}
    for uai, counts in sorted(export.counts_per_uai().items()):
        per_uai.add_row(uai, names.get(uai, ""), str(counts["Eleve"]),
                        str(counts["PersRelEleve"]), str(counts["PersEducNat"]))
    console.print(per_uai)
    for problem in export.problems:
        style = "red" if problem.blocking else "yellow"
        console.print(f"[{style}]problem[/{style}] ", end="")
        console.print(problem.render(), markup=False)


@aaf.command("import")
@click.argument("path", type=click.Path(path_type=str))
@inventory_option
@click.option("--dry-run", is_flag=True, help="Print the change set; write nothing.")
@click.option("--ldif", "show_ldif", is_flag=True, help="With --dry-run: print the LDIF too.")
@click.option("--force", is_flag=True, help="Deactivate past the --max-deactivate share.")
@click.option("--max-deactivate", default=0.10, show_default=True, type=click.FloatRange(0, 1),
              help="Largest share of one UAI's active accounts an import may deactivate.")
@click.option("--full-compare", is_flag=True,
              help="Compare every attribute of every person, not only those whose AAF record "
              "changed (also repairs entries edited by hand).")
@click.option("--bulk/--online", "bulk", default=None,
              help="--bulk: load the new entries offline (slapd stopped, a slapcat backup "
              "taken and restored on failure, slapadd, slapd started). --online: ldapmodify "
              "only. Default: bulk for a first import of at least 10 000 entries.")
@click.option("--streams", default=4, show_default=True, type=click.IntRange(1, 16),
              help="ldapmodify connections writing side by side (1: one after the other, to "
              "spare a busy directory).")
@click.option("--no-cache", is_flag=True,
              help="Parse every export file, without the records kept from the last import in "
              "the export directory's .entfarm-cache (which this run then leaves as it is).")
def aaf_import(path: str, inventory: str | None, dry_run: bool, show_ldif: bool, force: bool,
               max_deactivate: float, full_compare: bool, bulk: bool | None,
               streams: int, no_cache: bool) -> None:
    """Import an export into the directory (onboarded établissements only)."""
    from pathlib import Path

    from .aaf.bulk import for_host
    from .aaf.importer import Directory, run_import
    from .aaf.transport import for_farm
    from .waves.ledger import read_scope

    farm = _farm(inventory)
    transport = for_farm(farm)
    directory = Directory(transport, farm.spec.academie.base_dn, streams=streams)
    # Once a wave has run, the ledger says which établissements are onboarded.
    scope, held = read_scope(farm) or (None, set())
    if scope is not None:
        _aaf_progress(f"scope: the wave ledger ({len(scope)} onboarded, {len(held)} held out)")
    result = run_import(Path(path), farm, directory, dry_run=dry_run, force=force,
                        max_deactivate=max_deactivate, progress=_aaf_progress,
                        full_compare=full_compare, scope=scope, held=held, bulk=bulk,
                        bulk_target=for_host(transport), use_cache=not no_cache)
    cs = result.changes
    table = Table(title="change set per UAI" + (" (dry run: nothing written)" if dry_run else ""),
                  show_edge=False)
    kinds = ("people add", "people modify", "people deactivate", "people reactivate",
             "people purge", "groups add", "groups modify", "groups delete")
    table.add_column("UAI")
    for kind in kinds:
        table.add_column(kind.replace("people ", ""), justify="right")
    for uai, counts in sorted(cs.per_uai.items()):
        if any(counts[k] for k in kinds):
            table.add_row(uai, *(str(counts[k]) for k in kinds))
    console.print(table)
    console.print(", ".join(f"{k}: {n}" for k, n in sorted(cs.counts.items())) or "no change")
    if cs.skipped:
        console.print("skipped (not onboarded): " + ", ".join(
            f"{uai}: {n}" for uai, n in sorted(cs.skipped.items())), markup=False)
    if dry_run and show_ldif:
        click.echo(cs.ldif, nl=False)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    console.print(f"{cs.changes} change(s) {'applied' if result.applied else 'computed'}; "
                  f"{timings}; persons' state {result.people_state}")
    for p in result.distribution:
        console.print(f"distribution file (one-time codes, mode 0600): {p}", markup=False)
    if result.bulk_backup:
        console.print(f"bulk load; slapcat backup taken before it (mode 0600): "
                      f"{result.bulk_backup}", markup=False)
    if result.run_record:
        console.print(f"run record: {result.run_record}", markup=False)


@aaf.command("generate")
@click.argument("out", type=click.Path(path_type=str))
@inventory_option
@click.option("--date", default=None, help="Export date AAAAMMJJ (default: today; a Delta: "
              "the day after the previous export).")
@click.option("--eleves-per-college", default=500, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--delta-from", "delta_from", default=None, type=click.Path(path_type=str),
              help="Write a Delta (departures, arrivals, moves, renames) on top of this export.")
@click.option("--delta-share", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the persons a Delta changes.")
def aaf_generate(out: str, inventory: str | None, date: str | None, eleves_per_college: int,
                 seed: int, delta_from: str | None, delta_share: float) -> None:
    """Write a synthetic export (ISO-8859-15) for the farm's établissements."""
    import datetime as dt
    import re
    from pathlib import Path

    from .aaf import generate as gen

    if date is not None and not re.fullmatch(r"[0-9]{8}", date):
        raise UserError(f"--date {date!r}: expected AAAAMMJJ, e.g. 20250901")
    farm = _farm(inventory)
    if delta_from:
        result = gen.generate_delta(Path(delta_from), Path(out), date=date, seed=seed,
                                    share=delta_share, prefix=farm.spec.academie.code)
    else:
        etabs = [(e.uai, e.name, e.departement) for e in farm.spec.etablissements]
        result = gen.generate(etabs, Path(out), date=date or dt.date.today().strftime("%Y%m%d"),
                              seed=seed, eleves_per_college=eleves_per_college,
                              prefix=farm.spec.academie.code, progress=_aaf_progress)
    for path in result.files:
        console.print(f"wrote {path}", markup=False)
    console.print(", ".join(f"{c}: {n}" for c, n in result.counts.items()) + " record(s)")


# -- wave -----------------------------------------------------------------------------------------


@cli.group()
def wave() -> None:
    """Waves: onboard établissements stage by stage, gated, recorded in a ledger."""


aaf_export_option = click.option(
    "--aaf", "aaf_export", metavar="EXPORT", type=click.Path(path_type=str), default=None,
    help="AAF export directory the directory step imports (restricted to the ledger's scope).")
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(1), default=None,
    help="Établissements per batch after the canary (default: canary size or 5, the larger).")


def _wave_steps(farm: Farm, aaf_export: str | None, ledger: Any | None,
                counts: dict[str, dict[str, int]] | None = None) -> list[Any]:
    from pathlib import Path

    from .waves.steps import default_steps

    def scope() -> tuple[set[str], set[str]]:
        found: tuple[set[str], set[str]] = ledger.scope() if ledger else (set(), set())
        return found

    return default_steps(farm, Path(aaf_export) if aaf_export else None, scope,
                         progress=_aaf_progress, counts=counts)


def _ledger_statuses(farm: Farm) -> dict[str, str]:
    from .waves.ledger import Ledger, ledger_path

    if not ledger_path(farm).is_file():
        return {}
    with Ledger.open(farm) as ledger:
        return ledger.statuses()


@wave.command("plan")
@inventory_option
@click.argument("wave_id", metavar="WAVE")
@aaf_export_option
@batch_size_option
@click.option("--svg", "svg", type=click.Path(path_type=str), default=None,
              help="Also write the timeline of every wave as SVG here.")
def wave_plan(inventory: str | None, wave_id: str, aaf_export: str | None,
              batch_size: int | None, svg: str | None) -> None:
    """What onboarding wave WAVE will do to each établissement (read-only)."""
    from pathlib import Path

    from .waves.plan import plan_wave
    from .waves.timeline import write_timeline

    farm = _farm(inventory)
    counts = None
    if aaf_export:
        from .aaf.export import load

        export = load(Path(aaf_export), progress=_aaf_progress)
        counts = {u: dict(c) for u, c in export.counts_per_uai().items()}
    statuses = _ledger_statuses(farm)
    plan = plan_wave(farm, wave_id, _wave_steps(farm, aaf_export, None, counts), statuses,
                     batch_size)
    w = plan.wave
    table = Table(title=f"wave {w.id}: {w.name} · {len(plan.rows)} établissement(s) · canary "
                  f"{w.canary} · batches of {plan.batch_size} · stops past "
                  f"{w.failure_threshold:.0%} failed")
    for column in ("batch", "établissement", "step", "will do"):
        table.add_column(column, overflow="fold")
    for r in plan.rows:
        who = (f"{r.uai} {r.name}\n{r.commune} · {r.status}"
               + (f"\nserver {r.school_server}" if r.school_server else ""))
        for n, (title, text) in enumerate(r.steps):
            table.add_row(r.batch or "—" if n == 0 else "", who if n == 0 else "", title, text,
                          end_section=n == len(r.steps) - 1)
    console.print(table)
    if svg:
        path = write_timeline(farm, Path(svg), statuses, batch_size)
        console.print(f"timeline: {path}", markup=False)


class _WaveRenderer:
    """Live progress of a wave: one status line, a printed line per établissement outcome."""

    def __init__(self) -> None:
        self.live = console.is_terminal
        self.status: Any = console.status("starting…") if self.live else None
        if self.status is not None:
            self.status.start()

    def __call__(self, event: Any) -> None:
        line = event.line()
        if event.phase in ("etab", "stop", "done") or (event.phase == "step" and not self.live):
            style = {"live": "green", "failed": "red"}.get(event.what, "bold")
            console.print(f"[{style}]{event.what}[/{style}] " + line.split(" · " + event.what)[0]
                          + (f" · {event.outcome}" if event.outcome else ""), markup=True)
        elif self.live:
            self.status.update(line)
        elif event.phase in ("preflight", "gate"):
            console.print(line, markup=False)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def _wave_engine(farm: Farm, ledger: Any, aaf_export: str | None, command: str,
                 wave_id: str, renderer: Callable[[Any], None]) -> Any:
    from .runner import new_run_dir
    from .waves.engine import Engine
    from .waves.steps import central_preflight, deployed_versions

    run_dir = new_run_dir(farm, f"wave-{wave_id}-{command}")
    return Engine(farm, ledger, _wave_steps(farm, aaf_export, ledger),
                  preflight=lambda: central_preflight(farm, run_dir),
                  versions=lambda: deployed_versions(farm), progress=renderer,
                  run_dir=run_dir)


def _wave_run(inventory: str | None, wave_id: str, aaf_export: str | None,
              batch_size: int | None, only: tuple[str, ...], resume: bool) -> None:
    from .waves.ledger import Ledger
    from .waves.plan import wave_of

    farm = _farm(inventory)
    wave_of(farm, wave_id)
    if aaf_export is None:
        raise UserError("--aaf EXPORT is required: the directory step imports the "
                        "établissements' accounts from it")
    if farm.kind == "lab":
        _require_lab_up(farm)
    renderer = _WaveRenderer()
    try:
        with Ledger.open(farm) as ledger:
            engine = _wave_engine(farm, ledger, aaf_export, "resume" if resume else "apply",
                                  wave_id, renderer)
            result = engine.apply(wave_id, batch_size=batch_size, resume=resume, only=only)
    finally:
        renderer.close()
    _render_wave_result(farm, result)
    sys.exit(0 if result.ok else 1)


def _render_wave_result(farm: Farm, result: Any) -> None:
    style = "green" if result.ok else "red"
    table = Table(title=f"wave {result.wave} {result.command}: [{style}]{result.outcome}"
                  f"[/{style}] · {result.reason}", show_edge=False)
    for column in ("batch", "UAI", "établissement", "outcome"):
        table.add_column(column, overflow="fold")
    names = {e.uai: e.name for e in farm.spec.etablissements}
    for n, batch in enumerate(result.batches, 1):
        for uai in batch:
            if uai in result.live:
                outcome = "[green]live[/green]"
            elif uai in result.failed:
                outcome = f"[red]failed[/red] {result.failed[uai]}"
            else:
                outcome = "[dim]not reached[/dim]"
            table.add_row(str(n), uai, names.get(uai, ""), outcome)
    for uai, evidence in result.reverify.items():
        bad = [ev for ev in evidence if ev["outcome"] == "failed"]
        table.add_row("—", uai, names.get(uai, ""),
                      "[red]re-verify failed[/red] " + "; ".join(ev["detail"] for ev in bad)
                      if bad else "[green]live, re-verified[/green]")
    console.print(table)
    for check in result.preflight:
        if check["outcome"] == "failed":
            console.print(f"[red]preflight failed[/red] {check['gate']}: {check['detail']}")
    if result.skipped and result.batches:
        console.print(f"already live, left alone: {', '.join(result.skipped)}")
    console.print(f"ledger run {result.run_id}; run directory: {result.run_dir}", markup=False)


@wave.command("apply")
@inventory_option
@click.argument("wave_id", metavar="WAVE")
@aaf_export_option
@batch_size_option
@click.option("--only", "only", multiple=True, metavar="UAI",
              help="Only these établissements of the wave (repeatable); a rolled-back one is "
              "re-onboarded only when named here.")
def wave_apply(inventory: str | None, wave_id: str, aaf_export: str | None,
               batch_size: int | None, only: tuple[str, ...]) -> None:
    """Onboard wave WAVE: preflight, canary, then gated batches; stop at the threshold."""
    _wave_run(inventory, wave_id, aaf_export, batch_size, only, resume=False)


@wave.command("resume")
@inventory_option
@click.argument("wave_id", metavar="WAVE")
@aaf_export_option
@batch_size_option
@click.option("--only", "only", multiple=True, metavar="UAI",
              help="Only these établissements of the wave (repeatable).")
def wave_resume(inventory: str | None, wave_id: str, aaf_export: str | None,
                batch_size: int | None, only: tuple[str, ...]) -> None:
    """After a fix: retry the failed and interrupted établissements, then the planned ones."""
    _wave_run(inventory, wave_id, aaf_export, batch_size, only, resume=True)


@wave.command("status")
@inventory_option
@click.argument("wave_id", metavar="WAVE", required=False)
def wave_status(inventory: str | None, wave_id: str | None) -> None:
    """The ledger: each établissement's status, times and last error (default: every wave)."""
    from .waves.ledger import Ledger, ledger_path
    from .waves.plan import wave_of

    farm = _farm(inventory)
    waves = [wave_of(farm, wave_id)] if wave_id else list(farm.spec.waves)
    rows: dict[str, Any] = {}
    if ledger_path(farm).is_file():
        with Ledger.open(farm) as ledger:
            rows = ledger.rows()
    else:
        console.print(f"no ledger yet ({ledger_path(farm)}): every établissement is planned",
                      markup=False)
    for w in waves:
        etabs = farm.etablissements_of_wave(w.id)
        counts: dict[str, int] = {}
        table = Table(show_edge=False)
        for column in ("UAI", "établissement", "status", "since", "live at", "last error"):
            table.add_column(column, overflow="fold")
        for e in etabs:
            row = rows.get(e.uai)
            status = row.status if row else "planned"
            counts[status] = counts.get(status, 0) + 1
            style = {"live": "green", "failed": "red", "onboarding": "yellow",
                     "rolled_back": "magenta"}.get(status, "dim")
            table.add_row(e.uai, e.name, f"[{style}]{status}[/{style}]",
                          (row.updated_at[:19] if row else ""),
                          (row.live_at or "")[:19] if row else "",
                          (row.error or "") if row else "")
        table.title = (f"wave {w.id}: {w.name} · "
                       + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        console.print(table)


@wave.command("rollback")
@inventory_option
@click.argument("uai")
@aaf_export_option
@click.option("--reason", default="", help="Why, for the ledger and the report.")
def wave_rollback(inventory: str | None, uai: str, aaf_export: str | None, reason: str) -> None:
    """Take one établissement out: accounts and tenants disabled, data kept, recorded."""
    from .waves.ledger import Ledger

    farm = _farm(inventory)
    if aaf_export is None:
        raise UserError("--aaf EXPORT is required: the directory step deactivates the "
                        "établissement's accounts through an import of it")
    if farm.kind == "lab":
        _require_lab_up(farm)
    renderer = _WaveRenderer()
    try:
        with Ledger.open(farm) as ledger:
            etab = next((e for e in farm.spec.etablissements if e.uai == uai), None)
            engine = _wave_engine(farm, ledger, aaf_export, "rollback",
                                  etab.wave if etab else "x", renderer)
            result = engine.rollback(uai, reason)
    finally:
        renderer.close()
    table = Table(title=f"{uai}: {result.previous} -> rolled_back (ledger run {result.run_id})",
                  show_edge=False)
    for column in ("step", "outcome", "detail"):
        table.add_column(column, overflow="fold")
    for action in result.actions:
        table.add_row(action["step"], action["outcome"], action["detail"])
    console.print(table)


@wave.command("report")
@inventory_option
@click.argument("wave_id", metavar="WAVE")
@click.option("--out", "out", type=click.Path(path_type=str), default=None,
              help="Directory for the report (default: <inventory>/state/reports).")
def wave_report(inventory: str | None, wave_id: str, out: str | None) -> None:
    """Write the wave's report for the Département and auditors: HTML (offline) and JSON."""
    from pathlib import Path

    from .waves.ledger import Ledger, ledger_path
    from .waves.plan import wave_of
    from .waves.report import write_report

    farm = _farm(inventory)
    wave_of(farm, wave_id)
    if not ledger_path(farm).is_file():
        raise UserError(f"no wave ledger at {ledger_path(farm)}: no wave was applied yet, "
                        "nothing to report (`entfarm wave plan` shows what will happen)")
    with Ledger.open(farm) as ledger:
        files = write_report(farm, ledger, wave_id, Path(out) if out else None)
    console.print(f"report: {files.html}\n        {files.json}", markup=False)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as exc:  # ValidationFailed included: every problem, one per line
        err_console.print("[red]error:[/red]", end=" ")
        err_console.print(str(exc), markup=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

