"""The portal on the deployed lab: two gunicorn nodes behind the edge, CAS single sign-on, the
page a person sees, sessions that any node serves, and logout.

Every request goes through the published edge on 127.0.0.1 presenting the public name (SNI and
Host), as a browser resolving *.test to the loopback would, with the farm CA; the nodes
themselves are reached with docker exec.
"""

from __future__ import annotations

import html
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import identity_helpers as helpers
import pytest
from identity_helpers import ROOT, Account, Browser, Cas, Response, on_host, ticket_of

from entfarm.model import Farm

pytestmark = pytest.mark.lab

# The shared fixtures (identity_helpers), as fixtures of this module.
imported = helpers.imported
cas = helpers.cas

NODES = ("portal-1", "portal-2")
COOKIE = "__Host-entfarm-portail"
EDGE_FAIL_TIMEOUT = 11  # roles/proxy: max_fails=1 fail_timeout=10s, plus a second


def container(farm: Farm, node: str) -> str:
    return farm.container_name(node)


def portal_fact(farm: Farm, node: str) -> dict[str, Any]:
    out = on_host(container(farm, node), "cat /etc/ansible/facts.d/portal.fact")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def node_get(farm: Farm, node: str, path: str, host: str,
             cookies: dict[str, str] | None = None) -> tuple[int, str]:
    """GET straight from one node's gunicorn (inside its container), bypassing the edge."""
    bind = portal_fact(farm, node)["bind"]
    cookie = "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())
    cmd = (f"curl -sS --max-time 15 -o /dev/stdout -w '\\n%{{http_code}}' "
           f"-H {shlex.quote('Host: ' + host)} "
           + (f"-H {shlex.quote('Cookie: ' + cookie)} " if cookie else "")
           + shlex.quote(f"http://{bind}{path}"))
    out = on_host(container(farm, node), cmd)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


def site_url(farm: Farm, name: str) -> str:
    return farm.public_url(name)


def portal_cookies(browser: Browser) -> dict[str, str]:
    return {COOKIE: browser.cookies[COOKIE]}


def login(cas: Cas, browser: Browser, site: str, account: Account) -> Response:
    """Open the portal anonymously, log in at the CAS, come back with the ticket: the home page."""
    first = browser.request("GET", site)
    assert first.status == 302, (first.status, first.body[:300])
    assert first.location.startswith(cas.portal), first.location
    service = parse_qs(urlsplit(first.location).query)["service"][0]
    assert service == site + "connexion", service
    answer = cas.login(browser, service, account.login, account.code)
    ticket = ticket_of(answer, service)
    assert ticket is not None, helpers.portal_message(answer)
    back = browser.request("GET", answer.location)  # /connexion?ticket=ST-…
    assert back.status == 302, (back.status, back.body[:500])
    assert back.location == site, back.location  # the ticket leaves the URL at once
    assert COOKIE in browser.cookies
    home = browser.request("GET", site)
    assert home.status == 200, (home.status, home.body[:500])
    return home


def tile_labels(farm: Farm, profile: str) -> tuple[set[str], set[str]]:
    """Labels of the tiles a profile sees, and of those it does not."""
    tiles = farm.portal_tiles()
    seen = {t["label"] for t in tiles if profile in t["profiles"]}
    return seen, {t["label"] for t in tiles} - seen


def etab_name(farm: Farm, uai: str) -> str:
    return next(e.name for e in farm.spec.etablissements if e.uai == uai)


def departement_site(farm: Farm, uai: str) -> str:
    code = next(e.departement for e in farm.spec.etablissements if e.uai == uai)
    return site_url(farm, next(d.domain for d in farm.spec.departements if d.code == code))


@pytest.fixture(scope="module")
def portal_up(deployed_lab: Any, lab_farm: Farm) -> Farm:
    return lab_farm


