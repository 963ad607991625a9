"""Shared helpers of the unit tests: copies of the lab inventory to break on purpose."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from entfarm.errors import Problem, ValidationFailed
from entfarm.model import load_farm

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab"


class FarmCopy:
    """A copy of inventories/lab/farm.yml in a temporary inventory directory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.file = directory / "farm.yml"

    @property
    def text(self) -> str:
        return self.file.read_text(encoding="utf-8")

    def replace(self, old: str, new: str) -> FarmCopy:
        """Replace ``old``, which must occur exactly once (so a test cannot edit the wrong spot)."""
        text = self.text
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the lab farm.yml"
        self.file.write_text(text.replace(old, new), encoding="utf-8")
        return self

    def line_of(self, needle: str) -> int:
        """1-based line of the line equal to ``needle``, else of the only one containing it."""
        lines = self.text.splitlines()
        found = [n for n, line in enumerate(lines, 1) if line == needle]
        found = found or [n for n, line in enumerate(lines, 1) if needle in line]
        assert len(found) == 1, f"{needle!r} is on lines {found}"
        return found[0]

    def problems(self) -> list[Problem]:
        with pytest.raises(ValidationFailed) as caught:
            load_farm(self.dir)
        return caught.value.problems


@pytest.fixture
def lab_copy(tmp_path: Path) -> FarmCopy:
    directory = tmp_path / "farm"
    directory.mkdir()
    shutil.copy(LAB / "farm.yml", directory / "farm.yml")
    shutil.copy(LAB / "blocklist.txt", directory / "blocklist.txt")
    return FarmCopy(directory)


@pytest.fixture
def make_farm(tmp_path: Path) -> Callable[[str | bytes], FarmCopy]:
    """An inventory whose farm.yml holds the given text or bytes."""

    def make(content: str | bytes) -> FarmCopy:
        directory = tmp_path / "custom"
        directory.mkdir(exist_ok=True)
        target = directory / "farm.yml"
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
        return FarmCopy(directory)

    return make
