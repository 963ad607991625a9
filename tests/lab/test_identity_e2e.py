"""Identity end to end on the deployed lab: an AAF export imported into the directory, then an
élève, a parent and a teacher log in through CAS over HTTPS at the edge, as a browser would, and
the service validates their tickets (CAS 3.0, /cas/p3/serviceValidate) with their attributes.

The directory's own refusals (anonymous search, service accounts and userPassword) are in
test_directory.py; here only what the imported people add to them.
"""

from __future__ import annotations

import re
import shlex
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import identity_helpers as helpers
import pytest
from identity_helpers import (
    CAS_NS,
    PROFILES,
    Account,
    Browser,
    Cas,
    attributes,
    ldap_root_search,
    on_idp,
    portal_message,
    read_fact,
    ticket_of,
)

from entfarm.model import Farm

# The shared fixtures (identity_helpers), as fixtures of this module; kept importable from here
# for the lab tests that take them from this module, with Account, Browser and ldap_root_search.
imported = helpers.imported
cas = helpers.cas
__all__ = ["Account", "Browser", "cas", "imported", "ldap_root_search"]

pytestmark = pytest.mark.lab

UNREGISTERED_SERVICE = "https://evil.example/"


@pytest.fixture(scope="module")
def services(deployed_lab: Any) -> list[str]:
    """Registered service URLs, Etherpad's first (a service of the lab that runs for real)."""
    registry = read_fact("cas")["services"]
    names = sorted(registry, key=lambda n: (n != "etherpad", n))
    urls = [str(u) for n in names for u in registry[n]["urls"]]
    assert len(urls) >= 2, registry
    return urls


@pytest.fixture(scope="module")
def sessions(cas: Cas, services: list[str],
             imported: dict[str, list[Account]]) -> Iterator[dict[str, tuple[Account, Browser]]]:
    """One logged-in browser per profile (the first login of each account)."""
    opened: dict[str, tuple[Account, Browser]] = {}
    failures = []
    for label in PROFILES:
        account = imported[label][0]
        browser = Browser(cas.ctx)
        answer = cas.login(browser, services[0], account.login, account.code)
        if ticket_of(answer, services[0]) is None:
            failures.append(f"{label} {account.login}: {portal_message(answer)}")
        opened[label] = (account, browser)
    assert not failures, "logins refused: " + "; ".join(failures)
    yield opened


# -- logins ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(PROFILES))
def test_login_then_service_validates_ticket_with_attributes(
    cas: Cas, services: list[str], sessions: dict[str, tuple[Account, Browser]], label: str,
) -> None:
    account, browser = sessions[label]
    service = services[0]
    ticket = cas.ticket_for(browser, service)
    assert ticket is not None and ticket.startswith("ST-"), "no ticket from the open session"
    reply = cas.validate(service, ticket)
    success = reply.find("cas:authenticationSuccess", CAS_NS)
    assert success is not None, ET.tostring(reply, encoding="unicode")
    assert success.findtext("cas:user", namespaces=CAS_NS) == account.login
    attrs = attributes(success)
    assert attrs.get("uid") == [account.login]
    assert PROFILES[label] in attrs.get("ENTPersonProfils", [])
    assert attrs.get("displayName") == [account.display_name]
    uais = attrs.get("ENTStructureUAI", []) + attrs.get("ENTEtablissementsUAI", [])
    assert account.uai in uais, attrs
    assert not {"userPassword", "ENTPersonCodeActivation"} & set(attrs)
    if label == "parent":  # each child as the portal shows it: <UAI>$<display name>
        children = attrs.get("ENTAuxPersRelEleveEnfants", [])
        assert children and all(re.match(r"^[0-9]{7}[A-Z]\$\S", c) for c in children), attrs


def test_ticket_is_single_use(cas: Cas, services: list[str],
                              sessions: dict[str, tuple[Account, Browser]]) -> None:
    _account, browser = sessions["élève"]
    ticket = cas.ticket_for(browser, services[0])
    assert ticket is not None
    assert cas.validate(services[0], ticket).find("cas:authenticationSuccess", CAS_NS) is not None
    again = cas.validate(services[0], ticket)
    assert again.find("cas:authenticationSuccess", CAS_NS) is None
    assert again.find("cas:authenticationFailure", CAS_NS) is not None


def test_ticket_for_one_service_fails_for_another(
    cas: Cas, services: list[str], sessions: dict[str, tuple[Account, Browser]],
) -> None:
    _account, browser = sessions["enseignant"]
    other = next(u for u in services if urlsplit(u).hostname != urlsplit(services[0]).hostname)
    ticket = cas.ticket_for(browser, services[0])
    assert ticket is not None
    reply = cas.validate(other, ticket)
    assert reply.find("cas:authenticationSuccess", CAS_NS) is None
    failure = reply.find("cas:authenticationFailure", CAS_NS)
    assert failure is not None
    assert failure.get("code") == "INVALID_SERVICE", failure.get("code")


