#!/usr/bin/python
"""nextcloud_occ: install, upgrade and configure Nextcloud through occ."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nextcloud_occ
short_description: Install, upgrade and configure Nextcloud through occ
description:
- C(state=installed) compares the release's version.php with the installed version (config.php)
  and runs C(occ maintenance:install) on a new instance, or C(occ upgrade) between
  C(occ maintenance:mode --on) and C(--off) when the release is newer by at most one major.
  Skipping a major, or a downgrade, is refused before anything runs. Maintenance mode stays on
  after a failed upgrade (restore from the backup).
- C(state=apps) enables the apps named in C(apps) (C(occ app:list --output=json) first).
- C(state=app_config) writes the app settings of C(settings) and C(secret_settings) that differ
  from C(occ config:list --private --output=json).
- C(state=groupfolders) creates the group folders of C(groupfolders), sets their quota and gives
  their groups every permission; it never removes one.
- Commands run as C(user) (the owner of config.php) with C(environment) (NEXTCLOUD_CONFIG_DIR
  and the others). Check mode reports what would run.
extends_documentation_fragment:
- entfarm_phpapp
options:
  config_dir:
    description: Nextcloud's configuration directory
    type: path
    required: true
  state:
    description: What to converge
    type: str
    choices:
    - installed
    - apps
    - app_config
    - groupfolders
    default: installed
  install_options:
    description: Options of maintenance:install (name without --)
    type: dict
    default: {}
  apps:
    description: Apps to enable
    type: list
    elements: str
    default: []
  app:
    description: App whose settings state=app_config writes
    type: str
  settings:
    description: Settings for state=app_config
    type: dict
    default: {}
  secret_settings:
    description: Secret settings for state=app_config
    type: dict
    default: {}
  groupfolders:
    description: 'Folders: mount_point, quota (bytes), groups'
    type: list
    elements: dict
    default: []
author: entfarm
"""

EXAMPLES = r"""
- name: Install or upgrade Nextcloud
  nextcloud_occ:
    root: /opt/entfarm-nextcloud/current
    config_dir: /var/lib/entfarm-nextcloud/config
    user: entfarm-nextcloud
    install_options: {database: pgsql, admin-user: admin, admin-pass: "{{ secret }}"}
  no_log: true
"""

RETURN = r"""
action:
  description: What was (or would be) done
  type: raw
  returned: always
"""

import os  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.entfarm_phpapps import (  # noqa: E402
    PhpCli,
    groupfolders_delta,
    nextcloud_code_version,
    nextcloud_plan,
    parse_json_output,
    run_module,
    settings_delta,
)

# Nextcloud's own view of its state: config.php's installed flag and version.
STATUS_PHP = r"""
$CONFIG = [];
if (is_file($argv[1])) { include $argv[1]; }
echo json_encode(['installed' => !empty($CONFIG['installed']),
                  'version' => isset($CONFIG['version']) ? $CONFIG['version'] : null]), "\n";
"""


class Nextcloud(PhpCli):
    def environment(self) -> dict[str, str]:
        return dict(self.p["environment"], NEXTCLOUD_CONFIG_DIR=self.p["config_dir"])

    def occ(self, *args: str) -> str:
        return self.php([f"{self.p['root']}/occ", "--no-interaction", *args], f"occ {args[0]}")

    def installed(self) -> dict[str, object]:
        code = nextcloud_code_version(self.version_php())
        status = parse_json_output(
            self.php(["-r", STATUS_PHP, "--", os.path.join(self.p["config_dir"], "config.php")],
                     "reading config.php"), "config.php")
        assert isinstance(status, dict)
        action = nextcloud_plan(bool(status["installed"]), status.get("version"), code)
        result: dict[str, object] = {"action": action, "version": code,
                                     "installed_version": status.get("version"),
                                     "changed": action != "none"}
        if self.module.check_mode or action == "none":
            return result
        if action == "install":
            self.occ("maintenance:install",
                     *[f"--{k}={v}" for k, v in sorted(self.p["install_options"].items())])
        else:
            self.occ("maintenance:mode", "--on")
            # A failed upgrade leaves maintenance on: the instance stays closed until restored.
            self.occ("upgrade")
            self.occ("maintenance:mode", "--off")
        return result

    def apps(self) -> dict[str, object]:
        listed = parse_json_output(self.occ("app:list", "--output=json"), "occ app:list")
        enabled = listed.get("enabled", {}) if isinstance(listed, dict) else {}
        missing = [a for a in self.p["apps"] if a not in enabled]
        if missing and not self.module.check_mode:
            self.occ("app:enable", *missing)
        return {"action": missing, "changed": bool(missing)}

    def app_config(self) -> dict[str, object]:
        app = self.p["app"]
        listed = parse_json_output(self.occ("config:list", app, "--private", "--output=json"),
                                   "occ config:list")
        current = ((listed.get("apps") or {}).get(app) or {}) if isinstance(listed, dict) else {}
        delta = settings_delta(current, {**self.p["settings"], **self.p["secret_settings"]})
        if not self.module.check_mode:
            for key, value in sorted(delta.items()):
                self.occ("config:app:set", app, key, f"--value={value}")
        return {"action": sorted(delta), "changed": bool(delta)}

    def groupfolders(self) -> dict[str, object]:
        listed = parse_json_output(self.occ("groupfolders:list", "--output=json"),
                                   "occ groupfolders:list")
        commands = groupfolders_delta(listed, self.p["groupfolders"])
        if not self.module.check_mode:
            created: dict[str, str] = {}
            for command in commands:
                args = [created.get(a, a) for a in command]
                out = self.occ(*args)
                if command[0] == "groupfolders:create":
                    created[f"@{command[1]}"] = out.strip().splitlines()[-1].strip()
        return {"action": commands, "changed": bool(commands)}


ARGUMENTS: dict[str, dict[str, Any]] = {
    "config_dir": {"type": "path", "required": True},
    "state": {"type": "str", "default": "installed",
              "choices": ["installed", "apps", "app_config", "groupfolders"]},
    "install_options": {"type": "dict", "default": {}, "no_log": True},
    "apps": {"type": "list", "elements": "str", "default": []},
    "app": {"type": "str"},
    "settings": {"type": "dict", "default": {}},
    "secret_settings": {"type": "dict", "default": {}, "no_log": True},
    "groupfolders": {"type": "list", "elements": "dict", "default": []},
}


def main() -> None:
    run_module(Nextcloud, ARGUMENTS, required_if=[("state", "app_config", ["app"])])


if __name__ == "__main__":
    main()
