"""The portal role installs the wheelhouse exactly as the artifact store documents it."""

from __future__ import annotations

from pathlib import Path

import yaml

from entfarm.artifacts import PORTAL_INSTALL

ROLE = Path(__file__).resolve().parents[2] / "roles" / "portal"


def test_role_installs_with_the_store_command() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text(encoding="utf-8"))
    assert defaults["portal__install_command"] == PORTAL_INSTALL


def test_every_input_is_typed_in_argument_specs() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text(encoding="utf-8"))
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    assert set(specs["argument_specs"]["main"]["options"]) == set(defaults)
