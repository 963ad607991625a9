"""The webconf role (coturn) on the deployed lab.

The lab has no BigBlueButton: its checks are the only ones allowed to report "not verifiable".
Until playbooks/site.yml imports playbooks/apps.yml, this module converges apps.yml itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from entfarm.model import Farm
from entfarm.runner import RunResult, project_root, run_playbook

pytestmark = pytest.mark.lab

ROOT = project_root()


def _describe(result: RunResult) -> str:
    return "\n".join([f"run directory {result.run_dir}"]
                     + [f"{f['host']} | {f['task']}: {f['message']}" for f in result.failures])


@pytest.fixture(scope="module")
def webconf_host(deployed_lab: RunResult, lab_farm: Farm) -> str:
    placement = lab_farm.spec.services.get("webconf")
    if not placement:
        pytest.skip("not verifiable: the lab farm places no webconf")
    if "apps.yml" not in (ROOT / "playbooks" / "site.yml").read_text():
        result = run_playbook(lab_farm, "playbooks/apps.yml", tags="webconf")
        assert result.exit_code == 0, _describe(result)
    return placement.hosts[0]


def _exec(farm: Farm, host: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", farm.container_name(host), "sh", "-c", command],
                          capture_output=True, text=True, timeout=120, check=False)


def test_verify_suite_passes(webconf_host: str, lab_farm: Farm) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(lab_farm.inventory_dir),
         "webconf"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    # Only what needs a BigBlueButton may be left unverified in the lab.
    unverifiable = [line for line in proc.stdout.splitlines() if "not verifiable" in line]
    assert all(("BigBlueButton" in line or "portal tile" in line) for line in unverifiable), (
        "\n".join(unverifiable))


def test_host_has_the_controller_secret(webconf_host: str, lab_farm: Farm) -> None:
    """BigBlueButton is given the controller's copy: both must be the same secret. Compared by
    digest, so that the secret itself never leaves the host nor the controller file."""
    controller = (lab_farm.secrets_dir / "webconf" / "turn-static-auth-secret").read_text()
    digest = hashlib.sha256(controller.strip().encode()).hexdigest()
    out = _exec(lab_farm, webconf_host,
                "sed -n 's/^static-auth-secret=//p' /etc/turnserver.conf | tr -d '\\n' | sha256sum")
    assert out.stdout.split()[0] == digest


def test_other_hosts_cannot_allocate_without_the_secret(webconf_host: str,
                                                       lab_farm: Farm) -> None:
    """From another farm host, a STUN binding works (TURN servers answer anyone) but an
    allocation without credentials is refused with 401."""
    others = [h.name for h in lab_farm.hosts() if not h.etablissement and h.name != webconf_host]
    if not others:
        pytest.skip("not verifiable: no other central host")
    script = (
        "import os,socket,struct\n"
        "tid=os.urandom(12)\n"
        "req=struct.pack('!HHI',0x0003,8,0x2112A442)+tid+struct.pack('!HHI',0x0019,4,17<<24)\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(5)\n"
        f"s.sendto(req,({webconf_host!r},3478))\n"
        "data=s.recv(2048)\n"
        "print(hex(struct.unpack('!H',data[:2])[0]), data.hex())\n"
    )
    out = subprocess.run(["docker", "exec", lab_farm.container_name(others[0]), "python3", "-c",
                          script], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    kind, payload = out.stdout.split()
    assert kind == "0x113", f"not an Allocate error response: {kind}"
    # ERROR-CODE attribute (0x0009): class 4, number 01 -> 401 Unauthorized.
    assert re.search(r"0009....0000" + "0401", payload), payload


def test_bad_configuration_is_reported_and_repaired(webconf_host: str, lab_farm: Farm) -> None:
    """coturn logs what it does not understand and carries on: the role reads the restarted
    server's log and fails the play. The next converge repairs it."""
    broken = run_playbook(lab_farm, "playbooks/apps.yml", tags="webconf",
                          extravars={"webconf__allowed_peer_ips": ["not-an-address"]})
    try:
        assert broken.exit_code != 0, "coturn's rejection of a setting went unnoticed"
        assert any("rejected part of /etc/turnserver.conf" in f["message"]
                   for f in broken.failures), _describe(broken)
    finally:
        fixed = run_playbook(lab_farm, "playbooks/apps.yml", tags="webconf")
        assert fixed.exit_code == 0, _describe(fixed)
    out = _exec(lab_farm, webconf_host, "grep -c '^allowed-peer-ip' /etc/turnserver.conf")
    assert out.stdout.strip() == "0"


def test_webconf_converge_is_idempotent(webconf_host: str, lab_farm: Farm) -> None:
    again = run_playbook(lab_farm, "playbooks/apps.yml", tags="webconf")
    assert again.exit_code == 0, _describe(again)
    assert again.changed_hosts == [], f"changed {again.changed_hosts}"
    check = run_playbook(lab_farm, "playbooks/apps.yml", tags="webconf", check=True, diff=True)
    assert check.exit_code == 0, _describe(check)
    assert check.changed_hosts == [], f"check mode reports changes on {check.changed_hosts}"
