"""The decisions of our modules for PHP applications (plugins/module_utils/entfarm_phpapps.py,
used by moodle_cli and nextcloud_occ) and the PHP config filters (plugins/filter/entfarm_php.py):
what they read from the releases and the CLIs, and which installs and upgrades they refuse."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


apps = _load("entfarm_phpapps", ROOT / "plugins/module_utils/entfarm_phpapps.py")
php = _load("entfarm_php_filters", ROOT / "plugins/filter/entfarm_php.py")

MOODLE_45 = """<?php
defined('MOODLE_INTERNAL') || die();
$version  = 2024100703.00;              // 20241007      = branching date YYYYMMDD - do not modify!
$release  = '4.5.3 (Build: 20250317)'; // Human-friendly version name
$branch   = '405';                     // This version's branch.
$maturity = MATURITY_STABLE;             // This version's maturity level.
"""

NEXTCLOUD_30 = """<?php
$OC_Version = array(30,0,6,2);
$OC_VersionString = '30.0.6';
$OC_Edition = '';
$OC_Channel = 'stable';
"""


# -- Moodle -----------------------------------------------------------------------------------


def test_moodle_version_php_is_read() -> None:
    assert apps.moodle_code_version(MOODLE_45) == {
        "version": "2024100703.00", "release": "4.5.3 (Build: 20250317)", "branch": "405"}


def test_not_a_moodle_release_is_refused() -> None:
    with pytest.raises(apps.PlanError, match="not a Moodle release"):
        apps.moodle_code_version("<?php\n$OC_Version = array(30,0,6,2);\n")


@pytest.mark.parametrize(("installed", "db", "code", "expected"), [
    (False, None, "2024100703.00", "install"),
    (True, "2024100703.00", "2024100703.00", "none"),
    (True, "2024100703", "2024100703.00", "none"),          # same decimal, written differently
    (True, "2024100700.05", "2024100703.00", "upgrade"),    # a 4.5 point release
    (True, "2022112802.00", "2024100703.00", "upgrade"),    # 4.1 LTS -> 4.5 LTS
])
def test_moodle_plan(installed: bool, db: str | None, code: str, expected: str) -> None:
    assert apps.moodle_plan(installed, db, code, "2022112802") == expected


def test_moodle_downgrade_is_refused() -> None:
    with pytest.raises(apps.PlanError, match="cannot downgrade"):
        apps.moodle_plan(True, "2024100703.00", "2024100700.05", "2022112802")


def test_moodle_upgrade_from_too_old_is_refused() -> None:
    # Moodle 3.11 cannot reach 4.5 directly: the intermediate LTS first.
    with pytest.raises(apps.PlanError, match="intermediate LTS"):
        apps.moodle_plan(True, "2021051700.00", "2024100703.00", "2022112802")


# -- Nextcloud --------------------------------------------------------------------------------


def test_nextcloud_version_php_is_read() -> None:
    assert apps.nextcloud_code_version(NEXTCLOUD_30) == "30.0.6.2"
    assert apps.nextcloud_code_version("<?php $OC_Version = [31, 0, 0, 9];") == "31.0.0.9"


@pytest.mark.parametrize(("installed", "have", "code", "expected"), [
    (False, None, "30.0.6.2", "install"),
    (True, "30.0.6.2", "30.0.6.2", "none"),
    (True, "30.0.4.1", "30.0.6.2", "upgrade"),
    (True, "29.0.9.2", "30.0.6.2", "upgrade"),              # one major
])
def test_nextcloud_plan(installed: bool, have: str | None, code: str, expected: str) -> None:
    assert apps.nextcloud_plan(installed, have, code) == expected


def test_nextcloud_skipping_a_major_is_refused() -> None:
    with pytest.raises(apps.PlanError, match=r"one major at a time \(install a 29 release first\)"):
        apps.nextcloud_plan(True, "28.0.14.1", "30.0.6.2")


def test_nextcloud_downgrade_is_refused() -> None:
    with pytest.raises(apps.PlanError, match="cannot downgrade"):
        apps.nextcloud_plan(True, "30.0.6.2", "30.0.4.1")


# -- CLI output -------------------------------------------------------------------------------


def test_json_after_php_warnings_is_read() -> None:
    text = "PHP Warning:  Module \"apcu\" is already loaded in Unknown on line 0\n" \
           '{"installed":true,"version":"30.0.6.2"}\n'
    assert apps.parse_json_output(text, "occ status") == {"installed": True,
                                                           "version": "30.0.6.2"}


def test_output_without_json_is_an_error_naming_the_command() -> None:
    with pytest.raises(apps.PlanError, match="occ app:list printed no JSON"):
        apps.parse_json_output("Nextcloud is not installed", "occ app:list")


def test_settings_delta_compares_as_the_clis_store() -> None:
    current = {"cas_force_login": "1", "cas_server_port": "443", "other": "kept"}
    desired = {"cas_force_login": True, "cas_server_port": 443, "cas_server_path": "/cas"}
    assert apps.settings_delta(current, desired) == {"cas_server_path": "/cas"}
    assert apps.settings_delta({"x": "0"}, {"x": True}) == {"x": "1"}


def test_groupfolders_created_with_quota_and_group() -> None:
    desired = [{"mount_point": "Collège A (0360005K)", "quota": 1073741824,
                "groups": ["0360005K"]}]
    assert apps.groupfolders_delta([], desired) == [
        ["groupfolders:create", "Collège A (0360005K)"],
        ["groupfolders:quota", "@Collège A (0360005K)", "1073741824"],
        ["groupfolders:group", "@Collège A (0360005K)", "0360005K"],
        ["groupfolders:group", "@Collège A (0360005K)", "0360005K", "read", "write", "share",
         "delete"],
    ]


def test_groupfolders_in_place_change_nothing_and_a_quota_is_corrected() -> None:
    desired = [{"mount_point": "A", "quota": 10, "groups": ["g"]}]
    # Both shapes of `groupfolders:list --output=json` (a list, or a mapping by id).
    assert apps.groupfolders_delta([{"id": 3, "mount_point": "A", "quota": 10,
                                     "groups": {"g": 31}}], desired) == []
    assert apps.groupfolders_delta({"3": {"id": 3, "mount_point": "A", "quota": 5,
                                          "groups": {"g": {"displayName": "g",
                                                           "permissions": 31}}}},
                                   desired) == [["groupfolders:quota", "3", "10"]]


# -- PHP literals -----------------------------------------------------------------------------


def test_to_php_escapes_what_would_break_out_of_a_string() -> None:
    assert php.to_php("it's a \\ test") == "'it\\'s a \\\\ test'"
    assert php.to_php("'; system('id'); //") == "'\\'; system(\\'id\\'); //'"
    assert php.to_php({"a": [1, True, None]}) == (
        "[\n  'a' => [\n    1,\n    true,\n    null,\n  ],\n]")


def test_moodle_config_php_sets_cfg_then_requires_setup() -> None:
    text = php.moodle_config_php({"dbtype": "pgsql", "dboptions": {"dbport": 5432}},
                                 "/opt/entfarm-moodle/current/lib/setup.php")
    lines = text.splitlines()
    assert lines[0] == "<?php"
    assert "$CFG->dbtype = 'pgsql';" in lines
    assert lines[-1] == "require_once('/opt/entfarm-moodle/current/lib/setup.php');"


@pytest.mark.skipif(shutil.which("php") is None, reason="not verifiable: no php on this machine")
def test_rendered_php_parses_and_round_trips() -> None:
    settings: dict[str, Any] = {"dbpassword": "a'b\\c\"$x{y}", "redis": {"port": 6379,
                                "ssl_context": {"verify_peer_name": True}}, "list": ["x", 1.5]}
    script = php.nextcloud_config_php(settings) + "echo json_encode($CONFIG);\n"
    out = subprocess.run(["php"], input=script, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == settings


# -- the modules themselves, with a fake AnsibleModule (no PHP, no Ansible run) ------------------

# The modules import our shared code as Ansible ships it to hosts.
sys.modules["ansible.module_utils.entfarm_phpapps"] = apps
MODULES = {name: _load(name, ROOT / "plugins/modules" / f"{name}.py")
           for name in ("moodle_cli", "nextcloud_occ")}


class FakeModule:
    """What the modules use of AnsibleModule; run_command answers from ``answers`` (by the
    first words after php) and records every command."""

    def __init__(self, params: dict[str, Any], answers: dict[str, str],
                 check_mode: bool = False) -> None:
        self.params = params
        self.check_mode = check_mode
        self.answers = answers
        self.commands: list[list[str]] = []

    def run_command(self, cmd: list[str], **_: Any) -> tuple[int, str, str]:
        self.commands.append(cmd)
        words = cmd[cmd.index("--") + 2:]
        for prefix, answer in self.answers.items():
            if " ".join(words).startswith(prefix) or (prefix == "-r" and words[0] == "-r"):
                return 0, answer, ""
        return 0, "", ""


def _nextcloud(tmp_path: Path, installed_version: str | None, check_mode: bool = False,
               ) -> FakeModule:
    (tmp_path / "version.php").write_text(NEXTCLOUD_30)
    status = json.dumps({"installed": installed_version is not None,
                         "version": installed_version})
    params = {"root": str(tmp_path), "config_dir": "/cfg", "php": "/usr/bin/php8.2",
              "user": "entfarm-nextcloud", "environment": {}, "install_options": {"a": "b"}}
    return FakeModule(params, {"-r": status}, check_mode)


def test_nextcloud_refuses_a_skipped_major_before_running_occ(tmp_path: Path) -> None:
    module = _nextcloud(tmp_path, "28.0.14.1")
    with pytest.raises(apps.PlanError, match="skips a major"):
        MODULES["nextcloud_occ"].Nextcloud(module).installed()
    assert all("/occ" not in " ".join(c) for c in module.commands), module.commands


def test_nextcloud_upgrade_runs_in_maintenance_mode_as_the_user(tmp_path: Path) -> None:
    module = _nextcloud(tmp_path, "29.0.9.2")
    result = MODULES["nextcloud_occ"].Nextcloud(module).installed()
    assert result["action"] == "upgrade" and result["changed"]
    occ = [c[c.index("--no-interaction") + 1:] for c in module.commands if "--no-interaction" in c]
    assert occ == [["maintenance:mode", "--on"], ["upgrade"], ["maintenance:mode", "--off"]]
    assert all(c[:4] == ["runuser", "-u", "entfarm-nextcloud", "--"] for c in module.commands)


def test_check_mode_reports_the_install_without_running_it(tmp_path: Path) -> None:
    module = _nextcloud(tmp_path, None, check_mode=True)
    result = MODULES["nextcloud_occ"].Nextcloud(module).installed()
    assert result == {"action": "install", "version": "30.0.6.2", "installed_version": None,
                      "changed": True}
    assert len(module.commands) == 1  # reading config.php only


def test_moodle_installs_an_empty_database_with_the_cli(tmp_path: Path) -> None:
    (tmp_path / "version.php").write_text(MOODLE_45)
    params = {"root": str(tmp_path), "config": "/etc/entfarm-moodle/config.php",
              "php": "/usr/bin/php8.2", "user": "entfarm-moodle", "environment": {},
              "min_upgrade_from": "2022112802", "install_options": {"lang": "fr"}}
    module = FakeModule(params, {"-r": '{"installed": false, "db_version": null}'})
    result = MODULES["moodle_cli"].Moodle(module).installed()
    assert result["action"] == "install"
    assert module.commands[-1][4:] == ["/usr/bin/php8.2",
                                       f"{tmp_path}/admin/cli/install_database.php",
                                       "--agree-license", "--lang=fr"]


@pytest.mark.parametrize("name", ["moodle_cli", "nextcloud_occ"])
def test_module_documentation_matches_its_arguments(name: str) -> None:
    source = (ROOT / "plugins/modules" / f"{name}.py").read_text()
    doc = yaml.safe_load(MODULES[name].DOCUMENTATION)
    fragment = _load("entfarm_phpapp_doc", ROOT / "plugins/doc_fragments/entfarm_phpapp.py")
    assert doc["extends_documentation_fragment"] == ["entfarm_phpapp"]
    assert set(yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)["options"]) == set(
        apps.COMMON_ARGUMENTS)
    assert set(doc["options"]) == set(MODULES[name].ARGUMENTS)
    assert "no_log" in source  # the install options carry passwords