def test_unregistered_service_gets_no_ticket_even_logged_in(
    cas: Cas, sessions: dict[str, tuple[Account, Browser]],
) -> None:
    _account, browser = sessions["parent"]
    url = cas.login_url(UNREGISTERED_SERVICE)
    answer = browser.follow(browser.request("GET", url), url, cas.host)[0]
    assert ticket_of(answer, UNREGISTERED_SERVICE) is None
    assert not answer.location.startswith(UNREGISTERED_SERVICE)
    # Refused, not merely asked to log in: the session is open.
    assert 'name="password"' not in answer.body, portal_message(answer)
    assert "ST-" not in answer.body


def test_wrong_password_gets_no_ticket(cas: Cas, services: list[str],
                                       imported: dict[str, list[Account]]) -> None:
    # Another élève than the one of the sessions: brute-force protection counts failures.
    account = imported["élève"][1]
    answer = cas.login(Browser(cas.ctx), services[0], account.login, account.code + "x")
    assert ticket_of(answer, services[0]) is None
    assert not answer.location.startswith(services[0])
    assert 'name="password"' in answer.body, portal_message(answer)


def test_unknown_account_gets_no_ticket(cas: Cas, services: list[str], deployed_lab: Any) -> None:
    answer = cas.login(Browser(cas.ctx), services[0], "personne.inconnue", "nimporte-quoi")
    assert ticket_of(answer, services[0]) is None


# -- the directory, for the imported people ------------------------------------------------------


def test_cas_account_reads_an_imported_person_but_not_its_secrets(
    lab_farm: Farm, imported: dict[str, list[Account]],
) -> None:
    directory = read_fact("directory")
    ca = read_fact("pki")["ca"]
    password = (lab_farm.secrets_dir / "directory" / "cas.password").read_text().strip()
    login = imported["élève"][0].login
    out = on_idp(
        f"LDAPTLS_CACERT={shlex.quote(ca)} ldapsearch -x -LLL -o ldif-wrap=no "
        f"-H {shlex.quote(directory['uri'])} -D {shlex.quote(directory['services']['cas'])} "
        f"-y /dev/stdin -b {shlex.quote('ou=people,' + directory['base_dn'])} "
        f"{shlex.quote(f'(uid={login})')} uid ENTPersonProfils "
        "userPassword ENTPersonCodeActivation",
        stdin=password,
    )
    assert out.returncode == 0, out.stderr
    assert f"uid: {login}" in out.stdout
    assert "ENTPersonProfils: National_ELV" in out.stdout
    assert "userPassword" not in out.stdout
    assert "ENTPersonCodeActivation" not in out.stdout
    anonymous = on_idp(f"ldapsearch -x -LLL -H ldap://localhost/ -b "
                       f"{shlex.quote(directory['base_dn'])} {shlex.quote(f'(uid={login})')} uid")
    assert login not in anonymous.stdout


# -- brute force and logout ------------------------------------------------------------------------


def test_failed_logins_lock_the_account_for_a_while(
    cas: Cas, services: list[str], imported: dict[str, list[Account]],
) -> None:
    """After cas__brute_force_max_failed failures even the right password is refused, until
    cas__brute_force_tempo seconds have passed."""
    deployed = read_fact("cas")
    assert deployed["brute_force_protection"] is True
    max_failed, tempo = deployed["brute_force_max_failed"], deployed["brute_force_tempo"]
    account = imported["élève"][2]  # an account no other test uses
    for _ in range(max_failed):
        wrong = cas.login(Browser(cas.ctx), services[0], account.login, account.code + "x")
        assert ticket_of(wrong, services[0]) is None
    started = time.monotonic()
    locked = cas.login(Browser(cas.ctx), services[0], account.login, account.code)
    assert ticket_of(locked, services[0]) is None, "the right password got through the lock"
    time.sleep(max(0.0, tempo + 3 - (time.monotonic() - started)))
    answer = cas.login(Browser(cas.ctx), services[0], account.login, account.code)
    assert ticket_of(answer, services[0]) is not None, portal_message(answer)


def test_cas_logout_ends_the_sso_session(
    cas: Cas, services: list[str], imported: dict[str, list[Account]],
) -> None:
    account = imported["enseignant"][1]  # its own session: the shared ones stay open
    browser = Browser(cas.ctx)
    answer = cas.login(browser, services[0], account.login, account.code)
    assert ticket_of(answer, services[0]) is not None, portal_message(answer)
    assert cas.ticket_for(browser, services[1]) is not None  # single sign-on: no form again
    url = urljoin(cas.portal, "cas/logout")
    out = browser.request("GET", url)
    assert out.status in (200, 302, 303), out.status
    # The session is over: a service now gets the login form, not a ticket.
    assert cas.ticket_for(browser, services[0]) is None
    page_url = cas.login_url(services[0])
    page = browser.follow(browser.request("GET", page_url), page_url, cas.host)[0]
    assert 'name="password"' in page.body, portal_message(page)
