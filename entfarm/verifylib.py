"""Helpers shared by the roles' verify suites (roles/<role>/verify/test_<role>.py).

They keep the suites read-only and honest: a check that cannot run is skipped as
"not verifiable: <reason>", a host outside the role's group as "not applicable", never passed.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

FACTS_DIR = "/etc/ansible/facts.d"


def read_fact(host: Any, role: str) -> dict[str, Any]:
    """The role's local fact (``/etc/ansible/facts.d/<role>.fact``), or skip as not verifiable."""
    path = f"{FACTS_DIR}/{role}.fact"
    f = host.file(path)
    if not f.exists:
        pytest.skip(f"not verifiable: {path} missing ({role} role not applied)")
    data: dict[str, Any] = json.loads(f.content_string)
    return data


def only_in_group(host: Any, group: str) -> None:
    """Against an inventory, skip hosts outside ``group`` (a role's suite concerns its hosts)."""
    if host.backend.NAME != "ansible":
        return  # a single host named on the command line: the caller chose it
    groups = host.ansible.get_variables().get("group_names", [])
    if group not in groups:
        pytest.skip(f"not applicable: {host.backend.get_pytest_id()} is not in the {group} group")


def role_suite(role: str, group: str | None = None) -> tuple[Any, Any]:
    """The two things every role suite starts with: an autouse fixture keeping the suite to the
    role's group (when it has one), and ``fact(host)`` reading the role's local fact.

        _hosts_only, fact = role_suite("cas", group="cas")
    """

    @pytest.fixture(autouse=True)
    def _hosts_only(host: Any) -> None:
        if group is not None:
            only_in_group(host, group)

    def fact(host: Any) -> dict[str, Any]:
        return read_fact(host, role)

    return _hosts_only, fact


def q(value: object) -> str:
    """A value quoted for the host's shell."""
    return shlex.quote(str(value))


def name_check(address: str) -> str:
    """openssl's option checking the certificate against the address clients use."""
    is_ip = re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", address) is not None
    return f"-verify_ip {q(address)}" if is_ip else f"-verify_hostname {q(address)}"


def inventory_vars(host: Any) -> dict[str, Any]:
    """The host's inventory variables, or skip: checks reaching other hosts need the inventory."""
    if host.backend.NAME != "ansible":
        pytest.skip("not verifiable: needs the inventory (--hosts=ansible://…) to reach clients")
    variables: dict[str, Any] = host.ansible.get_variables()
    return variables


def other_host(host: Any, name: str) -> Any:
    """Another host of the same inventory, reached the way the inventory says."""
    inventory_vars(host)
    backend = host.backend
    other = backend.ansible_runner.get_host(
        name, ssh_config=backend.ssh_config, ssh_identity_file=backend.ssh_identity_file
    )
    if other is None:
        pytest.skip(f"not verifiable: {name} is not reachable through the inventory")
    return other


def release_tests(fact: Any) -> tuple[Any, Any]:
    """The two checks of an app installed as ``<root>/releases/<release>`` with a ``current``
    link (the portal's and Etherpad's layout), for a suite to bind at module level::

        test_fact_present, test_release_is_current_and_complete = release_tests(fact)
    """

    def test_fact_present(host: Any) -> None:
        info = fact(host)
        assert info["version"] and info["version"] != "unknown", info
        assert info["release"], info

    def test_release_is_current_and_complete(host: Any) -> None:
        info = fact(host)
        current = host.file(f"{info['root']}/current")
        assert current.is_symlink
        assert current.linked_to == f"{info['root']}/releases/{info['release']}"
        marker = host.file(f"{info['root']}/releases/{info['release']}/.entfarm-release")
        assert marker.exists, "release not marked complete"
        assert json.loads(marker.content_string)["release"] == info["release"]

    return test_fact_present, test_release_is_current_and_complete


def systemd_exposure(host: Any, unit: str) -> tuple[float, str]:
    """``systemd-analyze security``'s exposure score of a unit and its summary line, or skip
    as not verifiable when the host's systemd cannot compute it."""
    cmd = host.run(f"systemd-analyze security {q(unit)} --no-pager")
    if cmd.rc != 0 and "Unknown" in cmd.stderr:
        pytest.skip(f"not verifiable: systemd-analyze security unavailable: {cmd.stderr.strip()}")
    last: str = cmd.stdout.strip().splitlines()[-1]
    return float(last.split("level for")[1].split(":")[1].split()[0]), last
