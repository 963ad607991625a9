"""Checks of the onlyoffice role, runnable against any inventory.

    entfarm verify onlyoffice  (pytest roles/onlyoffice/verify --hosts=ansible://onlyoffice …)

With or without the package: the JWT secret on the host is the farm's (compared by digest),
private to root, the site answers the edge (the maintenance page until DocumentServer is
installed), and the database is reachable from the host. Then DocumentServer itself, only with
its package installed (otherwise "not verifiable: artifact missing"): its services running, its
health check answering, local.json with the farm's secret on every direction.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from entfarm.verifylib import (
    artifact_installed,
    controller_secret,
    http_get_from,
    inventory_vars,
    other_host,
    postgresql_login_from,
    role_suite,
)

_hosts_only, fact = role_suite("onlyoffice", group="onlyoffice")


def test_jwt_secret_is_the_farms_and_private(host: Any) -> None:
    info = fact(host)
    secret = controller_secret(host, "onlyoffice/jwt_secret")
    with host.sudo():
        f = host.file(info["jwt_secret_file"])
        assert (f.user, f.group, f.mode) == ("root", "root", 0o600)
        digest = hashlib.sha256(f.content_string.strip().encode()).hexdigest()
    assert digest == hashlib.sha256(secret.encode()).hexdigest()


def test_site_answers_from_the_farm_network(host: Any) -> None:
    info = fact(host)
    edges = inventory_vars(host)["groups"].get("proxy", [])
    edge = other_host(host, edges[0]) if edges else host
    status, body = http_get_from(edge, f"http://{info['bind']}/healthcheck", info["public_name"])
    if info["state"] == "installed":
        assert (status, body.strip()) == (200, "true"), (status, body[:200])
    else:
        assert status == 503 and "service en maintenance" in body, (status, body[:300])


def test_database_reachable_from_the_host(host: Any) -> None:
    database = fact(host)["database"]
    password = controller_secret(host, f"postgresql/{database['user']}.password")
    result = postgresql_login_from(host, database, password)
    assert result.get("stage") == "ok", result


# -- DocumentServer itself: only with its package ----------------------------------------------


def test_services_running(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    for unit in info["units"]:
        assert host.service(unit).is_running, unit


def test_local_json_signs_every_direction_with_the_farms_secret(host: Any) -> None:
    info = fact(host)
    artifact_installed(info)
    secret = controller_secret(host, "onlyoffice/jwt_secret")
    with host.sudo():
        settings = json.loads(host.file(info["local_json"]).content_string)
    co = settings["services"]["CoAuthoring"]
    assert co["token"]["enable"] == {"browser": True, "request": {"inbox": True, "outbox": True}}
    assert {co["secret"][k]["string"] for k in ("browser", "inbox", "outbox")} == {secret}
