"""Read-only checks of the proxy role, runnable against any inventory.

    pytest roles/proxy/verify --hosts='docker://entfarm-lab-edge'

Every probe runs on the edge itself against 127.0.0.1, with the public names the role wrote to
/etc/ansible/facts.d/proxy.fact (SNI and Host), so no name resolution is needed.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

from entfarm.verifylib import role_suite

FACT = "/etc/ansible/facts.d/proxy.fact"
PKI_FACT = "/etc/ansible/facts.d/pki.fact"
UNKNOWN_NAME = "unknown.entfarm.invalid"


_hosts_only, fact = role_suite("proxy", group="proxy")


def names(host: Any) -> list[str]:
    all_names = [n for site in fact(host)["sites"] for n in site["names"]]
    if not all_names:
        pytest.skip("not verifiable: no public service on this edge")
    return all_names


def ca_file(host: Any) -> str:
    f = host.file(PKI_FACT)
    if f.exists:
        return str(json.loads(f.content_string)["ca_bundle"])
    return "/etc/ssl/certs/ca-certificates.crt"


def s_client(host: Any, servername: str, *options: str) -> Any:
    cmd = (
        "openssl s_client -connect 127.0.0.1:443 -servername "
        + shlex.quote(servername)
        + " "
        + " ".join(options)
        + " </dev/null"
    )
    return host.run(f"timeout 10 sh -c {shlex.quote(cmd)}")


def curl(host: Any, name: str, *options: str, scheme: str = "https") -> Any:
    if not host.exists("curl"):
        pytest.skip("not verifiable: curl is not installed on the edge")
    port = 443 if scheme == "https" else 80
    cmd = (
        f"curl -sS --max-time 10 --cacert {shlex.quote(ca_file(host))} "
        f"--resolve {shlex.quote(f'{name}:{port}:127.0.0.1')} " + " ".join(options)
    )
    return host.run(f"{cmd} {shlex.quote(f'{scheme}://{name}/')}")


def test_fact_present(host: Any) -> None:
    assert host.file(FACT).exists, f"{FACT} missing: the proxy role has not run on this host"


def test_nginx_config_valid(host: Any) -> None:
    cmd = host.run("/usr/sbin/nginx -t")
    assert cmd.rc == 0, cmd.stderr


def test_nginx_running(host: Any) -> None:
    svc = host.service("nginx")
    assert svc.is_enabled
    assert svc.is_running


def test_listening(host: Any) -> None:
    assert host.socket("tcp://0.0.0.0:443").is_listening
    assert host.socket("tcp://0.0.0.0:80").is_listening


def test_tls12_and_tls13_accepted_with_a_trusted_certificate(host: Any) -> None:
    for name in names(host):
        for version in ("-tls1_2", "-tls1_3"):
            cmd = s_client(host, name, version, "-verify_return_error", "-CAfile", ca_file(host))
            assert cmd.rc == 0, f"{name} {version}: {cmd.stderr}"
            assert "Verify return code: 0 (ok)" in cmd.stdout


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_old_tls_refused(host: Any, version: str) -> None:
    if version not in host.run("openssl s_client -help 2>&1").stdout:
        pytest.skip(f"not verifiable: this OpenSSL client cannot offer {version}")
    name = names(host)[0]
    # SECLEVEL=0 lets the client really offer the old version: a refusal is the server's.
    cmd = s_client(host, name, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert cmd.rc != 0, f"{version} accepted: {cmd.stdout}"


def test_tls12_only_forward_secret_aead_suites(host: Any) -> None:
    name = names(host)[0]
    cmd = s_client(host, name, "-tls1_2")
    match = re.search(r"Cipher is (\S+)", cmd.stdout)
    assert match, cmd.stdout
    assert match.group(1).startswith("ECDHE-")
    assert "GCM" in match.group(1) or "CHACHA20" in match.group(1)
    # No forward secrecy, or CBC: refused, for RSA and ECDSA certificates alike.
    weak_suites = (
        "AES128-SHA",
        "AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-ECDSA-AES128-SHA",
    )
    for weak in weak_suites:
        refused = s_client(host, name, "-tls1_2", "-cipher", f"{weak}@SECLEVEL=0")
        assert refused.rc != 0, f"{weak} accepted"


def test_no_session_tickets(host: Any) -> None:
    cmd = s_client(host, names(host)[0], "-tls1_2")
    assert cmd.rc == 0
    assert "TLS session ticket:" not in cmd.stdout


def test_unknown_name_refused(host: Any) -> None:
    cmd = s_client(host, UNKNOWN_NAME, "-tls1_2")
    assert cmd.rc != 0 or "Cipher is (NONE)" in cmd.stdout
    # A known name at the TLS level but an unknown Host header: misdirected.
    status = fact(host)["default_status"]
    name = names(host)[0]
    resp = curl(host, name, "-o /dev/null -w '%{http_code}'", f"-H 'Host: {UNKNOWN_NAME}'")
    if status == 444:
        assert resp.rc != 0
    else:
        assert resp.stdout.strip() == str(status)


def test_hsts(host: Any) -> None:
    for name in names(host):
        resp = curl(host, name, "-o /dev/null -D -")
        assert resp.rc == 0, resp.stderr
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in resp.stdout.splitlines())
        }
        hsts = headers.get("strict-transport-security", "")
        match = re.search(r"max-age=(\d+)", hsts)
        assert match and int(match.group(1)) >= 31536000, f"{name}: HSTS {hsts!r}"
        assert "includesubdomains" in hsts.lower()


def test_http_redirects_to_https(host: Any) -> None:
    port = fact(host)["public_https_port"]
    suffix = "" if port == 443 else f":{port}"
    for name in names(host):
        resp = curl(host, name, "-o /dev/null -w '%{http_code} %{redirect_url}'", scheme="http")
        assert resp.stdout.strip() == f"301 https://{name}{suffix}/"


def test_acme_challenge_served_over_http(host: Any) -> None:
    name = names(host)[0]
    if not host.exists("curl"):
        pytest.skip("not verifiable: curl is not installed on the edge")
    resp = host.run(
        "curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "
        f"--resolve {name}:80:127.0.0.1 http://{name}/.well-known/acme-challenge/entfarm-probe"
    )
    # Not redirected: the challenge location answers itself (404: no such token).
    assert resp.stdout.strip() == "404"


def test_maintenance_page(host: Any) -> None:
    sites = fact(host)["sites"]
    for site in sites:
        name = site["names"][0]
        resp = curl(host, name, "-w '\\n%{http_code}'")
        body, _, code = resp.stdout.rpartition("\n")
        if site["maintenance"]:
            assert code == "503", f"{site['service']}: {code}"
        # Whatever the backend's state, the edge never shows a raw gateway error.
        assert code not in ("502", "504"), f"{site['service']}: {code}"
        if code == "503":
            assert "service en maintenance" in body, f"{site['service']}: not the maintenance page"
