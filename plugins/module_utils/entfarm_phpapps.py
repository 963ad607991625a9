"""What entfarm's modules for PHP applications (moodle_cli, nextcloud_occ) decide, kept apart
from running commands so that it is unit-tested (tests/unit/test_phpapps.py): reading the
versions a release declares, reading what the applications' CLIs print, and the install or
upgrade plan, with the upgrades the farm refuses (a downgrade, a skipped Nextcloud major, a
Moodle older than its release's minimum).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ansible.module_utils.basic import AnsibleModule

__all__ = [
    "COMMON_ARGUMENTS", "PhpCli", "PlanError", "groupfolders_delta", "moodle_code_version",
    "moodle_plan", "nextcloud_code_version", "nextcloud_plan", "parse_json_output",
    "run_module", "settings_delta",
]


class PlanError(Exception):
    """An install or upgrade the farm refuses; the message says what to do instead."""


# ---- Moodle ---------------------------------------------------------------------------------
_MOODLE_VERSION = re.compile(r"^\s*\$version\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*;", re.M)
_MOODLE_RELEASE = re.compile(r"^\s*\$release\s*=\s*'([^']*)'\s*;", re.M)
_MOODLE_BRANCH = re.compile(r"^\s*\$branch\s*=\s*'([0-9]+)'\s*;", re.M)


def moodle_code_version(version_php: str) -> dict[str, object]:
    """``$version`` (as a string: 2024100700.05 compares as a decimal), ``$release`` and
    ``$branch`` of a Moodle release's version.php."""
    version = _MOODLE_VERSION.search(version_php)
    if version is None:
        raise PlanError("version.php declares no $version: not a Moodle release")
    release = _MOODLE_RELEASE.search(version_php)
    branch = _MOODLE_BRANCH.search(version_php)
    return {
        "version": version.group(1),
        "release": release.group(1) if release else "",
        "branch": branch.group(1) if branch else "",
    }


def _decimal(value: str) -> tuple[int, int]:
    whole, _, fraction = value.partition(".")
    return int(whole), int((fraction or "0").ljust(2, "0")[:2])


def moodle_plan(installed: bool, db_version: str | None, code_version: str,
                min_upgrade_from: str) -> str:
    """``install``, ``upgrade`` or ``none`` for a Moodle database at ``db_version`` (None when
    not installed) and a release at ``code_version``."""
    if not installed or db_version is None:
        return "install"
    db, code = _decimal(db_version), _decimal(code_version)
    if code < db:
        raise PlanError(
            f"the release ({code_version}) is older than the database ({db_version}): Moodle "
            "cannot downgrade; restore the backup taken before the upgrade instead")
    if code == db:
        return "none"
    if db < _decimal(min_upgrade_from):
        raise PlanError(
            f"the database ({db_version}) is older than this release can upgrade from "
            f"({min_upgrade_from}): upgrade through the intermediate LTS first")
    return "upgrade"


# ---- Nextcloud ------------------------------------------------------------------------------
_NC_VERSION = re.compile(r"\$OC_Version\s*=\s*(?:array\(|\[)\s*([0-9,\s]+?)\s*(?:\)|\])\s*;")
_NC_STRING = re.compile(r"\$OC_VersionString\s*=\s*'([^']*)'\s*;")


def nextcloud_code_version(version_php: str) -> str:
    """The dotted version (30.0.4.1) of a Nextcloud release's version.php."""
    found = _NC_VERSION.search(version_php)
    if found is None:
        raise PlanError("version.php declares no $OC_Version: not a Nextcloud release")
    return ".".join(p.strip() for p in found.group(1).split(",") if p.strip())


