"""The portal in a real browser: Debian's headless Chromium, driven through Debian's chromedriver
(Selenium), logs in through the CAS as an élève and as a parent, checks what their home page
shows, logs out. Why Selenium and not Playwright: docs/architecture.md, "Browser test".

Every ``*.test`` name resolves to 127.0.0.1 inside the browser (the edge is published there) and
any other name to nothing, so the browser reaches no other address. The farm CA is trusted
through a throwaway NSS database in a temporary HOME, the way a user would import it: no
certificate error is ignored. Screenshots go to test-artifacts/portal-browser/.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import identity_helpers as helpers
import pytest
from identity_helpers import Account, Browser, ldap_root_search
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from entfarm.model import Farm

pytestmark = pytest.mark.lab

# The AAF-imported accounts of the lab tests (identity_helpers), as a fixture of this module.
imported = helpers.imported

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "portal-browser"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver, same source package
CERTUTIL = Path("/usr/bin/certutil")  # libnss3-tools
WAIT = 30.0
# Where the portal's pages put what is checked (entfarm/portal/templates).
ETAB_CARDS = "li.etab"
TILES = "li.tuile[data-service]"


# -- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def farm_ca(lab_farm: Farm) -> Path:
    ca = lab_farm.secrets_dir / "pki" / "ca.crt"
    assert ca.is_file(), f"farm CA certificate missing at {ca}"
    return ca


@pytest.fixture(scope="module")
def browser_home(farm_ca: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME whose NSS database (the one Chromium reads on Linux) trusts the farm CA."""
    for tool in (CHROMIUM, CHROMEDRIVER, CERTUTIL):
        assert tool.is_file(), f"{tool} missing: the set-up installs chromium, " \
            "chromium-driver and libnss3-tools (scripts/lib/bootstrap.sh)"
    versions = [subprocess.run([str(tool), "--version"], capture_output=True, text=True,
                               timeout=30, check=True).stdout.split()[1]
                for tool in (CHROMIUM, CHROMEDRIVER)]
    assert versions[0] == versions[1], f"chromium {versions[0]} but chromedriver {versions[1]}"
    home = tmp_path_factory.mktemp("chromium-home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([str(CERTUTIL), "-N", "-d", f"sql:{nssdb}", "--empty-password"],
                   check=True, capture_output=True, timeout=30)
    # C,,: a CA trusted to issue server certificates, nothing else (no e-mail, no code signing).
    subprocess.run([str(CERTUTIL), "-A", "-d", f"sql:{nssdb}", "-n", "entfarm farm CA",
                    "-t", "C,,", "-i", str(farm_ca)], check=True, capture_output=True, timeout=30)
    return home


@pytest.fixture(scope="module")
def new_browser(browser_home: Path, lab_farm: Farm,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], WebDriver]]:
    """Start a headless Chromium with its own empty profile (no cookie of an earlier test)."""
    drivers: list[WebDriver] = []
    domain = lab_farm.spec.farm.domain

    def start() -> WebDriver:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless=new",
            f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
            # The farm's public names go to the published edge; any other name resolves to
            # nothing, so neither the pages nor Chromium itself reach another address.
            f"--host-resolver-rules=MAP *.{domain} 127.0.0.1, MAP * ~NOTFOUND",
            "--no-proxy-server",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--no-first-run",
            "--no-default-browser-check", "--disable-dev-shm-usage",
            "--window-size=1280,1024", "--lang=fr-FR",
        ):
            options.add_argument(arg)
        options.add_experimental_option("prefs", {"intl.accept_languages": "fr-FR,fr"})
        if os.geteuid() == 0:
            # Chromium's sandbox refuses to run as root (the set-up and CI run as root).
            options.add_argument("--no-sandbox")
        env = {"HOME": str(browser_home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "LANG": "fr_FR.UTF-8"}
        service = Service(executable_path=str(CHROMEDRIVER), env=env)
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(WAIT)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    return path


def _page_replaced(exc: WebDriverException) -> bool:
    """Chrome's word for an element of a page being replaced, when it is not a stale element
    reference: an "unknown error" whose inspector message says the node left the document."""
    return "does not belong to the document" in (exc.msg or "")


def wait_for(driver: WebDriver, what: str, condition: Callable[[WebDriver], Any]) -> Any:
    def check(d: WebDriver) -> Any:
        try:
            return condition(d)
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        except WebDriverException as exc:
            if _page_replaced(exc):
                return False
            raise

    try:
        # A page being replaced by the next one may lose the element a condition is reading:
        # the condition is asked again, until it holds or the wait times out.
        return WebDriverWait(driver, WAIT).until(check)
    except TimeoutException:
        shot = screenshot(driver, "timeout-" + "".join(c if c.isalnum() else "-" for c in what))
        raise AssertionError(f"waited {WAIT:.0f} s for {what}; at {driver.current_url} "
                             f"(screenshot {shot.relative_to(ROOT)})") from None


def has(driver: WebDriver, css: str) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, css))