# -- the nodes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("node", NODES)
def test_healthz_on_each_node(portal_up: Farm, node: str) -> None:
    fact = portal_fact(portal_up, node)
    status, body = node_get(portal_up, node, "/healthz", "portail.ent.test")
    assert status == 200, body
    assert json.loads(body) == {"status": "ok", "version": fact["version"]}
    active = on_host(container(portal_up, node), "systemctl is-active entfarm-portal")
    assert active.stdout.strip() == "active"


@pytest.mark.parametrize("name", ["portail.ent.test", "indre.ent.test"])
def test_healthz_through_the_edge(portal_up: Farm, cas: Cas, name: str) -> None:
    answer = Browser(cas.ctx).request("GET", site_url(portal_up, name) + "healthz")
    assert answer.status == 200, answer.body[:300]
    assert json.loads(answer.body)["status"] == "ok"


def test_anonymous_visit_goes_to_cas_with_the_hosts_service(portal_up: Farm, cas: Cas) -> None:
    for name in ("portail.ent.test", "indre.ent.test", "loiret.ent.test"):
        site = site_url(portal_up, name)
        answer = Browser(cas.ctx).request("GET", site)
        assert answer.status == 302
        query = parse_qs(urlsplit(answer.location).query)
        assert answer.location.startswith(cas.portal + "cas/login?"), answer.location
        assert query["service"] == [site + "connexion"]


def test_nodes_resolve_public_names_to_the_edge(portal_up: Farm) -> None:
    edge = on_host(container(portal_up, "edge"), "hostname -i").stdout.split()
    for node in NODES:
        out = on_host(container(portal_up, node), "getent hosts cas.ent.test")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] in edge, (out.stdout, edge)


# -- people --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eleve(portal_up: Farm, cas: Cas,
          imported: dict[str, list[Account]]) -> tuple[Account, Browser, Response]:
    account = imported["élève"][0]
    browser = Browser(cas.ctx)
    home = login(cas, browser, site_url(portal_up, "portail.ent.test"), account)
    return account, browser, home


def test_eleve_sees_their_college_and_their_tiles(
        portal_up: Farm, eleve: tuple[Account, Browser, Response]) -> None:
    account, _, home = eleve
    text = html.unescape(home.body)
    assert account.display_name in text
    assert etab_name(portal_up, account.uai) in text
    shown, hidden = tile_labels(portal_up, "eleve")
    assert shown and all(label in text for label in shown), shown
    assert hidden and not any(label in text for label in hidden), hidden


def test_parent_on_their_departements_domain_sees_their_childrens_colleges(
        portal_up: Farm, cas: Cas, imported: dict[str, list[Account]]) -> None:
    account = imported["parent"][0]
    site = departement_site(portal_up, account.uai)
    browser = Browser(cas.ctx)
    home = login(cas, browser, site, account)
    text = html.unescape(home.body)
    assert account.display_name in text
    assert etab_name(portal_up, account.uai) in text
    dep = next(d for d in portal_up.spec.departements if site == site_url(portal_up, d.domain))
    assert dep.branding.name in text  # the branding follows the host
    shown, hidden = tile_labels(portal_up, "parent")
    assert shown and all(label in text for label in shown), shown
    assert hidden and not any(label in text for label in hidden), hidden


def test_any_node_serves_the_session(portal_up: Farm,
                                     eleve: tuple[Account, Browser, Response]) -> None:
    account, browser, _ = eleve
    for node in NODES:
        name = f"portail.ent.test:{portal_up.public_https_port}"
        status, body = node_get(portal_up, node, "/", name, portal_cookies(browser))
        assert status == 200, (node, status, body[:300])
        assert account.display_name in html.unescape(body), node


