"""Etherpad on the deployed lab: the deploy converges it (and a second run changes nothing), its
verify suite passes with an imported élève's login, a parent is refused, and in a real browser an
élève goes from the portal's Etherpad tile to a pad through the CAS, types, and the text is saved.

The browser is the portal browser test's (Debian's headless Chromium through chromedriver, every
*.test name at 127.0.0.1, the farm CA trusted in a throwaway NSS database). Screenshots go to
test-artifacts/etherpad-browser/.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import identity_helpers as helpers
import pytest
import test_portal_browser as portal_browser
from identity_helpers import Account
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from test_portal_browser import has, log_in, site_of, wait_for

from entfarm.casclient import CasClient
from entfarm.model import Farm
from entfarm.runner import RunResult, project_root, run_playbook

pytestmark = pytest.mark.lab

ROOT = project_root()
ARTIFACTS = ROOT / "test-artifacts" / "etherpad-browser"
FACT = "/etc/ansible/facts.d/etherpad.fact"

imported = helpers.imported
# The portal browser test's browser (module fixtures of this module too).
farm_ca = portal_browser.farm_ca
browser_home = portal_browser.browser_home
new_browser = portal_browser.new_browser
cas_host = portal_browser.cas_host
portal_up = portal_browser.portal_up


def _describe(result: RunResult) -> str:
    return "\n".join([f"run directory {result.run_dir}"]
                     + [f"{f['host']} | {f['task']}: {f['message']}" for f in result.failures])


def _exec(farm: Farm, host: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", farm.container_name(host), *argv],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def etherpad_host(deployed_lab: RunResult, lab_farm: Farm) -> str:
    placement = lab_farm.spec.services.get("etherpad")
    if not placement:
        pytest.skip("not verifiable: the lab farm places no etherpad")
    return placement.hosts[0]


@pytest.fixture(scope="module")
def fact(etherpad_host: str, lab_farm: Farm) -> dict[str, Any]:
    out = _exec(lab_farm, etherpad_host, ["cat", FACT])
    assert out.returncode == 0, f"{FACT} missing on {etherpad_host}: {out.stderr}"
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def api(farm: Farm, host: str, method: str, **params: str) -> dict[str, Any]:
    """Etherpad's HTTP API (1.2.15, Etherpad 1.8's latest) on the node, the key read there."""
    script = ("import json,sys,urllib.parse,urllib.request\n"
              "info=json.load(open(sys.argv[1]))\n"
              "args=dict(json.loads(sys.argv[3]),apikey=open(info['api_key_file']).read().strip())\n"
              "url='http://'+info['bind']+'/api/1.2.15/'+sys.argv[2]\n"
              "print(urllib.request.urlopen(url,data=urllib.parse.urlencode(args).encode(),"
              "timeout=20).read().decode())\n")
    out = _exec(farm, host, ["python3", "-c", script, FACT, method, json.dumps(params)])
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


# -- deploy ------------------------------------------------------------------------------------


def test_deploy_converged_etherpad(deployed_lab: RunResult, etherpad_host: str,
                                   fact: dict[str, Any]) -> None:
    assert etherpad_host in deployed_lab.hosts
    assert fact["version"] == "1.8.14", fact
    assert fact["url"].startswith("https://pad.")


def test_second_converge_changes_nothing_on_the_etherpad_host(etherpad_host: str,
                                                              lab_farm: Farm) -> None:
    # The role's play alone: test_site_deploy runs the whole second deploy and its check mode.
    again = run_playbook(lab_farm, "playbooks/apps.yml", limit=etherpad_host, tags="etherpad")
    assert again.exit_code == 0, _describe(again)
    assert again.changed_hosts == [], f"changed {again.changed_hosts}; see {again.run_dir}"
    check = run_playbook(lab_farm, "playbooks/apps.yml", limit=etherpad_host, tags="etherpad",
                         check=True, diff=True)
    assert check.exit_code == 0, _describe(check)
    assert check.changed_hosts == [], f"check mode reports changes; see {check.run_dir}"


# -- the verify suite, and who gets in ------------------------------------------------------------


@pytest.fixture(scope="module")
def eleve(imported: dict[str, list[Account]]) -> Account:
    # test_identity_e2e uses the first three élèves (one for its brute-force lock), the portal
    # browser test the fourth.
    assert len(imported["élève"]) > 5, "too few imported élèves"
    return imported["élève"][5]


def test_verify_suite_passes(etherpad_host: str, lab_farm: Farm,
                             imported: dict[str, list[Account]]) -> None:
    account = imported["élève"][4]
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(lab_farm.inventory_dir),
         "etherpad"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
                 ENTFARM_VERIFY_LOGIN=account.login, ENTFARM_VERIFY_PASSWORD=account.code),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    unverifiable = [line for line in proc.stdout.splitlines() if "not verifiable" in line]
    assert unverifiable == [], "\n".join(unverifiable)


def _ticketed(fact: dict[str, Any], farm: Farm, account: Account) -> tuple[Any, Any]:
    """A browser logged in to the CAS as ``account`` for Etherpad's home, and the CAS's
    answer: the redirect to Etherpad with the ticket, not followed yet."""
    ctx = ssl.create_default_context(cafile=str(farm.secrets_dir / "pki" / "ca.crt"))
    cas = CasClient(fact["cas_url"].removesuffix("cas/"), ctx, "127.0.0.1")
    browser = cas.browser()
    answer = cas.login(browser, fact["url"], account.login, account.code)
    assert answer.status in (302, 303) and "ticket=" in answer.location, answer.status
    return browser, answer


def test_a_parent_is_refused(fact: dict[str, Any], lab_farm: Farm,
                             imported: dict[str, list[Account]]) -> None:
    """The Etherpad tile is not a parent's: the CAS gives a ticket, Etherpad refuses the person."""
    assert "parent" not in fact["profiles"]
    browser, answer = _ticketed(fact, lab_farm, imported["parent"][0])
    refused = browser.request("GET", answer.location)
    assert refused.status == 403, (refused.status, refused.body[:300])
    assert "Accès refusé" in refused.body
    again = browser.request("GET", fact["url"])
    assert again.status == 302 and again.location.startswith(fact["cas_url"] + "login")