# -- the lab's portal and people -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cas_host(lab_farm: Farm) -> str:
    return lab_farm.public_names("cas")[0]


@pytest.fixture(scope="module")
def portal_up(deployed_lab: Any, lab_farm: Farm, farm_ca: Path) -> str:
    """The generic portal URL, once its health check answers through the edge."""
    url = lab_farm.public_url(lab_farm.public_names("portal")[0])
    answer = Browser(ssl.create_default_context(cafile=str(farm_ca))).request(
        "GET", url + "healthz")
    assert answer.status == 200, f"{url}healthz: HTTP {answer.status} (is the portal deployed?)"
    return url


def site_of(lab_farm: Farm, uai: str) -> str:
    """The portal URL of the département of an établissement (its branding)."""
    etab = next(e for e in lab_farm.spec.etablissements if e.uai == uai)
    dep = next(d for d in lab_farm.spec.departements if d.code == etab.departement)
    return lab_farm.public_url(dep.domain)


def etab_name(lab_farm: Farm, uai: str) -> str:
    return next((e.name for e in lab_farm.spec.etablissements if e.uai == uai),
                f"Établissement {uai}")


def tiles_for(lab_farm: Farm, profile: str) -> tuple[list[str], set[str]]:
    """Tile ids the profile sees (farm.yml's order) and those it must not see."""
    tiles = lab_farm.portal_tiles()
    shown = [t["id"] for t in tiles if profile in t["profiles"]]
    return shown, {t["id"] for t in tiles} - set(shown)


def children_of(lab_farm: Farm, parent: Account) -> dict[str, list[str]]:
    """UAI -> children's names, from the parent's ENTAuxPersRelEleveEnfants in the directory
    (the values the CAS releases to the portal)."""
    values = ldap_root_search(f"ou=people,{lab_farm.spec.academie.base_dn}",
                              f"(uid={parent.login})", "ENTAuxPersRelEleveEnfants")
    children: dict[str, list[str]] = {}
    for value in values.get("ENTAuxPersRelEleveEnfants", []):
        uai, _, name = value.partition("$")
        children.setdefault(uai, []).append(name)
    return children


@pytest.fixture(scope="module")
def eleve(imported: dict[str, list[Account]]) -> Account:
    # test_identity_e2e uses the first three élèves (one of them for its brute-force lock).
    assert len(imported["élève"]) > 3, "too few imported élèves"
    return imported["élève"][3]


@pytest.fixture(scope="module")
def parent(lab_farm: Farm,
           imported: dict[str, list[Account]]) -> tuple[Account, dict[str, list[str]]]:
    """A parent with children, preferably in two collèges, else with two children."""
    candidates = [(p, children_of(lab_farm, p)) for p in imported["parent"][1:12]]
    candidates = [(p, c) for p, c in candidates if c]
    assert candidates, "no imported parent has ENTAuxPersRelEleveEnfants"
    return max(candidates, key=lambda pc: (len(pc[1]), sum(map(len, pc[1].values()))))


def log_in(driver: WebDriver, url: str, cas_host: str, account: Account) -> None:
    """Open the portal, meet the CAS login form, post the account's credentials, land home."""
    driver.get(url)
    wait_for(driver, "the CAS login form",
             lambda d: urlsplit(d.current_url).hostname == cas_host
             and has(d, "input[name='password']"))
    driver.find_element(By.CSS_SELECTOR, "input[name='user']").send_keys(account.login)
    password = driver.find_element(By.CSS_SELECTOR, "input[name='password']")
    password.send_keys(account.code)
    password.send_keys(Keys.ENTER)
    portal = urlsplit(url).hostname
    wait_for(driver, f"the portal home of {account.profil}",
             lambda d: urlsplit(d.current_url).hostname == portal
             and urlsplit(d.current_url).path == "/" and has(d, "main h1"))
    heading = driver.find_element(By.CSS_SELECTOR, "main h1").text
    assert heading == f"Bonjour {account.display_name}", heading


