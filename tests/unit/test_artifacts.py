"""The artifact store: fetch (file:// URLs only, never a network host), build, verify, the
deploy's preflight in Python and in playbooks/artifacts.yml, and the real portal wheelhouse
installed offline into a throwaway virtualenv."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from entfarm import artifacts
from entfarm.artifacts import (
    PORTAL_INSTALL,
    ArtifactError,
    BuildContext,
    Store,
    build,
    fetch,
    preflight,
    required_artifacts,
)
from entfarm.cli import main
from entfarm.inventory import farm_vars
from entfarm.model import Farm, load_farm

if TYPE_CHECKING:
    from conftest import FarmCopy

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab"
PAYLOAD = b"etherpad release 2.2.7\n" * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA = "0" * 64


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def with_source(lab_copy: FarmCopy, url: str, sha256: str, mirror: str | None = None) -> Farm:
    """The lab farm with one release, etherpad, under artifacts.sources."""
    lines = ["  sources:", "    etherpad:", f"      url: {url}", f'      sha256: "{sha256}"',
             '      version: "2.2.7"']
    if mirror:
        lines.insert(0, f"  mirror: {mirror}")
    lab_copy.replace("  sources: {}", "\n".join(lines))
    return load_farm(lab_copy.dir)


@pytest.fixture
def release(tmp_path: Path) -> Path:
    path = tmp_path / "releases" / "etherpad-2.2.7.tar.gz"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


@pytest.fixture
def fake_portal(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, bytes]], None]:
    """Replace the portal recipe by one writing the given files: no pip, milliseconds."""

    def use(files: dict[str, bytes]) -> None:
        def fake(ctx: BuildContext) -> str:
            for name, content in files.items():
                (ctx.out / name).write_bytes(content)
            return "9.9"

        monkeypatch.setitem(artifacts.RECIPES, "portal",
                            artifacts.Recipe("portal", "fake recipe", fake))

    return use


@pytest.fixture
def fake_etherpad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the Etherpad recipe by one writing a fixed file: no npm, milliseconds."""

    def fake(ctx: BuildContext) -> str:
        (ctx.out / "etherpad.tar.gz").write_bytes(b"tree")
        return "1.8.14"

    monkeypatch.setitem(artifacts.RECIPES, "etherpad",
                        artifacts.Recipe("etherpad", "fake recipe", fake))


