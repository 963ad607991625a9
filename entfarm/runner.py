"""Drive the playbooks through ansible-runner, as AWX would, with progress and a summary.

Every run gets a directory ``<inventory>/state/runs/<timestamp>-<playbook>/``: ansible-runner's
artifacts (full stdout, one JSON file per event), ``events.jsonl`` (the same events, one per
line, for tools) and ``summary.json`` (per-host counts and the exit code).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import UserError
from .model import Farm

STAT_KEYS = ("ok", "changed", "failed", "unreachable", "skipped", "rescued", "ignored")
EXIT_FAILED = 1
EXIT_UNREACHABLE = 4


def project_root() -> Path:
    """The directory holding playbooks/ and roles/ (the checkout, or ENTFARM_PROJECT)."""
    env = os.environ.get("ENTFARM_PROJECT")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent)
    candidates.append(Path.cwd())
    for candidate in candidates:
        if (candidate / "playbooks" / "site.yml").is_file():
            return candidate
    raise UserError(
        "cannot find entfarm's playbooks: run from the entfarm checkout or set ENTFARM_PROJECT"
    )


@dataclass
class HostStats:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0


@dataclass
class RunResult:
    playbook: str
    run_dir: Path
    status: str
    rc: int
    hosts: dict[str, HostStats] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    duration: float = 0.0

    @property
    def exit_code(self) -> int:
        if any(s.unreachable for s in self.hosts.values()):
            return EXIT_UNREACHABLE
        if any(s.failed for s in self.hosts.values()) or self.rc != 0:
            return EXIT_FAILED
        return 0

    @property
    def changed_hosts(self) -> list[str]:
        return [h for h, s in self.hosts.items() if s.changed]


@dataclass
class Progress:
    """What the runner reports while a playbook runs; the CLI renders it."""

    play: str = ""
    play_index: int = 0
    task: str = ""
    task_index: int = 0
    hosts_started: set[str] = field(default_factory=set)
    hosts_done: set[str] = field(default_factory=set)
    changed: int = 0


ProgressCallback = Callable[[str, Progress, dict[str, Any]], None]


def new_run_dir(farm: Farm, what: str) -> Path:
    """A fresh ``<inventory>/state/runs/<timestamp>-<what>/`` for one run's records."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    run_dir = farm.state_dir / "runs" / f"{stamp}-{what}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def run_playbook(
    farm: Farm,
    playbook: str = "playbooks/site.yml",
    *,
    limit: str | None = None,
    tags: str | None = None,
    skip_tags: str | None = None,
    check: bool = False,
    diff: bool = False,
    extravars: dict[str, Any] | None = None,
    verbosity: int = 0,
    on_event: ProgressCallback | None = None,
) -> RunResult:
    """Run one playbook of the project against the farm's inventory."""
    import ansible_runner  # heavy import, only when running

    root = project_root()
    if not (root / playbook).is_file():
        raise UserError(f"no playbook {playbook} in {root}")
    run_dir = new_run_dir(farm, Path(playbook).stem)
    events_file = (run_dir / "events.jsonl").open("w", encoding="utf-8")
    progress = Progress()
    result = RunResult(playbook, run_dir, "starting", -1)

    def handle(event: dict[str, Any]) -> bool:
        events_file.write(json.dumps(event, default=str) + "\n")
        kind = event.get("event", "")
        data = event.get("event_data", {})
        host = data.get("host")
        if kind == "playbook_on_play_start":
            progress.play = data.get("play", "")
            progress.play_index += 1
        elif kind == "playbook_on_task_start":
            progress.task = data.get("task", "")
            progress.task_index += 1
            progress.hosts_started = set()
            progress.hosts_done = set()
            progress.changed = 0
        elif kind == "runner_on_start" and host:
            progress.hosts_started.add(host)
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped",
                      "runner_on_unreachable") and host:
            progress.hosts_done.add(host)
            if data.get("res", {}).get("changed"):
                progress.changed += 1
            if kind in ("runner_on_failed", "runner_on_unreachable") and not data.get(
                "ignore_errors"
            ):
                result.failures.append(_failure(kind, data))
        if on_event is not None:
            on_event(kind, progress, data)
        return True  # keep ansible-runner's own copy of the event in artifacts/

    cmdline = []
    if check:
        cmdline.append("--check")
    if diff:
        cmdline.append("--diff")
    env = {
        # ansible-playbook is installed beside the Python running entfarm (the virtualenv).
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "ANSIBLE_CONFIG": str(root / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        # runner's private_data_dir is the run directory: keep the project's roles path
        "ANSIBLE_ROLES_PATH": str(root / "roles"),
        "ANSIBLE_INVENTORY_PLUGINS": str(root / "plugins" / "inventory"),
    }
    started = time.monotonic()
    try:
        runner = ansible_runner.run(
            private_data_dir=str(run_dir),
            project_dir=str(root),
            playbook=str(root / playbook),
            inventory=str(farm.file.resolve()),
            limit=limit,
            tags=tags,
            skip_tags=skip_tags,
            cmdline=" ".join(cmdline) or None,
            extravars=extravars or {},
            verbosity=verbosity or None,
            envvars=env,
            event_handler=handle,
            quiet=True,
            ident="ansible",
        )
    finally:
        events_file.close()
    result.duration = time.monotonic() - started
    result.status = runner.status
    result.rc = runner.rc
    stats = runner.stats or {}
    hosts: set[str] = set()
    for key in STAT_KEYS:
        hosts |= set((stats.get(key) or {}).keys())
    for host in sorted(hosts):
        result.hosts[host] = HostStats(
            **{key: int((stats.get(key) or {}).get(host, 0)) for key in STAT_KEYS}
        )
    (run_dir / "summary.json").write_text(json.dumps({
        "playbook": playbook,
        "status": result.status,
        "rc": result.rc,
        "exit_code": result.exit_code,
        "duration_s": round(result.duration, 1),
        "check": check,
        "limit": limit,
        "tags": tags,
        "hosts": {h: asdict(s) for h, s in result.hosts.items()},
        "failures": result.failures,
    }, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def _failure(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    res = data.get("res", {}) or {}
    message = res.get("msg") or res.get("stderr") or res.get("reason") or ""
    if res.get("_ansible_no_log") or res.get("censored"):
        message = "(output hidden: no_log)"
    return {
        "host": data.get("host"),
        "kind": "unreachable" if kind == "runner_on_unreachable" else "failed",
        "task": data.get("task"),
        "play": data.get("play"),
        "message": str(message)[:2000],
    }