def shown_tiles(driver: WebDriver) -> list[str]:
    return [str(t.get_attribute("data-service")) for t in driver.find_elements(By.CSS_SELECTOR,
                                                                               TILES)]


def shown_etabs(driver: WebDriver) -> dict[str, list[str]]:
    """Établissement card title -> the children listed in it."""
    cards = {}
    for card in driver.find_elements(By.CSS_SELECTOR, ETAB_CARDS):
        title = card.find_element(By.CSS_SELECTOR, ".carte__titre").text
        cards[title] = [li.text for li in card.find_elements(By.CSS_SELECTOR,
                                                             ".etab__enfants li")]
    return cards


def log_out_then_portal_asks_to_log_in(driver: WebDriver, url: str, cas_host: str,
                                       shot: str) -> None:
    driver.find_element(By.XPATH, "//form[contains(@action, 'deconnexion')]//button").click()
    wait_for(driver, "the end of the logout",
             lambda d: urlsplit(d.current_url).path.rstrip("/") in ("/deconnecte", "/cas/logout")
             or "déconnecté" in d.find_element(By.TAG_NAME, "body").text.lower())
    screenshot(driver, shot)
    # Logged out of the portal and of the CAS: the portal sends the browser to the login form
    # again (an open CAS session would hand out a ticket and land on the home page instead).
    driver.get(url)
    wait_for(driver, "the CAS login form after logout",
             lambda d: urlsplit(d.current_url).hostname == cas_host
             and has(d, "input[name='password']"))
    assert not has(driver, TILES)


# -- the tests ---------------------------------------------------------------------------------


def test_anonymous_visit_shows_the_cas_login_page(
    portal_up: str, new_browser: Callable[[], WebDriver], cas_host: str,
) -> None:
    driver = new_browser()
    driver.get(portal_up)
    wait_for(driver, "the CAS login form",
             lambda d: urlsplit(d.current_url).hostname == cas_host
             and has(d, "input[name='user']") and has(d, "input[name='password']"))
    assert urlsplit(driver.current_url).scheme == "https"
    screenshot(driver, "01-cas-login")


def test_eleve_sees_their_college_and_eleve_tiles_then_logs_out(
    portal_up: str, new_browser: Callable[[], WebDriver], lab_farm: Farm, cas_host: str,
    eleve: Account,
) -> None:
    url = site_of(lab_farm, eleve.uai)
    driver = new_browser()
    log_in(driver, url, cas_host, eleve)
    assert list(shown_etabs(driver)) == [etab_name(lab_farm, eleve.uai)]
    expected, staff_only = tiles_for(lab_farm, "eleve")
    assert staff_only, "farm.yml has no tile an élève must not see: nothing to check"
    assert shown_tiles(driver) == expected
    assert not staff_only & set(shown_tiles(driver))
    screenshot(driver, "02-eleve-home")
    log_out_then_portal_asks_to_log_in(driver, url, cas_host, "04-after-logout")


def test_parent_sees_each_child_under_its_college_then_logs_out(
    portal_up: str, new_browser: Callable[[], WebDriver], lab_farm: Farm, cas_host: str,
    parent: tuple[Account, dict[str, list[str]]],
) -> None:
    account, children = parent
    url = site_of(lab_farm, account.uai)
    driver = new_browser()
    log_in(driver, url, cas_host, account)
    shown = shown_etabs(driver)
    expected = {etab_name(lab_farm, uai): sorted(names) for uai, names in children.items()}
    assert {title: sorted(names) for title, names in shown.items() if names} == expected
    assert set(expected) <= set(shown)
    tiles, others = tiles_for(lab_farm, "parent")
    assert shown_tiles(driver) == tiles
    assert not others & set(shown_tiles(driver))
    screenshot(driver, "03-parent-home")
    log_out_then_portal_asks_to_log_in(driver, url, cas_host, "05-parent-after-logout")


def test_first_tab_focuses_the_skip_link(
    portal_up: str, new_browser: Callable[[], WebDriver], lab_farm: Farm, cas_host: str,
    eleve: Account,
) -> None:
    driver = new_browser()
    log_in(driver, site_of(lab_farm, eleve.uai), cas_host, eleve)
    ActionChains(driver).send_keys(Keys.TAB).perform()
    focused = driver.switch_to.active_element
    assert focused.tag_name == "a"
    assert str(focused.get_attribute("href")).endswith("#contenu")
    assert focused.text == "Aller au contenu"
    # Following it moves the focus to the main content, past the header and its menu.
    focused.send_keys(Keys.ENTER)
    assert driver.switch_to.active_element.get_attribute("id") == "contenu"

