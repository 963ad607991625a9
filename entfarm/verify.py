"""Run the roles' read-only verify suites (pytest + testinfra) against any inventory.

The suites live with their roles (``roles/<role>/verify/test_<role>.py``) and reach hosts through
testinfra's Ansible backend, so the same suite runs on the lab's containers and on production
hosts over SSH. A check that cannot run is skipped with "not verifiable: <reason>" and listed as
such in the report; it never counts as passed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError
from .model import Farm
from .runner import new_run_dir, project_root


def verify_suites(roles: list[str]) -> list[str]:
    root = project_root()
    available = sorted(p.parent.parent.name for p in root.glob("roles/*/verify/test_*.py"))
    if not roles:
        return [str(root / "roles" / r / "verify") for r in available]
    unknown = [r for r in roles if r not in available]
    if unknown:
        raise UserError(
            f"no verify suite for {', '.join(unknown)}; roles with one: {', '.join(available)}"
        )
    return [str(root / "roles" / r / "verify") for r in roles]


def run_verify(farm: Farm, roles: list[str], limit: str = "all",
               extra_args: list[str] | None = None, hosts: list[str] | None = None,
               log: Path | None = None) -> int:
    """Run pytest in a child process; returns its exit code. The report goes to the run dir;
    pytest's output to the terminal, or to ``log`` when given (a wave keeps its screen for its
    own progress).

    ``limit`` is one testinfra host pattern (a host or group name, shell wildcards allowed;
    testinfra knows no Ansible ``:`` or ``!`` patterns, which match nothing there); ``hosts``,
    when given, names the hosts one by one instead."""
    root = project_root()
    run_dir = new_run_dir(farm, "verify")
    # testinfra's Ansible backend calls ansible-inventory: use the one installed beside us.
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, ANSIBLE_CONFIG=str(root / "ansible.cfg"),
               PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    cmd = [
        sys.executable, "-m", "pytest", *verify_suites(roles),
        "--hosts=" + (",".join(f"ansible://{h}" for h in hosts) if hosts
                      else f"ansible://{limit}"),
        f"--ansible-inventory={farm.file.resolve()}",
        "-p", "no:cacheprovider",
        "-rs",  # list every "not verifiable" skip with its reason
        f"--junitxml={run_dir / 'verify.xml'}",
        "-o", "junit_family=xunit2",
        *(extra_args or []),
    ]
    if log is None:
        print(f"verify report: {run_dir / 'verify.xml'}", flush=True)
        return subprocess.call(cmd, cwd=root, env=env)
    with log.open("wb") as out:
        return subprocess.call(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
