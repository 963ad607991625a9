"""The Etherpad recipe's own part of the build, without npm: the tree it lays out around src/
(taken from the build cache, as after a first build), its reproducibility, and its error when
neither the cache nor npm is there. The npm step itself runs in the lab tests' first deploy."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from entfarm import artifacts
from entfarm.artifacts import ArtifactError, Store, build, etherpad_npm_key
from entfarm.model import Farm, load_farm
from entfarm.portal.identity import PROFILE_TABLE

if TYPE_CHECKING:
    from conftest import FarmCopy

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "entfarm" / "etherpad" / "ep_entfarm_cas"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def seed_src_cache(farm: Farm) -> None:
    """A src/ tarball where the recipe's npm step leaves it."""
    cache = (farm.state_dir / "build-cache" / "etherpad"
             / f"src-{etherpad_npm_key()[:32]}.tar.gz")
    cache.parent.mkdir(parents=True)
    with tarfile.open(cache, "w:gz") as tar:
        _add(tar, "./package.json", b'{"name": "ep_etherpad-lite", "version": "1.8.14"}')
        _add(tar, "./node/server.js", b"// server")
        for module in artifacts.ETHERPAD_REQUIRED_MODULES:
            _add(tar, f"./node_modules/{module}/package.json", b"{}")


def members(farm: Farm) -> dict[str, tarfile.TarInfo]:
    path = Store(farm).path(f"etherpad/{artifacts.ETHERPAD_FILE}")
    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


@pytest.fixture
def farm(lab_copy: FarmCopy, monkeypatch: pytest.MonkeyPatch) -> Farm:
    # No npm: whatever the controller has, this build must not reach a registry.
    monkeypatch.setattr(artifacts.shutil, "which", lambda name: None)
    return load_farm(lab_copy.dir)


def test_tree_has_src_the_link_and_the_plugin(farm: Farm) -> None:
    seed_src_cache(farm)
    [outcome] = build(farm, ["etherpad"])
    assert (outcome.action, outcome.version) == ("built", artifacts.ETHERPAD_VERSION)
    tree = members(farm)
    # Dependencies stay inside src/: the browser's module loader serves them from there.
    assert "src/node_modules/security/package.json" in tree
    assert not any(n.startswith("node_modules/") and n.split("/")[1] not in (
        "ep_etherpad-lite", "ep_entfarm_cas") for n in tree if n.count("/") >= 1)
    link = tree["node_modules/ep_etherpad-lite"]
    assert link.issym() and link.linkname == "../src"
    for name in ("ep.json", "index.js", "offline.js", "package.json"):
        assert f"node_modules/ep_entfarm_cas/{name}" in tree
    # Shipped: Etherpad would write them into its read-only tree at the first start.
    assert "src/.ep_initialized" in tree and "node_modules/ep_entfarm_cas/.ep_initialized" in tree
    assert all(m.uid == 0 and m.gid == 0 for m in tree.values())
    recorded = json.loads(Store(farm).manifest.read_text())["artifacts"]["etherpad"]
    assert recorded["kind"] == "built" and recorded["version"] == "1.8.14"
    # The same inputs give the same bytes: a rebuild changes nothing.
    assert [o.action for o in build(farm, ["etherpad"])] == ["unchanged"]


def test_a_changed_plugin_gives_another_tarball(farm: Farm, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seed_src_cache(farm)
    build(farm, ["etherpad"])
    before = hashlib.sha256(Store(farm).path(f"etherpad/{artifacts.ETHERPAD_FILE}")
                            .read_bytes()).hexdigest()
    checkout = tmp_path / "checkout"
    (checkout / "entfarm" / "etherpad").mkdir(parents=True)
    shutil.copytree(PLUGIN, checkout / "entfarm" / "etherpad" / "ep_entfarm_cas")
    (checkout / "entfarm" / "etherpad" / "ep_entfarm_cas" / "index.js").write_text("// v2\n")
    monkeypatch.setattr("entfarm.runner.project_root", lambda: checkout)
    [outcome] = build(farm, ["etherpad"])
    assert outcome.action == "updated"
    after = hashlib.sha256(Store(farm).path(f"etherpad/{artifacts.ETHERPAD_FILE}")
                           .read_bytes()).hexdigest()
    assert after != before


def test_without_cache_and_npm_the_build_says_how_to_get_npm(farm: Farm) -> None:
    with pytest.raises(ArtifactError, match=r"npm is not installed on the controller .*"
                                            r"scripts/lib/bootstrap\.sh"):
        build(farm, ["etherpad"])
    assert "etherpad" not in Store(farm).entries()


def test_role_profile_codes_are_the_portal_table_read_the_other_way() -> None:
    defaults = yaml.safe_load((ROOT / "roles" / "etherpad" / "defaults" / "main.yml").read_text())
    codes: dict[str, list[str]] = defaults["etherpad__profile_codes"]
    inverse = {code: profile for profile, values in codes.items() for code in values}
    assert inverse == PROFILE_TABLE


def test_plugin_hooks_name_functions_the_plugin_exports() -> None:
    ep = json.loads((PLUGIN / "ep.json").read_text())
    source = (PLUGIN / "index.js").read_text()
    for part in ep["parts"]:
        for hook, target in part["hooks"].items():
            module, _, function = target.partition(":")
            assert module == "ep_entfarm_cas/index", target
            assert f"exports.{function} = " in source, f"{hook}: {function} not exported"
