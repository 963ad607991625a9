"""Read-only checks of the cas role (LemonLDAP::NG CAS server), runnable against any inventory.

    pytest roles/cas/verify --hosts=ansible://all --ansible-inventory=inventories/lab/farm.yml

Every probe runs on the CAS host against its local nginx (127.0.0.1:80, Host = the public
name), with the names and the service registry the role wrote to /etc/ansible/facts.d/cas.fact.
No account logs in and nothing is written: end-to-end logins are the lab tests' business.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from entfarm.verifylib import role_suite

UNREGISTERED_SERVICE = "https://evil.example/"
PORTAL_SERVICE = "lemonldap-ng-fastcgi-server"


_hosts_only, fact = role_suite("cas", group="cas")


def registered_service(host: Any) -> str:
    services = fact(host)["services"]
    urls = [u for _name, spec in sorted(services.items()) for u in spec["urls"]]
    if not urls:
        pytest.skip("not verifiable: no service registered on this CAS server")
    return str(urls[0])


def get(host: Any, path: str) -> tuple[int, dict[str, str], str]:
    """GET on the local nginx as the edge would send it: status, headers (lower-case), body."""
    name = fact(host)["public_name"]
    cmd = host.run(
        "curl -sS --max-time 20 -D - -H " + shlex.quote(f"Host: {name}")
        + " -H 'X-Forwarded-Proto: https' " + shlex.quote(f"http://127.0.0.1{path}")
    )
    assert cmd.rc == 0, f"curl {path}: {cmd.stderr}"
    head, _, body = cmd.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def has_login_form(body: str) -> bool:
    return bool(re.search(r'<input[^>]+name="user"', body)
                and re.search(r'<input[^>]+name="password"', body))


def test_portal_and_nginx_running(host: Any) -> None:
    for name in (PORTAL_SERVICE, "nginx"):
        service = host.service(name)
        assert service.is_running, f"{name} is not running"
        assert service.is_enabled, f"{name} is not enabled"


def test_portal_answers_in_french(host: Any) -> None:
    status, _headers, body = get(host, "/")
    assert status == 200
    assert re.search(r'<html[^>]*\slang="fr"', body), "the portal page is not in French"
    assert has_login_form(body)


def test_cas_login_shows_the_form_for_a_registered_service(host: Any) -> None:
    service = registered_service(host)
    status, headers, body = get(host, "/cas/login?" + urlencode({"service": service}))
    assert status == 200, headers.get("location")
    assert has_login_form(body)


def test_unregistered_service_gets_no_ticket(host: Any) -> None:
    status, headers, body = get(host, "/cas/login?" + urlencode({"service": UNREGISTERED_SERVICE}))
    location = headers.get("location", "")
    assert "ticket=" not in location
    assert not location.startswith(UNREGISTERED_SERVICE)
    assert "ST-" not in body
    assert status in (200, 400, 403, 404)


def test_unknown_ticket_fails_validation(host: Any) -> None:
    query = urlencode({"service": registered_service(host), "ticket": "ST-entfarm-verify-bogus"})
    status, _headers, body = get(host, "/cas/p3/serviceValidate?" + query)
    assert status == 200
    assert "<cas:authenticationFailure" in body
    assert "<cas:authenticationSuccess" not in body


def test_configuration_is_the_only_lmconf_and_valid_json(host: Any) -> None:
    data = fact(host)
    path = str(data["config_file"])
    config = host.file(path)
    assert config.exists, f"{path} missing"
    listing = host.run(f"ls -1 {shlex.quote(str(Path(path).parent))}")
    lmconfs = sorted(n for n in listing.stdout.split() if n.startswith("lmConf-"))
    assert lmconfs == [Path(path).name]
    # The file holds the key and the bind password: never let its content reach a report.
    try:
        conf = json.loads(config.content_string)
    except ValueError:
        pytest.fail(f"{path} is not valid JSON")
    cfg_num, cas_on, policy = (conf.get("cfgNum"), conf.get("issuerDBCASActivation"),
                               conf.get("casAccessControlPolicy"))
    strict = conf.get("casStrictMatching")
    del conf
    assert cfg_num == data["config_number"]
    assert cas_on == 1
    assert policy in ("error", "faketicket")
    assert strict == 1


def test_manager_not_installed_nor_served(host: Any) -> None:
    assert not host.package("lemonldap-ng-manager").is_installed
    assert not host.package("liblemonldap-ng-manager-perl").is_installed
    assert get(host, "/manager.psgi")[0] == 404
    for endpoint in ("config", "sessions", "adminSessions", "notification"):
        status = get(host, f"/index.psgi/{endpoint}")[0]
        assert status in (403, 404), f"/{endpoint} answered {status}"


def test_configuration_secret_not_world_readable(host: Any) -> None:
    config = host.file(str(fact(host)["config_file"]))
    assert config.user == "root"
    assert config.group == "www-data"
    assert config.mode & 0o007 == 0, oct(config.mode)


def test_controller_secret_files_private(host: Any) -> None:
    if host.backend.NAME != "ansible":
        pytest.skip("not verifiable: secrets not on this controller (no inventory given)")
    secrets = host.ansible.get_variables().get("entfarm_secrets_dir")
    cas_dir = Path(str(secrets)) / "cas" if secrets else None
    if cas_dir is None or not cas_dir.is_dir():
        pytest.skip("not verifiable: the CAS secrets are not on this controller")
    assert stat.S_IMODE(cas_dir.stat().st_mode) & 0o077 == 0
    files = [p for p in cas_dir.iterdir() if p.is_file()]
    assert files, f"no secret in {cas_dir}"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} readable by others"
