"""Checks of the moodle role, runnable against any inventory.

    entfarm verify moodle      (pytest roles/moodle/verify --hosts=ansible://moodle …)

The platform, which holds with or without the release: PHP-FPM's pool running as Moodle's user
with OPcache, configurations accepted by php-fpm -t, nginx -t and php -l, moodledata private
and outside the web root, the site answering the edge (the maintenance page until Moodle is
installed), the database and Redis reachable from the Moodle host with its credentials, the
cron timer. Then Moodle itself, only with its release installed (otherwise "not verifiable:
artifact missing"): no pending upgrade, maintenance off, sign-in sent to the CAS, and the
établissements' categories and cohorts in place.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from entfarm.verifylib import (
    artifact_installed,
    http_get_from,
    inventory_vars,
    other_host,
    php_platform_tests,
    q,
    role_suite,
)

_hosts_only, fact = role_suite("moodle", group="moodle")

# The platform checks (pool, configurations, data, site, database, Redis, timer).
globals().update(php_platform_tests(fact, "Moodle"))


def _php(host: Any, info: dict[str, Any], args: str) -> Any:
    return host.run(f"runuser -u {q(info['user'])} -- env PGSSLMODE=verify-full "
                    f"PGSSLROOTCERT=/usr/local/share/ca-certificates/entfarm-ca.crt "
                    f"php{info['php_version']} {args}")


def test_config_imposes_cas_redis_and_the_data_directory(host: Any) -> None:
    info = fact(host)
    with host.sudo():
        text = host.file(info["config_file"]).content_string
    assert "$CFG->auth = 'cas';" in text
    assert f"$CFG->dataroot = '{info['data_dir']}';" in text
    assert "$CFG->session_handler_class = '\\\\core\\\\session\\\\redis';" in text
    assert "'field_map_profile_field_entprofil' => 'ENTPersonProfils'" in text
    assert text.rstrip().endswith(f"require_once('{info['root']}/current/lib/setup.php');")


# -- Moodle itself: only with its release ------------------------------------------------------


def test_release_current_and_database_up_to_date(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    current = host.file(f"{info['root']}/current")
    assert current.linked_to == f"{info['root']}/releases/{info['release']}"
    pending = _php(host, info, f"{info['root']}/current/admin/cli/upgrade.php --is-pending")
    assert pending.rc == 0, f"upgrade pending or failed: {pending.stdout}{pending.stderr}"


def test_sign_in_goes_to_the_cas(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    edge = other_host(host, inventory_vars(host)["groups"]["proxy"][0])
    status, body = http_get_from(edge, f"http://{info['bind']}/login/index.php",
                                 info["public_name"])
    assert status in (302, 303), (status, body[:300])


def test_etablissements_have_their_category_and_cohort(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    if not info["tenants"]:
        pytest.skip("not applicable: no établissement given to the role (moodle__tenants)")
    tenants = [{"uai": uai, "name": uai} for uai in info["tenants"]]
    out = _php(host, info, f"/usr/local/lib/entfarm-moodle/tenants.php {q(info['config_file'])} "
                           f"{q(json.dumps(tenants))} --check")
    assert out.rc == 0, out.stderr
    assert '"changed":false' in out.stdout.replace(" ", ""), out.stdout