def _parts(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def nextcloud_plan(installed: bool, installed_version: str | None, code_version: str) -> str:
    """``install``, ``upgrade`` or ``none``; Nextcloud upgrades one major version at a time
    and never downgrades."""
    if not installed or not installed_version:
        return "install"
    have, want = _parts(installed_version), _parts(code_version)
    if want < have:
        raise PlanError(
            f"the release ({code_version}) is older than the installed Nextcloud "
            f"({installed_version}): Nextcloud cannot downgrade; restore the backup instead")
    if want == have:
        return "none"
    if want[0] > have[0] + 1:
        raise PlanError(
            f"the release ({code_version}) skips a major version: the installed Nextcloud is "
            f"{installed_version}; upgrade one major at a time (install a {have[0] + 1} release "
            "first)")
    return "upgrade"


# ---- CLI output -----------------------------------------------------------------------------
def parse_json_output(text: str, what: str) -> object:
    """The JSON document a CLI printed, ignoring lines before it (PHP notices, Moodle's
    'Warning' banners) but nothing after it."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise PlanError(f"{what} printed no JSON: {text.strip()[-300:]!r}")
    try:
        return json.loads(text[start:])
    except ValueError as exc:
        raise PlanError(f"{what} printed invalid JSON ({exc}): {text.strip()[-300:]!r}") from exc


def settings_delta(current: dict[str, object], desired: dict[str, object]) -> dict[str, str]:
    """Settings to write so that ``current`` holds ``desired`` (values compared as the CLIs
    store them: strings; booleans as 1/0, as Moodle and Nextcloud keep them)."""

    def text(value: object) -> str:
        if isinstance(value, bool):
            return "1" if value else "0"
        return "" if value is None else str(value)

    return {k: text(v) for k, v in desired.items()
            if k not in current or text(current[k]) != text(v)}


# ---- Nextcloud group folders ----------------------------------------------------------------
# groupfolders' permission bits: read 1, update 2, create 4, delete 8, share 16.
ALL_PERMISSIONS = 31


def groupfolders_delta(current: object, desired: list[dict[str, object]]) -> list[list[str]]:
    """occ commands (without ``occ``) making ``occ groupfolders:list --output=json``'s
    ``current`` hold the ``desired`` folders ({mount_point, quota (bytes), groups}); a folder
    still to create is named ``@<mount point>`` where its id is needed. Nothing is removed."""
    folders = current.values() if isinstance(current, dict) else current
    by_name = {str(f["mount_point"]): f for f in folders or []}  # type: ignore[index]
    commands: list[list[str]] = []
    for want in desired:
        name = str(want["mount_point"])
        have = by_name.get(name)
        ref = str(have["id"]) if have else f"@{name}"
        if have is None:
            commands.append(["groupfolders:create", name])
        if have is None or int(have.get("quota", -3)) != int(want["quota"]):  # type: ignore[call-overload]
            commands.append(["groupfolders:quota", ref, str(want["quota"])])
        groups = (have or {}).get("groups") or {}
        for group in want.get("groups", []):  # type: ignore[attr-defined]
            permissions = groups.get(group) if isinstance(groups, dict) else None
            if isinstance(permissions, dict):  # newer releases: {"displayName", "permissions"}
                permissions = permissions.get("permissions")
            if permissions is None:
                commands.append(["groupfolders:group", ref, str(group)])
            if permissions != ALL_PERMISSIONS:
                commands.append(["groupfolders:group", ref, str(group),
                                 "read", "write", "share", "delete"])
    return commands


# ---- Running the applications' CLIs ----------------------------------------------------------
# Options every module of ours for a PHP application takes.
COMMON_ARGUMENTS: dict[str, dict[str, Any]] = {
    "root": {"type": "path", "required": True},
    "php": {"type": "path", "default": "/usr/bin/php8.2"},
    "user": {"type": "str", "required": True},
    "environment": {"type": "dict", "default": {}},
}


class PhpCli:
    """Runs PHP as the application's user in its release; subclasses have one method per
    ``state``, returning the module's result (``changed`` included)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.p = module.params

    def environment(self) -> dict[str, str]:
        return dict(self.p["environment"])

    def php(self, argv: list[str], what: str) -> str:
        cmd = ["runuser", "-u", self.p["user"], "--", self.p["php"], *argv]
        rc, out, err = self.module.run_command(cmd, cwd=self.p["root"],
                                               environ_update=self.environment())
        if rc != 0:
            raise PlanError(f"{what} failed (exit {rc}): {(err or out).strip()[-800:]}")
        return str(out)

    def version_php(self) -> str:
        with open(f"{self.p['root']}/version.php", encoding="utf-8") as f:
            return f.read()


def run_module(cli: type[PhpCli], arguments: dict[str, dict[str, Any]],
               **options: Any) -> None:
    """The module's main: its arguments and ours, then the method named by ``state``; a
    refused plan or a failed command fails the task with its message."""
    module = AnsibleModule(argument_spec={**COMMON_ARGUMENTS, **arguments},
                           supports_check_mode=True, **options)
    try:
        result = getattr(cli(module), module.params["state"])()
    except (PlanError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**json.loads(json.dumps(result)))
