"""Checks of the etherpad role, runnable against any inventory.

    pytest roles/etherpad/verify --hosts=ansible://etherpad \
        --ansible-inventory=inventories/lab/farm.yml

Each Etherpad node: its release installed and current, its settings private and accepted by the
role's check (which also opens a TLS connection to the database), Etherpad running sandboxed as
its own user on the farm address only, without IP logging. Then, end to end: a pad created
through the HTTP API (the API key is read on the host, inside the command, never by this
suite), read back through the edge as a user logged in through the CAS, and refused to an
anonymous request (a redirect to the CAS). The pad is removed afterwards: the only trace a run
leaves is the CAS session of the verification account.

The login uses ENTFARM_VERIFY_LOGIN / ENTFARM_VERIFY_PASSWORD (an account whose profile may use
Etherpad); without them those checks are "not verifiable".
"""

from __future__ import annotations

import json
import os
import re
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from entfarm.casclient import Browser, CasClient, CasClientError, portal_message, ticket_of
from entfarm.verifylib import inventory_vars, q, release_tests, role_suite, systemd_exposure

UNIT = "entfarm-etherpad"
CHECK = "/usr/local/sbin/entfarm-etherpad-check"
# Etherpad's log lines that carry a client address (webaccess.js, PadMessageHandler.js).
IP_LOG = re.compile(r"from IP [0-9a-fA-F.:]{3,}|\bIP:[0-9a-fA-F.:]{3,}")

_hosts_only, fact = role_suite("etherpad", group="etherpad")


def api(host: Any, method: str, **params: str) -> dict[str, Any]:
    """One call of Etherpad's HTTP API (version 1), made on the node with the key read there."""
    info = fact(host)
    script = (
        "import json,sys,urllib.parse,urllib.request\n"
        "key=open(sys.argv[1]).read().strip()\n"
        "args=dict(json.loads(sys.argv[4]),apikey=key)\n"
        "data=urllib.parse.urlencode(args).encode()\n"
        "url='http://'+sys.argv[2]+'/api/1/'+sys.argv[3]\n"
        "print(urllib.request.urlopen(url,data=data,timeout=20).read().decode())\n"
    )
    cmd = host.run(f"python3 -c {q(script)} {q(info['api_key_file'])} {q(info['bind'])} "
                   f"{q(method)} {q(json.dumps(params))}")
    assert cmd.rc == 0, f"API {method}: {cmd.stderr.strip()[-400:]}"
    answer: dict[str, Any] = json.loads(cmd.stdout)
    return answer


test_fact_present, test_release_is_current_and_complete = release_tests(fact)


def test_dependencies_inside_src(host: Any) -> None:
    info = fact(host)
    # Dependencies inside src/ (the client-side loader serves browser libraries from there).
    assert host.file(f"{info['root']}/current/src/node_modules/security/package.json").exists
    link = host.file(f"{info['root']}/current/node_modules/ep_etherpad-lite")
    assert link.is_symlink and link.linked_to == f"{info['root']}/releases/{info['release']}/src"


def test_settings_accepted_by_the_check(host: Any) -> None:
    info = fact(host)
    cmd = host.run(f"{CHECK} {q(info['root'] + '/current')} {q(info['config_file'])}")
    assert cmd.rc == 0, cmd.stderr
    assert cmd.stdout.startswith("ok: ") and "over TLS" in cmd.stdout


def test_settings_are_private_to_etherpad(host: Any) -> None:
    info = fact(host)
    directory = info["config_file"].rsplit("/", 1)[0]
    d = host.file(directory)
    assert d.user == "root" and d.group == info["user"] and d.mode == 0o750
    for path in (info["config_file"], info["api_key_file"], f"{directory}/SESSIONKEY.txt"):
        f = host.file(path)
        assert f.exists, path
        assert (f.user, f.group, f.mode) == ("root", info["user"], 0o640), path
    assert len(host.file(info["api_key_file"]).content_string.strip()) >= 32


def test_settings_keep_ip_addresses_out_and_sso_only(host: Any) -> None:
    info = fact(host)
    settings = json.loads(host.file(info["config_file"]).content_string)
    assert settings["disableIPlogging"] is True
    assert settings["trustProxy"] is True
    assert settings["requireAuthentication"] is True
    assert settings["users"] == {}
    assert settings["dbType"] == "postgres" and "sslmode=verify-full" in settings["dbSettings"]
    # At INFO, Etherpad 1.8 logs client addresses on authentication whatever disableIPlogging.
    assert settings["loglevel"] in ("WARN", "ERROR"), settings["loglevel"]


def test_no_ip_address_in_the_journal(host: Any) -> None:
    cmd = host.run(f"journalctl -u {UNIT} --no-pager -o cat -n 5000")
    if cmd.rc != 0:
        pytest.skip(f"not verifiable: journalctl failed: {cmd.stderr.strip()}")
    found = [line for line in cmd.stdout.splitlines() if IP_LOG.search(line)]
    assert not found, f"client addresses logged: {found[:3]}"