# -- établissement pads: <UAI>.<name> opens to that établissement's people only -------------------


def _signed_in(fact: dict[str, Any], farm: Farm, account: Account) -> Any:
    """A browser with an Etherpad session of ``account`` (CAS login for Etherpad's home)."""
    browser, answer = _ticketed(fact, farm, account)
    back = browser.request("GET", answer.location)
    assert back.status == 302 and back.location == fact["url"], (back.status, back.body[:300])
    return browser


def test_etablissement_pads_open_to_their_people_only(
        fact: dict[str, Any], lab_farm: Farm, etherpad_host: str,
        imported: dict[str, list[Account]]) -> None:
    from entfarm.uai import check_letter

    onboarded = [e.uai for e in lab_farm.spec.etablissements]
    assert sorted(fact["tenants"]) == sorted(onboarded), fact["tenants"]
    account = imported["élève"][6]
    other = next(u for u in onboarded if u != account.uai)
    stem = "0369999"
    closed = stem + check_letter(stem)  # a valid UAI the farm does not have
    browser = _signed_in(fact, lab_farm, account)
    mine = browser.request("GET", f"{fact['url']}p/{account.uai}.conseil")
    assert mine.status == 200, (mine.status, mine.body[:300])
    theirs = browser.request("GET", f"{fact['url']}p/{other}.conseil")
    assert theirs.status == 403 and f"l’établissement {other}" in theirs.body, theirs.status
    unopened = browser.request("GET", f"{fact['url']}p/{closed}.conseil/export/txt")
    assert unopened.status == 403 and "ne sont pas ouverts" in unopened.body, unopened.status
    # Any other pad name stays open to every allowed profile.
    plain = browser.request("GET", f"{fact['url']}p/entfarm-test-{secrets.token_hex(4)}")
    assert plain.status == 200, plain.status

    # Taken out of the list (what a wave's tag run writes): closed at once, no restart.
    since = _exec(lab_farm, etherpad_host,
                  ["systemctl", "show", "-p", "ActiveEnterTimestampMonotonic",
                   "entfarm-etherpad"]).stdout
    rest = [u for u in onboarded if u != account.uai]
    shut = run_playbook(lab_farm, "playbooks/apps.yml", limit=etherpad_host,
                        tags="etherpad:tenants", extravars={"etherpad__tenants": rest})
    try:
        assert shut.exit_code == 0, _describe(shut)
        assert shut.changed_hosts == [etherpad_host]
        refused = browser.request("GET", f"{fact['url']}p/{account.uai}.conseil")
        assert refused.status == 403 and "ne sont pas ouverts" in refused.body, refused.status
    finally:
        again = run_playbook(lab_farm, "playbooks/apps.yml", limit=etherpad_host,
                             tags="etherpad:tenants")
    assert again.exit_code == 0, _describe(again)
    assert browser.request("GET", f"{fact['url']}p/{account.uai}.conseil").status == 200
    after = _exec(lab_farm, etherpad_host,
                  ["systemctl", "show", "-p", "ActiveEnterTimestampMonotonic",
                   "entfarm-etherpad"]).stdout
    assert after == since, "Etherpad restarted for a change of its tenants"


