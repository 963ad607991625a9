"""The spine, end to end: deploy the lab farm, deploy again (nothing changes), then check what a
user and an auditor would check from the controller: TLS through 127.0.0.1 and the verify suites.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from entfarm.model import Farm
from entfarm.runner import RunResult, run_playbook

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
_results: dict[str, RunResult] = {}


def _deploy(farm: Farm, key: str, **kwargs: object) -> RunResult:
    if key not in _results:
        _results[key] = run_playbook(farm, **kwargs)  # type: ignore[arg-type]
    return _results[key]


@pytest.fixture(autouse=True)
def _first(deployed_lab: RunResult) -> None:
    _results.setdefault("first", deployed_lab)


def _describe(result: RunResult) -> str:
    lines = [f"run directory {result.run_dir}"]
    lines += [f"{f['host']} | {f['task']}: {f['message']}" for f in result.failures]
    return "\n".join(lines)


def test_first_deploy_converges_every_host(lab_farm: Farm) -> None:
    result = _deploy(lab_farm, "first")
    assert set(result.hosts) == {h.name for h in lab_farm.hosts()}
    # A fresh lab really changes: the deploy is not a no-op.
    assert all(s.changed > 0 for s in result.hosts.values()), result.hosts
    assert (result.run_dir / "summary.json").is_file()
    assert (result.run_dir / "events.jsonl").stat().st_size > 0
    assert (result.run_dir / "artifacts" / "ansible" / "stdout").is_file()


def test_second_deploy_changes_nothing(lab_farm: Farm) -> None:
    result = _deploy(lab_farm, "second")
    assert result.exit_code == 0, _describe(result)
    changed = {h: s.changed for h, s in result.hosts.items() if s.changed}
    assert changed == {}, f"second deploy changed {changed}; see {result.run_dir}"
    assert set(result.hosts) == {h.name for h in lab_farm.hosts()}


def test_check_mode_on_converged_farm_reports_no_change(lab_farm: Farm) -> None:
    result = _deploy(lab_farm, "check", check=True, diff=True)
    assert result.exit_code == 0, _describe(result)
    assert result.changed_hosts == [], f"check mode reports changes; see {result.run_dir}"


# -- TLS from the controller, through the published edge on 127.0.0.1 ---------------------------


def _ca_file(farm: Farm) -> Path:
    ca = farm.secrets_dir / "pki" / "ca.crt"
    assert ca.is_file(), f"farm CA certificate missing at {ca}"
    return ca


def _tls_context(farm: Farm, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(_ca_file(farm)))
    ctx.minimum_version = version
    ctx.maximum_version = version
    return ctx


def _handshake(farm: Farm, name: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", farm.lab.publish.https), timeout=10)
    return ctx.wrap_socket(sock, server_hostname=name)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_every_public_name_serves_tls_chained_to_farm_ca(lab_farm: Farm,
                                                         version: ssl.TLSVersion) -> None:
    for name in lab_farm.all_public_names():
        with _handshake(lab_farm, name, _tls_context(lab_farm, version)) as tls:
            assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                     ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
            cert = tls.getpeercert()
            sans = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
            assert name in sans


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # on purpose
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1],
                         ids=["tls1.0", "tls1.1"])
def test_old_tls_versions_are_refused_by_the_server(lab_farm: Farm,
                                                    version: ssl.TLSVersion) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        # Lower the client's own floor so that the refusal, if any, comes from the server.
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        ctx.minimum_version = version
        ctx.maximum_version = version
    except (ssl.SSLError, ValueError) as exc:
        pytest.skip(f"not verifiable: this controller's OpenSSL cannot offer {version.name}: {exc}")
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(lab_farm, lab_farm.all_public_names()[0], ctx).close()
    reason = (refused.value.reason or "").upper()
    if reason == "NO_PROTOCOLS_AVAILABLE":
        pytest.skip(f"not verifiable: the controller's OpenSSL refuses {version.name} itself")
    # The server answered with a protocol-version alert (or closed the handshake).
    assert reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
                      "WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING"}, reason


def test_hsts_and_maintenance_page_for_services_not_deployed_yet(lab_farm: Farm) -> None:
    ctx = _tls_context(lab_farm, ssl.TLSVersion.TLSv1_3)
    name = lab_farm.public_names("moodle")[0]
    conn = http.client.HTTPSConnection("127.0.0.1", lab_farm.lab.publish.https, context=ctx,
                                       timeout=15)
    # Connect to 127.0.0.1 but present the public name (SNI + Host), as a browser resolving
    # *.test to the loopback would.
    conn.sock = _handshake(lab_farm, name, ctx)
    conn.request("GET", "/", headers={"Host": name})
    response = conn.getresponse()
    body = response.read().decode("utf-8", "replace")
    assert response.status == 503
    assert "max-age=" in (response.getheader("Strict-Transport-Security") or "")
    assert "maintenance" in body.lower()


def test_unknown_name_is_not_served(lab_farm: Farm) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", lab_farm.lab.publish.http, timeout=10)
    conn.request("GET", "/", headers={"Host": "unknown.example.test"})
    try:
        status = conn.getresponse().status
    except (http.client.RemoteDisconnected, ConnectionResetError):
        status = 444  # nginx closed the connection without an answer
    assert status in (421, 444, 400, 404)


# -- the roles' verify suites, through testinfra, against the lab inventory ----------------------


@pytest.mark.parametrize("role", ["common", "pki", "proxy", "directory"])
def test_verify_suite_passes_against_lab(lab_farm: Farm, role: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "entfarm.cli", "verify", "-i", str(lab_farm.inventory_dir), role],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg")),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