def test_service_runs_as_its_user(host: Any) -> None:
    svc = host.service(UNIT)
    assert svc.is_enabled
    assert svc.is_running
    main_user = host.run(f"ps -o user= -p $(systemctl show -p MainPID --value {UNIT})")
    assert main_user.stdout.strip() == fact(host)["user"]


def test_listens_on_the_farm_address_only(host: Any) -> None:
    bind = fact(host)["bind"]
    address, port = bind.rsplit(":", 1)
    assert address not in ("0.0.0.0", "::", "127.0.0.1")
    assert host.socket(f"tcp://{bind}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


def test_sandboxed(host: Any) -> None:
    score, last = systemd_exposure(host, UNIT)
    # As the portal's bound, although Etherpad cannot have MemoryDenyWriteExecute (V8's JIT):
    # 1.3 in the lab.
    assert score <= 2.0, last


# -- end to end: the HTTP API, the edge, the CAS -------------------------------------------------


@pytest.fixture()
def pad(host: Any) -> Iterator[tuple[str, str]]:
    """A pad created through the HTTP API: (pad id, its text); deleted afterwards."""
    pad_id = f"entfarm-verify-{secrets.token_hex(6)}"
    text = f"Vérification entfarm {secrets.token_hex(4)}"
    answer = api(host, "createPad", padID=pad_id, text=text)
    assert answer["code"] == 0, answer
    try:
        yield pad_id, text
    finally:
        api(host, "deletePad", padID=pad_id)


def _edge(host: Any) -> tuple[ssl.SSLContext, str | None]:
    """TLS context trusting the farm CA, and where the controller reaches the edge."""
    variables = inventory_vars(host)
    ca = Path(variables.get("entfarm_secrets_dir", "")) / "pki" / "ca.crt"
    ctx = (ssl.create_default_context(cafile=str(ca)) if ca.is_file()
           else ssl.create_default_context())
    # The lab's public names do not resolve: its edge is published on the loopback.
    return ctx, "127.0.0.1" if variables.get("entfarm_farm_kind") == "lab" else None


def test_pad_created_through_the_api_reads_back(host: Any, pad: tuple[str, str]) -> None:
    pad_id, text = pad
    answer = api(host, "getText", padID=pad_id)
    assert answer["code"] == 0 and answer["data"]["text"].strip() == text, answer


def test_anonymous_request_is_sent_to_the_cas(host: Any, pad: tuple[str, str]) -> None:
    info = fact(host)
    ctx, connect_to = _edge(host)
    url = f"{info['url']}p/{quote(pad[0])}/export/txt"
    answer = Browser(ctx, connect_to).request("GET", url)
    assert answer.status == 302, (answer.status, answer.body[:200])
    login = urlsplit(answer.location)
    assert f"{login.scheme}://{login.netloc}{login.path}" == info["cas_url"] + "login"
    assert parse_qs(login.query)["service"] == [url]
    assert pad[1] not in answer.body


def test_logged_in_user_reads_the_pad_through_the_edge(host: Any, pad: tuple[str, str]) -> None:
    login = os.environ.get("ENTFARM_VERIFY_LOGIN")
    password = os.environ.get("ENTFARM_VERIFY_PASSWORD")
    if not login or not password:
        pytest.skip("not verifiable: set ENTFARM_VERIFY_LOGIN and ENTFARM_VERIFY_PASSWORD "
                    "(an account whose profile may use Etherpad)")
    info = fact(host)
    ctx, connect_to = _edge(host)
    cas = CasClient(info["cas_url"].removesuffix("cas/"), ctx, connect_to)
    browser = cas.browser()
    url = f"{info['url']}p/{quote(pad[0])}/export/txt"
    try:
        first = browser.request("GET", url)
        assert first.status == 302 and first.location.startswith(info["cas_url"] + "login?")
        answer = cas.login(browser, url, login, password)
        ticket = ticket_of(answer, url)
        assert ticket, f"no service ticket for {url}: {portal_message(answer)}"
        # Etherpad validates the ticket with the CAS, opens the session, drops the ticket.
        back = browser.request("GET", answer.location)
        assert back.status == 302 and back.location == url, (back.status, back.body[:300])
        export = browser.request("GET", url)
        # No one is an Etherpad administrator: refused, not sent round the CAS again.
        admin = browser.request("GET", f"{info['url']}admin/")
    except CasClientError as exc:
        pytest.fail(f"through the edge: {exc}")
    assert export.status == 200, (export.status, export.body[:300])
    assert export.body.strip() == pad[1]
    assert admin.status == 403, (admin.status, admin.location)
