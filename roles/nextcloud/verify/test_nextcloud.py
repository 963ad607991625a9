"""Checks of the nextcloud role, runnable against any inventory.

    entfarm verify nextcloud   (pytest roles/nextcloud/verify --hosts=ansible://nextcloud …)

The platform, which holds with or without the release: PHP-FPM's pool running as Nextcloud's
user with OPcache, configurations accepted by php-fpm -t, nginx -t and php -l, data private and
outside the web root, the site answering the edge (the maintenance page until Nextcloud is
installed), the database and Redis reachable from the Nextcloud host with its credentials, the
background jobs timer, and the OnlyOffice JWT secret equal to the controller's. Then Nextcloud
itself, only with its release installed (otherwise "not verifiable: artifact missing"):
installed, up to date and out of maintenance, its apps enabled, a group folder per
établissement.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from entfarm.verifylib import (
    artifact_installed,
    controller_secret,
    php_platform_tests,
    q,
    role_suite,
)

_hosts_only, fact = role_suite("nextcloud", group="nextcloud")

# The platform checks (pool, configurations, data, site, database, Redis, timer).
globals().update(php_platform_tests(fact, "Nextcloud"))

# Prints a value of the merged configuration's onlyoffice section, hashed: the secret never
# leaves the host in clear.
_JWT_DIGEST = (
    "$CONFIG=[]; include $argv[1];"
    "echo hash('sha256', $CONFIG['onlyoffice']['jwt_secret'] ?? ''), \"\\n\";"
)


def occ(host: Any, info: dict[str, Any], *args: str) -> Any:
    return host.run(
        f"runuser -u {q(info['user'])} -- env NEXTCLOUD_CONFIG_DIR={q(info['config_dir'])} "
        f"PGSSLMODE=verify-full PGSSLROOTCERT=/usr/local/share/ca-certificates/entfarm-ca.crt "
        f"php{info['php_version']} {q(info['root'] + '/current/occ')} "
        + " ".join(q(a) for a in args))


def test_onlyoffice_secret_is_the_farms(host: Any) -> None:
    info = fact(host)
    secret = controller_secret(host, "onlyoffice/jwt_secret")
    with host.sudo():
        out = host.run(f"php{info['php_version']} -r {q(_JWT_DIGEST)} {q(info['config_file'])}")
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(secret.encode()).hexdigest()


# -- Nextcloud itself: only with its release ---------------------------------------------------


def test_installed_up_to_date_and_open(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    out = occ(host, info, "status", "--output=json")
    assert out.rc == 0, out.stderr
    status = json.loads(out.stdout[out.stdout.index("{"):])
    assert status["installed"] and not status["maintenance"] and not status["needsDbUpgrade"]


def test_apps_enabled(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    out = occ(host, info, "app:list", "--output=json")
    enabled = json.loads(out.stdout[out.stdout.index("{"):])["enabled"]
    wanted = {"user_ldap", "user_cas", "groupfolders", "onlyoffice"} - set(info["apps_missing"])
    assert wanted <= set(enabled), sorted(wanted - set(enabled))


def test_each_etablissement_has_its_group_folder(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    if "groupfolders" in info["apps_missing"]:
        pytest.skip("not verifiable: the groupfolders app is missing from the artifact store")
    if not info["tenants"]:
        pytest.skip("not applicable: no établissement given to the role (nextcloud__tenants)")
    out = occ(host, info, "groupfolders:list", "--output=json")
    listed = json.loads(out.stdout[out.stdout.index("["):] if "[" in out.stdout[:2]
                        else out.stdout[out.stdout.index("{"):])
    folders = listed.values() if isinstance(listed, dict) else listed
    names = " ".join(f["mount_point"] for f in folders)
    missing = [uai for uai in info["tenants"] if f"({uai})" not in names]
    assert not missing, missing