# -- the browser: portal tile -> CAS -> pad --------------------------------------------------------


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    return path


def test_eleve_opens_a_pad_from_the_portal_and_types(
    portal_up: str, new_browser: Callable[[], WebDriver], lab_farm: Farm, cas_host: str,
    eleve: Account, etherpad_host: str, fact: dict[str, Any],
) -> None:
    driver = new_browser()
    log_in(driver, site_of(lab_farm, eleve.uai), cas_host, eleve)
    tile = driver.find_element(By.CSS_SELECTOR, "li.tuile[data-service='etherpad'] a")
    tile.click()
    pad_host = urlsplit(fact["url"]).hostname
    # Single sign-on: the CAS session of the portal login hands Etherpad a ticket at once.
    wait_for(driver, "Etherpad's home page",
             lambda d: urlsplit(d.current_url).hostname == pad_host and has(d, "#padname"))
    assert "ticket=" not in driver.current_url
    screenshot(driver, "01-etherpad-home")
    pad_id = f"entfarm-lab-{secrets.token_hex(4)}"
    field = driver.find_element(By.CSS_SELECTOR, "#padname")
    field.send_keys(pad_id)
    field.send_keys(Keys.ENTER)
    wait_for(driver, "the pad page", lambda d: urlsplit(d.current_url).path == f"/p/{pad_id}")
    # The editor is two iframes deep; it exists only once the client-side modules loaded.
    outer = wait_for(driver, "the editor", lambda d: d.find_element(
        By.CSS_SELECTOR, "iframe[name='ace_outer']"))
    # The pad knows the person by the displayName the CAS released.
    wait_for(driver, "the user's name in the pad", lambda d: d.execute_script(
        "return (window.clientVars || {}).userName") == eleve.display_name)
    driver.switch_to.frame(outer)
    inner = wait_for(driver, "the editor's inner frame", lambda d: d.find_element(
        By.CSS_SELECTOR, "iframe[name='ace_inner']"))
    driver.switch_to.frame(inner)
    body = wait_for(driver, "the editable text", lambda d: d.find_element(
        By.CSS_SELECTOR, "#innerdocbody[contenteditable='true']"))
    text = f"Bonjour depuis le lab {secrets.token_hex(3)}"
    body.click()
    body.send_keys(Keys.CONTROL, "a")
    body.send_keys(text)
    driver.switch_to.default_content()
    screenshot(driver, "02-pad-typed")
    try:
        saved = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = api(lab_farm, etherpad_host, "getText", padID=pad_id)
            saved = answer.get("data", {}).get("text", "") if answer["code"] == 0 else ""
            if text in saved:
                break
            time.sleep(1)
        assert text in saved, f"pad {pad_id} holds {saved!r}, not the typed text"
        authors = api(lab_farm, etherpad_host, "listAuthorsOfPad", padID=pad_id)
        names = [api(lab_farm, etherpad_host, "getAuthorName", authorID=a)["data"]
                 for a in authors["data"]["authorIDs"]]
        assert eleve.display_name in names, names
    finally:
        api(lab_farm, etherpad_host, "deletePad", padID=pad_id)
