"""Read-only checks of the portal role, runnable against any inventory.

    pytest roles/portal/verify --hosts='docker://entfarm-lab-portal-1'

Each portal node: its release installed from the wheelhouse, its configuration accepted by the
release's own loader, gunicorn running sandboxed as entfarm-portal on the farm address, and
/healthz answering with the deployed version.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from entfarm.verifylib import release_tests, role_suite, systemd_exposure

UNIT = "entfarm-portal"
CHECK = "/usr/local/sbin/entfarm-portal-check"

_hosts_only, fact = role_suite("portal", group="portal")


test_fact_present, test_release_is_current_and_complete = release_tests(fact)


def test_installed_entfarm_is_the_deployed_version(host: Any) -> None:
    info = fact(host)
    cmd = host.run(f"{info['root']}/current/bin/python -c "
                   "'import importlib.metadata as m; print(m.version(\"entfarm\"))'")
    assert cmd.rc == 0, cmd.stderr
    assert cmd.stdout.strip() == info["version"]


def test_configuration_accepted_by_the_portal(host: Any) -> None:
    info = fact(host)
    cmd = host.run(f"{info['root']}/current/bin/python {CHECK} {shlex.quote(info['config_file'])}")
    assert cmd.rc == 0, cmd.stderr
    assert cmd.stdout.startswith("ok: ")


def test_configuration_is_private_to_the_portal(host: Any) -> None:
    info = fact(host)
    config = host.file(info["config_file"])
    assert config.user == "root" and config.group == info["user"]
    assert config.mode == 0o640
    key = host.file(str(config.path).rsplit("/", 1)[0] + "/secret_key")
    assert key.exists and key.mode == 0o640 and key.group == info["user"]
    assert len(key.content_string.strip()) >= 32


def test_service_runs_as_its_user(host: Any) -> None:
    svc = host.service(UNIT)
    assert svc.is_enabled
    assert svc.is_running
    users = host.run(f"ps -o user= --ppid $(systemctl show -p MainPID --value {UNIT})")
    main_user = host.run(f"ps -o user= -p $(systemctl show -p MainPID --value {UNIT})")
    assert main_user.stdout.strip() == fact(host)["user"]
    assert {u.strip() for u in users.stdout.splitlines() if u.strip()} == {fact(host)["user"]}


def test_listens_on_the_farm_address_only(host: Any) -> None:
    bind = fact(host)["bind"]
    assert host.socket(f"tcp://{bind}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{bind.rsplit(':', 1)[1]}").is_listening


def test_healthz(host: Any) -> None:
    info = fact(host)
    if not host.exists("curl"):
        pytest.skip("not verifiable: curl is not installed on this node")
    cmd = host.run(f"curl -sS --max-time 10 http://{info['bind']}/healthz")
    assert cmd.rc == 0, cmd.stderr
    assert json.loads(cmd.stdout) == {"status": "ok", "version": info["version"]}


def test_sandboxed(host: Any) -> None:
    score, last = systemd_exposure(host, UNIT)
    assert score <= 2.0, last


def test_no_access_log_with_query_strings(host: Any) -> None:
    cmd = host.run(f"systemctl show -p ExecStart --value {UNIT}")
    assert "--access-logfile" not in cmd.stdout or "%(U)s" in cmd.stdout
    assert "%(r)s" not in cmd.stdout and "%(q)s" not in cmd.stdout
