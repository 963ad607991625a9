"""Filters rendering PHP configuration files from data (Moodle's config.php, Nextcloud's
entfarm.config.php): values become PHP literals, so that no quote or backslash in a password
or a name can break the file or inject code. Unit-tested in tests/unit/test_phpapps.py."""

from __future__ import annotations

from typing import Any

_ESCAPES = str.maketrans({"\\": "\\\\", "'": "\\'"})


def to_php(value: Any, indent: int = 0) -> str:
    """A PHP literal of ``value``: single-quoted strings (only \\ and ' need escaping there),
    ints, floats, true/false/null, and short-syntax arrays for lists and mappings."""
    pad = "  " * indent
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.translate(_ESCAPES) + "'"
    if isinstance(value, dict):
        if not value:
            return "[]"
        items = [f"{pad}  {to_php(str(k))} => {to_php(v, indent + 1)}," for k, v in value.items()]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        items = [f"{pad}  {to_php(v, indent + 1)}," for v in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    raise TypeError(f"no PHP literal for {type(value).__name__}: {value!r}")


def moodle_config_php(settings: dict[str, Any], setup: str) -> str:
    """Moodle's config.php: ``$CFG`` with ``settings``, then Moodle's lib/setup.php."""
    lines = ["<?php", "// Managed by Ansible (entfarm role moodle): local changes are overwritten.",
             "unset($CFG);", "global $CFG;", "$CFG = new stdClass();"]
    lines += [f"$CFG->{name} = {to_php(value)};" for name, value in settings.items()]
    lines.append(f"require_once({to_php(setup)});")
    return "\n".join(lines) + "\n"


def nextcloud_config_php(settings: dict[str, Any]) -> str:
    """A Nextcloud config file (``config/*.config.php`` is merged over config.php)."""
    return ("<?php\n// Managed by Ansible (entfarm role nextcloud): local changes are "
            f"overwritten.\n$CONFIG = {to_php(settings)};\n")


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"to_php": to_php, "moodle_config_php": moodle_config_php,
                "nextcloud_config_php": nextcloud_config_php}