def store_entries(farm: Farm) -> list[str]:
    root = Store(farm).root
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def entfarm(args: list[str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point (UserError -> message on stderr, exit 2): code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["entfarm", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- fetch -------------------------------------------------------------------------------------


def test_fetch_checks_the_sha256_and_records_the_file(lab_copy: FarmCopy, release: Path) -> None:
    farm = with_source(lab_copy, release.as_uri(), PAYLOAD_SHA)
    [outcome] = fetch(farm, ["etherpad"])
    assert outcome.action == "fetched"
    stored = Store(farm).path("etherpad/etherpad-2.2.7.tar.gz")
    assert stored.read_bytes() == PAYLOAD
    entry = json.loads(Store(farm).manifest.read_text())["artifacts"]["etherpad"]
    assert entry == {"kind": "fetched", "version": "2.2.7", "source": release.as_uri(),
                     "files": [{"path": "etherpad/etherpad-2.2.7.tar.gz",
                                "sha256": PAYLOAD_SHA, "size": len(PAYLOAD)}]}
    # Present and valid: not downloaded again (the source may even be gone).
    release.unlink()
    assert [o.action for o in fetch(farm)] == ["present"]
    assert preflight(farm, ["etherpad"]) == []


def test_fetch_with_a_wrong_sha256_stores_nothing(lab_copy: FarmCopy, release: Path) -> None:
    farm = with_source(lab_copy, release.as_uri(), WRONG_SHA)
    with pytest.raises(ArtifactError) as caught:
        fetch(farm, ["etherpad"])
    message = str(caught.value)
    assert "artifact 'etherpad'" in message
    assert release.as_uri() in message
    assert f"has sha256 {PAYLOAD_SHA}, expected {WRONG_SHA}" in message
    assert "nothing was stored" in message
    # No artifact, no half-written temp file, no manifest entry: only the writers' lock.
    assert store_entries(farm) == [".lock"]


def test_fetch_uses_the_mirror_laid_out_like_a_store(lab_copy: FarmCopy, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "etherpad").mkdir(parents=True)
    (mirror / "etherpad" / "etherpad-2.2.7.tar.gz").write_bytes(PAYLOAD)
    # The release URL's host is never contacted: .invalid cannot resolve anyway.
    farm = with_source(lab_copy, "https://releases.invalid/v2.2.7/etherpad-2.2.7.tar.gz",
                       PAYLOAD_SHA, mirror=mirror.as_uri())
    assert artifacts.download_url(farm, "etherpad") == (
        f"{mirror.as_uri()}/etherpad/etherpad-2.2.7.tar.gz")
    assert [o.action for o in fetch(farm)] == ["fetched"]
    assert sha(Store(farm).path("etherpad/etherpad-2.2.7.tar.gz")) == PAYLOAD_SHA


def test_fetch_reports_an_unreachable_source(lab_copy: FarmCopy, tmp_path: Path) -> None:
    farm = with_source(lab_copy, (tmp_path / "nowhere" / "x.tar.gz").as_uri(), PAYLOAD_SHA)
    with pytest.raises(ArtifactError, match=r"artifact 'etherpad': cannot download file://"):
        fetch(farm)
    assert store_entries(farm) == [".lock"]


def test_a_source_url_must_name_a_file(lab_copy: FarmCopy) -> None:
    lab_copy.replace("  sources: {}", "  sources:\n    etherpad:\n"
                     "      url: https://releases.invalid/etherpad/\n"
                     f'      sha256: "{PAYLOAD_SHA}"')
    [problem] = lab_copy.problems()
    assert problem.path == "artifacts.sources.etherpad.url"
    assert "ending with its file name" in problem.message


# -- verify ------------------------------------------------------------------------------------


def test_verify_detects_a_tampered_and_a_missing_release(lab_copy: FarmCopy,
                                                         release: Path) -> None:
    farm = with_source(lab_copy, release.as_uri(), PAYLOAD_SHA)
    fetch(farm)
    stored = Store(farm).path("etherpad/etherpad-2.2.7.tar.gz")
    flip_a_byte(stored)
    [problem] = preflight(farm, ["etherpad"])
    assert problem == (
        f"artifact 'etherpad': file etherpad/etherpad-2.2.7.tar.gz has sha256 {sha(stored)}, "
        f"expected {PAYLOAD_SHA} from farm.yml (fetch it again with: "
        f"entfarm artifacts fetch etherpad -i {farm.inventory_dir})")
    stored.unlink()
    [problem] = preflight(farm, ["etherpad"])
    assert "file etherpad/etherpad-2.2.7.tar.gz is missing, expected sha256 " in problem
    assert "(fetch it with: entfarm artifacts fetch etherpad" in problem
    [state] = artifacts.states(farm, ["etherpad"])
    assert state.status == "missing"


def test_verify_detects_a_tampered_a_missing_and_an_extra_built_file(
        lab_copy: FarmCopy, fake_portal: Callable[[dict[str, bytes]], None]) -> None:
    farm = load_farm(lab_copy.dir)
    assert preflight(farm, ["portal"]) == [
        f"artifact 'portal': not built yet (build it with: entfarm artifacts build portal "
        f"-i {farm.inventory_dir})"]
    fake_portal({"a.whl": b"wheel a", "b.whl": b"wheel b", "requirements.txt": b"a\nb\n"})
    build(farm, ["portal"])
    assert preflight(farm, ["portal"]) == []
    store = Store(farm)
    flip_a_byte(store.path("portal/a.whl"))
    store.path("portal/b.whl").unlink()
    store.path("portal/evil.whl").write_bytes(b"not vouched for")
    fix = f"entfarm artifacts build portal -i {farm.inventory_dir}"
    assert preflight(farm, ["portal"]) == [
        f"artifact 'portal': file portal/a.whl has sha256 {sha(store.path('portal/a.whl'))}, "
        f"expected {hashlib.sha256(b'wheel a').hexdigest()} (rebuild with: {fix})",
        f"artifact 'portal': file portal/b.whl is missing, expected sha256 "
        f"{hashlib.sha256(b'wheel b').hexdigest()} (rebuild with: {fix})",
        f"artifact 'portal': file portal/evil.whl is not part of the artifact; roles would copy "
        f"it (rebuild with: {fix})",
    ]
    [state] = artifacts.states(farm, ["portal"])
    assert state.status == "missing"  # the worst first: missing, then mismatch, then extra
    # A rebuild restores the store, even though the recipe's output did not change.
    assert [o.action for o in build(farm, ["portal"])] == ["updated"]
    assert preflight(farm, ["portal"]) == []


def test_rebuild_with_the_same_output_is_unchanged(
        lab_copy: FarmCopy, fake_portal: Callable[[dict[str, bytes]], None],
        fake_etherpad: None) -> None:
    farm = load_farm(lab_copy.dir)
    fake_portal({"a.whl": b"wheel a"})
    # every recipe: portal, etherpad, the school servers' blocklist
    assert [o.action for o in build(farm)] == ["built", "built", "built"]
    manifest = Store(farm).manifest.read_bytes()
    assert [o.action for o in build(farm)] == ["unchanged", "unchanged", "unchanged"]
    assert Store(farm).manifest.read_bytes() == manifest
    fake_portal({"a.whl": b"wheel a, next version"})
    assert [o.action for o in build(farm)] == ["updated", "unchanged", "unchanged"]
    # no staging left
    assert store_entries(farm) == [".lock", "blocklist", "etherpad", "manifest.json", "portal"]


def test_build_refuses_an_artifact_named_in_farm_yml(lab_copy: FarmCopy, release: Path) -> None:
    lab_copy.replace("  sources: {}", "  sources:\n    portal:\n"
                     f"      url: {release.as_uri()}\n      sha256: \"{PAYLOAD_SHA}\"")
    farm = load_farm(lab_copy.dir)
    with pytest.raises(ArtifactError, match=r"release named in .*: run entfarm artifacts fetch"):
        build(farm, ["portal"])
    assert artifacts.kind_of(farm, "portal") == "fetched"  # production pins a release


# -- the deploy stops before any host is touched -------------------------------------------------


@pytest.fixture
def no_host_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the deploy went on to contact hosts")

    monkeypatch.setattr("entfarm.runner.run_playbook", forbidden)
    monkeypatch.setattr("entfarm.cli._require_lab_up", forbidden)


@pytest.mark.usefixtures("no_host_touched")
def test_deploy_with_a_tampered_artifact_stops_before_any_host(
        lab_copy: FarmCopy, release: Path, fake_portal: Callable[[dict[str, bytes]], None],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    farm = with_source(lab_copy, release.as_uri(), PAYLOAD_SHA)
    fake_portal({"a.whl": b"wheel a"})
    build(farm)
    fetch(farm)
    assert required_artifacts(farm) == ["portal", "etherpad", "blocklist"]
    stored = Store(farm).path("etherpad/etherpad-2.2.7.tar.gz")
    flip_a_byte(stored)
    code, _, err = entfarm(["deploy", "-i", str(lab_copy.dir)], monkeypatch, capsys)
    assert code == 2
    assert "no host was touched" in err
    assert (f"artifact 'etherpad': file etherpad/etherpad-2.2.7.tar.gz has sha256 {sha(stored)}, "
            f"expected {PAYLOAD_SHA} from farm.yml") in err
    assert "Traceback" not in err
    assert not (farm.state_dir / "runs").exists() or not any(
        p.name.endswith("-site") for p in (farm.state_dir / "runs").iterdir())


@pytest.mark.usefixtures("no_host_touched")
def test_deploy_without_the_portal_wheelhouse_stops(
        lab_copy: FarmCopy, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = entfarm(["deploy", "--check", "-i", str(lab_copy.dir)], monkeypatch, capsys)
    assert code == 2
    assert "artifact 'portal': not built yet (build it with: entfarm artifacts build portal" in err


def test_list_and_verify_commands(lab_copy: FarmCopy, release: Path,
                                  fake_portal: Callable[[dict[str, bytes]], None],
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    farm = with_source(lab_copy, release.as_uri(), PAYLOAD_SHA)
    inv = ["-i", str(lab_copy.dir)]
    code, out, _ = entfarm(["artifacts", "list", *inv], monkeypatch, capsys)
    assert code == 0
    assert "etherpad" in out and "missing" in out and "not built" in out
    fake_portal({"a.whl": b"wheel a"})
    assert entfarm(["artifacts", "fetch", *inv], monkeypatch, capsys)[0] == 0
    assert entfarm(["artifacts", "build", "portal", *inv], monkeypatch, capsys)[0] == 0
    assert entfarm(["artifacts", "build", "blocklist", *inv], monkeypatch, capsys)[0] == 0
    code, out, _ = entfarm(["artifacts", "verify", *inv], monkeypatch, capsys)
    assert (code, out.strip()) == (0, "ok 3 artifact(s), 3 file(s) verified")
    flip_a_byte(Store(farm).path("portal/a.whl"))
    code, _, err = entfarm(["artifacts", "verify", *inv], monkeypatch, capsys)
    assert code == 2
    assert "1 problem in the artifact store" in err
    assert "artifact 'portal': file portal/a.whl has sha256" in err
    code, _, err = entfarm(["artifacts", "build", "etherpad", *inv], monkeypatch, capsys)
    assert code == 2 and "entfarm artifacts fetch etherpad" in err
    code, _, err = entfarm(["artifacts", "fetch", "nextcloud", *inv], monkeypatch, capsys)
    assert code == 2 and "unknown artifact 'nextcloud'" in err


# -- the same preflight, from Ansible --------------------------------------------------------------


def test_inventory_tells_the_play_what_to_check(lab_copy: FarmCopy, release: Path) -> None:
    farm = with_source(lab_copy, release.as_uri(), PAYLOAD_SHA)
    variables = farm_vars(farm)["entfarm_artifacts"]
    assert variables["manifest"] == str(Store(farm).manifest.resolve())
    assert variables["required"] == [
        {"name": "portal", "kind": "built", "file": None, "sha256": None,
         "fix": f"entfarm artifacts build portal -i {farm.inventory_dir}"},
        {"name": "etherpad", "kind": "fetched", "file": "etherpad/etherpad-2.2.7.tar.gz",
         "sha256": PAYLOAD_SHA, "fix": f"entfarm artifacts fetch etherpad -i {farm.inventory_dir}"},
        {"name": "blocklist", "kind": "built", "file": None, "sha256": None,
         "fix": f"entfarm artifacts build blocklist -i {farm.inventory_dir}"},
    ]


def test_playbook_reports_the_same_problems(lab_copy: FarmCopy, release: Path,
                                            fake_portal: Callable[[dict[str, bytes]], None],
                                            ) -> None:
    farm = with_source(lab_copy, release.as_uri(), PAYLOAD_SHA)
    fake_portal({"a.whl": b"wheel a", "b.whl": b"wheel b"})
    build(farm)
    fetch(farm)
    store = Store(farm)
    flip_a_byte(store.path("etherpad/etherpad-2.2.7.tar.gz"))
    store.path("portal/b.whl").unlink()
    store.path("portal/evil.whl").write_bytes(b"x")
    expected = preflight(farm, required_artifacts(farm))
    assert len(expected) == 3
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"}
    env.pop("ANSIBLE_CONFIG", None)  # the project's ansible.cfg, found in cwd
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(lab_copy.file),
         "playbooks/artifacts.yml", "--limit", "edge"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    report = json.loads(result.stdout)
    messages = [res["msg"] for play in report["plays"] for task in play["tasks"]
                for res in task["hosts"].values() if res.get("failed")]
    assert len(messages) == 1
    assert sorted(messages[0].splitlines()) == sorted(expected)


# -- the real portal wheelhouse (pip, the configured package index) --------------------------------


@pytest.fixture(scope="session")
def portal_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Farm, list[str]]]:
    """The portal recipe run twice on a copy of the lab farm: (farm, the two actions)."""
    directory = tmp_path_factory.mktemp("portal-farm")
    shutil.copy(LAB / "farm.yml", directory / "farm.yml")
    farm = load_farm(directory)
    first = build(farm, ["portal"])
    second = build(farm, ["portal"])
    yield farm, [first[0].action, second[0].action]


def test_portal_wheelhouse_is_complete_and_reproducible(
        portal_build: tuple[Farm, list[str]]) -> None:
    farm, actions = portal_build
    assert actions == ["built", "unchanged"]
    assert artifacts.preflight(farm, ["portal"]) == []
    wheelhouse = Store(farm).path("portal")
    names = sorted(p.name for p in wheelhouse.iterdir())
    assert "entfarm-0.1.0-py3-none-any.whl" in names
    for prefix in ("flask-3.1.", "gunicorn-23.", "markdown_it_py-", "werkzeug-", "markupsafe-"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    markupsafe = next(n for n in names if n.startswith("markupsafe-"))
    assert "-cp311-" in markupsafe and "manylinux" in markupsafe  # for the hosts, not for us
    requirements = (wheelhouse / "requirements.txt").read_text()
    for wheel in (p for p in wheelhouse.iterdir() if p.suffix == ".whl"):
        assert f"--hash=sha256:{sha(wheel)}" in requirements
    # The portal's templates and static files travel in the wheel (package-data in pyproject).
    with zipfile.ZipFile(wheelhouse / "entfarm-0.1.0-py3-none-any.whl") as wheel:
        packed = set(wheel.namelist())
    for folder in ("templates", "static"):
        for path in (REPO / "entfarm" / "portal" / folder).rglob("*"):
            if path.is_file():
                assert path.relative_to(REPO).as_posix() in packed
    manifest = json.loads(Store(farm).manifest.read_text())["artifacts"]["portal"]
    assert manifest["kind"] == "built" and manifest["version"] == "0.1.0"
    assert {f["path"] for f in manifest["files"]} == {f"portal/{n}" for n in names}


def _python311() -> str | None:
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    return shutil.which("python3.11")


def test_portal_installs_offline_in_a_fresh_virtualenv(
        portal_build: tuple[Farm, list[str]], tmp_path: Path) -> None:
    python = _python311()
    if python is None:
        pytest.skip("no Python 3.11 here, the hosts' version (Debian 12)")
    farm, _ = portal_build
    wheelhouse = Store(farm).path("portal")
    venv = tmp_path / "venv"
    # Without ensurepip (6 s here): our pip installs into the venv's interpreter (--python), so
    # wheel tags are those of that Python 3.11, as on a host.
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    # Like a host: no index, no configuration (this machine's pip.conf adds find-links).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    pip, *install = PORTAL_INSTALL.format(wheelhouse=wheelhouse).split()
    assert pip == "pip"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                             *install], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    portal = (REPO / "entfarm" / "portal" / "__init__.py").is_file()
    modules = "flask, gunicorn, markdown_it, entfarm" + (", entfarm.portal" if portal else "")
    check = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {modules}"], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr
    version = subprocess.run([str(venv / "bin" / "gunicorn"), "--version"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert "23.0.0" in version.stdout + version.stderr
