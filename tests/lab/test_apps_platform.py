"""Moodle, Nextcloud and OnlyOffice on the deployed lab: their platform layer, without their
releases (which cannot be downloaded on these machines).

The lab's artifact store holds no Moodle, Nextcloud or DocumentServer release: each role must
converge everything up to the application code, say once which artifact is missing, and its
verify suite must pass its platform checks and report every application check as
"not verifiable: artifact missing" — never as passed. Idempotence and check mode are those of
the whole site (tests/lab/test_site_deploy.py), which includes these roles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from xml.etree import ElementTree

import pytest

from entfarm.model import Farm
from entfarm.runner import RunResult, project_root

pytestmark = pytest.mark.lab

ROOT = project_root()
APPS = {"moodle": "Moodle", "nextcloud": "Nextcloud", "onlyoffice": "OnlyOffice DocumentServer"}
# The checks each suite must skip as "not verifiable: artifact missing" in the lab, and the
# platform checks that must pass there.
APP_CHECKS = {
    "moodle": {"test_release_current_and_database_up_to_date", "test_sign_in_goes_to_the_cas",
               "test_etablissements_have_their_category_and_cohort"},
    "nextcloud": {"test_installed_up_to_date_and_open", "test_apps_enabled",
                  "test_each_etablissement_has_its_group_folder"},
    "onlyoffice": {"test_services_running",
                   "test_local_json_signs_every_direction_with_the_farms_secret"},
}
PLATFORM_CHECKS = {
    "moodle": {"test_pool_runs_as_the_app_user", "test_configuration_tests",
               "test_data_and_config_private", "test_site_answers_from_the_farm_network",
               "test_database_reachable_from_the_app_host",
               "test_redis_reachable_from_the_app_host", "test_timer_active",
               "test_config_imposes_cas_redis_and_the_data_directory"},
    "nextcloud": {"test_pool_runs_as_the_app_user", "test_configuration_tests",
                  "test_data_and_config_private", "test_site_answers_from_the_farm_network",
                  "test_database_reachable_from_the_app_host",
                  "test_redis_reachable_from_the_app_host", "test_timer_active",
                  "test_onlyoffice_secret_is_the_farms"},
    "onlyoffice": {"test_jwt_secret_is_the_farms_and_private",
                   "test_site_answers_from_the_farm_network",
                   "test_database_reachable_from_the_host"},
}


OUTCOME = re.compile(r"roles/(\w+)/verify/test_\w+\.py::(\w+)\[[^\]]*\] (PASSED|SKIPPED|FAILED)")


@pytest.fixture(scope="module")
def placed(deployed_lab: RunResult, lab_farm: Farm) -> list[str]:
    missing = [app for app in APPS if app not in lab_farm.spec.services]
    if missing:
        pytest.skip(f"not verifiable: the lab farm does not place {', '.join(missing)}")
    if any(app in lab_farm.spec.artifacts.sources for app in APPS):
        pytest.skip("not verifiable: this lab declares application releases; the test is "
                    "about a store without them")
    return list(APPS)


@pytest.fixture(scope="module")
def verify_report(placed: list[str], lab_farm: Farm) -> dict[str, dict[str, str]]:
    """Outcome of every check of the three suites, by suite and test name ("passed",
    "skipped: <reason>", "failed"), read from the run's JUnit report."""
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(lab_farm.inventory_dir),
         *placed],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    report = re.search(r"verify report: (\S+)", proc.stdout)
    assert report, proc.stdout[-2000:]
    outcomes: dict[str, dict[str, str]] = {app: {} for app in placed}
    for case in ElementTree.parse(report[1]).iter("testcase"):
        app = case.get("classname", "").split(".")[1]
        name, _, target = case.get("name", "").partition("[")
        # Only the service's own hosts: the others skip every check as "not applicable".
        if target.removeprefix("ansible://").rstrip("]") not in lab_farm.spec.services[app].hosts:
            continue
        skipped, failed = case.find("skipped"), case.find("failure")
        outcomes[app][name] = ("failed" if failed is not None else
                               f"skipped: {skipped.get('message')}" if skipped is not None
                               else "passed")
    return outcomes


@pytest.mark.parametrize("app", list(APPS))
def test_platform_checks_pass(verify_report: dict[str, dict[str, str]], app: str) -> None:
    outcomes = verify_report[app]
    not_passed = {t: outcomes.get(t) for t in PLATFORM_CHECKS[app] if outcomes.get(t) != "passed"}
    assert not not_passed, not_passed


@pytest.mark.parametrize("app", list(APPS))
def test_application_checks_are_not_verifiable_never_passed(
        verify_report: dict[str, dict[str, str]], app: str) -> None:
    outcomes = verify_report[app]
    for check in APP_CHECKS[app]:
        outcome = outcomes.get(check) or ""
        assert outcome.startswith("skipped: not verifiable: artifact missing"), (check, outcome)
    # Nothing else of the suite is left unverified in the lab, and nothing fails.
    others = {t: o for t, o in outcomes.items() if t not in APP_CHECKS[app] and o != "passed"}
    assert not others, others


def test_each_role_says_once_which_artifact_is_missing(placed: list[str],
                                                     deployed_lab: RunResult) -> None:
    """Read from the session's first deploy (tests/lab/test_site_deploy.py checks that the next
    one changes nothing and that check mode reports nothing): no extra run in CI."""
    messages = []
    with (deployed_lab.run_dir / "events.jsonl").open(encoding="utf-8") as events:
        for line in events:
            text = json.dumps(json.loads(line))
            # One event per task result (its message may appear more than once in it).
            messages += set(re.findall(r"artifact '([\w-]+)' missing from the artifact store",
                                       text))
    assert sorted(set(messages)) == sorted(placed), messages
    assert all(messages.count(app) == 1 for app in placed), messages


def test_sites_show_the_maintenance_page_through_the_edge(placed: list[str],
                                                          lab_farm: Farm) -> None:
    import http.client
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(lab_farm.secrets_dir / "pki" / "ca.crt"))
    for app in placed:
        name = lab_farm.public_names(app)[0]
        conn = http.client.HTTPSConnection(name, lab_farm.lab.publish.https, context=ctx,
                                           timeout=15)
        conn.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", lab_farm.lab.publish.https), timeout=15),
            server_hostname=name)
        conn.request("GET", "/", headers={"Host": name})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        assert response.status == 503, (app, response.status)
        assert "maintenance" in body.lower() and response.getheader("Retry-After"), app