@pytest.fixture()
def one_node_stopped(portal_up: Farm) -> Iterator[Any]:
    started: list[str] = []

    def stop(node: str) -> None:
        out = on_host(container(portal_up, node), "systemctl stop entfarm-portal")
        assert out.returncode == 0, out.stderr
        started.append(node)

    yield stop
    for node in started:
        on_host(container(portal_up, node), "systemctl start entfarm-portal")
        wait_until_healthy(portal_up, node)
    # nginx keeps a backend that refused a connection out of its upstream for fail_timeout
    # (10 s): let it come back before the next test.
    time.sleep(EDGE_FAIL_TIMEOUT)


def wait_until_healthy(farm: Farm, node: str, tries: int = 30) -> None:
    for _ in range(tries):
        ok = on_host(container(farm, node),
                     f"curl -fsS --max-time 5 http://{portal_fact(farm, node)['bind']}/healthz")
        if ok.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"{node} did not come back")


def test_session_survives_either_node_going_away(
        portal_up: Farm, eleve: tuple[Account, Browser, Response], one_node_stopped: Any) -> None:
    """No sticky sessions: with one node stopped, the edge sends every request to the other,
    which serves the same cookie; then the same with the other node."""
    account, browser, _ = eleve
    site = site_url(portal_up, "portail.ent.test")
    for node in NODES:
        one_node_stopped(node)
        for _ in range(3):
            page = browser.request("GET", site)
            assert page.status == 200, (node, page.status, page.location)
            assert account.display_name in html.unescape(page.body)
        on_host(container(portal_up, node), "systemctl start entfarm-portal")
        wait_until_healthy(portal_up, node)
        time.sleep(EDGE_FAIL_TIMEOUT)  # until the edge takes it back (see one_node_stopped)


def test_logout_ends_the_cas_session(portal_up: Farm, cas: Cas,
                                     imported: dict[str, list[Account]]) -> None:
    account = imported["élève"][1] if len(imported["élève"]) > 1 else imported["élève"][0]
    site = site_url(portal_up, "portail.ent.test")
    browser = Browser(cas.ctx)
    login(cas, browser, site, account)
    out = browser.request("GET", site + "deconnexion")
    assert out.status == 302
    assert out.location.startswith(cas.portal + "cas/logout?"), out.location
    assert parse_qs(urlsplit(out.location).query)["service"] == [site + "deconnecte"]
    assert not browser.cookies.get(COOKIE)
    # The CAS ends its session and sends the browser back to the portal's logged-out page.
    ended = browser.request("GET", out.location)
    ended, _ = browser.follow(ended, out.location, cas.host)
    assert ended.status in (200, 302, 303), ended.status
    if ended.status in (302, 303):
        assert ended.location == site + "deconnecte", ended.location
        assert browser.request("GET", ended.location).status == 200
    # A new visit asks for the password again: no ticket from the old SSO session.
    again = browser.request("GET", site)
    assert again.status == 302
    service = parse_qs(urlsplit(again.location).query)["service"][0]
    assert cas.ticket_for(browser, service) is None
    page, _ = browser.follow(browser.request("GET", again.location), again.location, cas.host)
    assert 'name="password"' in page.body, helpers.portal_message(page)


# -- the nodes' logs and the edge's --------------------------------------------------------------


def test_no_ticket_in_any_log(portal_up: Farm, eleve: tuple[Account, Browser, Response]) -> None:
    for node in NODES:
        out = on_host(container(portal_up, node),
                      "journalctl -u entfarm-portal --no-pager -o cat | grep -c 'ST-' || true")
        assert out.stdout.strip() == "0", node
    # Access logs only: nginx's error log quotes the request line of a failed proxying.
    edge = on_host(container(portal_up, "edge"),
                   "cat /var/log/nginx/*access.log | grep -c 'ticket=' || true")
    assert edge.stdout.strip() == "0"
    logged = on_host(container(portal_up, "edge"),
                     "grep -h ' /connexion ' /var/log/nginx/entfarm-portal.access.log | tail -1")
    assert logged.stdout.strip(), "no /connexion request in the portal's access log"


def test_verify_suite_passes_against_lab(portal_up: Farm) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(portal_up.inventory_dir),
         "portal"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
