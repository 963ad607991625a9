"""The cas role on the deployed lab: its read-only verify suite, run the way an auditor would.
Logins end to end are in test_identity_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from entfarm.model import Farm

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


def test_verify_suite_passes_against_lab(deployed_lab: Any, lab_farm: Farm) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(lab_farm.inventory_dir), "cas"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    # The CAS host itself was checked, not only skipped as outside the group.
    assert "not verifiable" not in proc.stdout, proc.stdout[-4000:]
