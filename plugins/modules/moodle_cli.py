#!/usr/bin/python
"""moodle_cli: install, upgrade and configure Moodle through its own CLI (admin/cli)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: moodle_cli
short_description: Install, upgrade and configure Moodle through admin/cli
description:
- C(state=installed) compares the release's version.php with the database's C(version) and runs
  C(admin/cli/install_database.php) on an empty database, or C(admin/cli/upgrade.php) between
  C(admin/cli/maintenance.php --enable) and C(--disable) when the release is newer. A downgrade,
  or an upgrade from older than C(min_upgrade_from), is refused before anything runs. Maintenance
  mode stays on after a failed upgrade (restore from the backup).
- C(state=script) runs a PHP script of the role that prints JSON with a C(changed) key; in check
  mode it gets C(--check) and must not write.
- Every command runs as C(user) with the C(environment) given (PGSSLMODE and the others).
  Check mode reports what would run.
extends_documentation_fragment:
- entfarm_phpapp
options:
  config:
    description: Moodle's config.php
    type: path
    required: true
  state:
    description: What to converge
    type: str
    choices:
    - installed
    - script
    default: installed
  min_upgrade_from:
    description: Oldest database version this release upgrades
    type: str
    default: '0'
  install_options:
    description: Options of install_database.php (name without --)
    type: dict
    default: {}
  script:
    description: PHP script for state=script
    type: path
  script_args:
    description: Its arguments
    type: list
    elements: str
    default: []
author: entfarm
"""

EXAMPLES = r"""
- name: Install or upgrade Moodle
  moodle_cli:
    root: /opt/entfarm-moodle/current
    config: /etc/entfarm-moodle/config.php
    user: entfarm-moodle
    install_options: {adminuser: admin, adminpass: "{{ secret }}", fullname: ENT, shortname: ENT}
  no_log: true
"""

RETURN = r"""
action:
  description: >-
    install, upgrade or none (state=installed); the script's JSON answer (state=script)
  type: raw
  returned: always
version:
  description: The release's version, release and branch
  type: dict
  returned: state=installed
"""

from typing import Any  # noqa: E402

from ansible.module_utils.entfarm_phpapps import (  # noqa: E402
    PhpCli,
    moodle_code_version,
    moodle_plan,
    parse_json_output,
    run_module,
)

# Reads the database's version with config.php's credentials and nothing else of Moodle
# (ABORT_AFTER_CONFIG): prints {"installed": bool, "db_version": str|null}.
STATUS_PHP = r"""
define('CLI_SCRIPT', true);
define('ABORT_AFTER_CONFIG', true);
require($argv[1]);
$port = !empty($CFG->dboptions['dbport']) ? $CFG->dboptions['dbport'] : 5432;
$db = @pg_connect('host=' . $CFG->dbhost . ' port=' . $port . ' dbname=' . $CFG->dbname
    . ' user=' . $CFG->dbuser . " password='" . addcslashes($CFG->dbpass, "'\\") . "'");
if (!$db) { fwrite(STDERR, "cannot connect to the database\n"); exit(1); }
$result = @pg_query_params($db,
    'SELECT value FROM ' . $CFG->prefix . 'config WHERE name = $1', ['version']);
$row = $result ? pg_fetch_row($result) : false;
echo json_encode(['installed' => (bool) $row, 'db_version' => $row ? $row[0] : null]), "\n";
"""


class Moodle(PhpCli):
    def cli(self, script: str, *args: str) -> str:
        return self.php([f"{self.p['root']}/admin/cli/{script}", *args], script)

    def installed(self) -> dict[str, object]:
        code = moodle_code_version(self.version_php())
        status = parse_json_output(self.php(["-r", STATUS_PHP, "--", self.p["config"]],
                                            "reading the database's version"), "status")
        assert isinstance(status, dict)
        action = moodle_plan(bool(status["installed"]), status.get("db_version"),
                             str(code["version"]), self.p["min_upgrade_from"])
        result: dict[str, object] = {"action": action, "version": code,
                                     "db_version": status.get("db_version"),
                                     "changed": action != "none"}
        if self.module.check_mode or action == "none":
            return result
        if action == "install":
            options = [f"--{k}={v}" for k, v in sorted(self.p["install_options"].items())]
            self.cli("install_database.php", "--agree-license", *options)
        else:
            self.cli("maintenance.php", "--enable")
            # A failed upgrade leaves maintenance on: the site stays closed until restored.
            self.cli("upgrade.php", "--non-interactive")
            self.cli("maintenance.php", "--disable")
        return result

    def script(self) -> dict[str, object]:
        args = [*self.p["script_args"], *(["--check"] if self.module.check_mode else [])]
        out = parse_json_output(self.php([self.p["script"], *args], self.p["script"]),
                                self.p["script"])
        assert isinstance(out, dict)
        return {"action": out, "changed": bool(out.get("changed"))}


ARGUMENTS: dict[str, dict[str, Any]] = {
    "config": {"type": "path", "required": True},
    "state": {"type": "str", "default": "installed", "choices": ["installed", "script"]},
    "min_upgrade_from": {"type": "str", "default": "0"},
    "install_options": {"type": "dict", "default": {}, "no_log": True},
    "script": {"type": "path"},
    "script_args": {"type": "list", "elements": "str", "default": []},
}


def main() -> None:
    run_module(Moodle, ARGUMENTS, required_if=[("state", "script", ["script"])])


if __name__ == "__main__":
    main()
