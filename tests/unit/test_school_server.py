"""School servers without Docker: NT hashes, the blocklist artifact, the LAN's derived values,
the lab's school networks and classrooms, the inventory's per-UAI variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from entfarm import lab
from entfarm.artifacts import ArtifactError, blocklist_domains
from entfarm.errors import UserError
from entfarm.inventory import host_vars
from entfarm.model import Farm, SchoolLan, load_farm
from entfarm.ntlm import md4, md4_many, nt_hash, nt_hashes


@pytest.fixture(scope="module")
def farm() -> Farm:
    return load_farm(Path(__file__).resolve().parents[2] / "inventories" / "lab")


def test_md4_matches_rfc_1320_vectors() -> None:
    assert md4(b"").hex() == "31d6cfe0d16ae931b73c59d7e0c089c0"
    assert md4(b"abc").hex() == "a448017aaf21d8525fc10ae87aa6729d"
    assert md4(b"1234567890" * 8).hex() == "e33b4ddc9c38f2199c3e7b164fcc0536"


def test_nt_hash_is_md4_of_utf16le_in_upper_case() -> None:
    assert nt_hash("password") == "8846F7EAEE8FB117AD06BDD830B7586C"
    assert nt_hash("élève€") != nt_hash("eleve")


def test_batched_md4_equals_md4_of_each_message() -> None:
    import random

    rng = random.Random(7)
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789éœ€ß"
    passwords = ["", "password", *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                                   for _ in range(500))]
    assert nt_hashes(passwords) == [nt_hash(p) for p in passwords]
    assert nt_hashes(["password"]) == ["8846F7EAEE8FB117AD06BDD830B7586C"]
    # 55 bytes is one block, 56 needs two (those go one by one).
    vectors = [b"", b"abc", b"x" * 55, b"y" * 56, b"1234567890" * 8]
    assert md4_many(vectors) == [md4(v) for v in vectors]
    assert md4_many([]) == []


def test_blocklist_keeps_each_domain_once_without_covered_subdomains() -> None:
    text = "# comment\nCasino.test\nwww.casino.test\n.jeux.test  # trailing\n\njeux.test\n"
    assert blocklist_domains(text) == ["casino.test", "jeux.test"]
    with pytest.raises(ArtifactError, match="not a domain name"):
        blocklist_domains("http://casino.test/\n")


def test_lan_defaults_put_the_server_first_and_leases_in_the_middle() -> None:
    lan = SchoolLan(subnet="10.36.5.0/24")
    assert lan.server_address() == "10.36.5.1"
    assert lan.leases() == ("10.36.5.64", "10.36.5.192")


def test_each_school_server_gets_an_internal_lan_and_a_classroom(farm: Farm) -> None:
    lans = lab.school_lans(farm)
    assert [lan.classroom for lan in lans] == ["classroom-0360005k", "classroom-0450040z"]
    for host in farm.hosts():
        lan = lab.school_lan(farm, host)
        spec = lab.container_spec(farm, host, "img:1")
        if lan is None:
            assert "NET_ADMIN" not in spec["cap_add"] and "school_lan" not in spec
            continue
        assert "NET_ADMIN" in spec["cap_add"]
        assert spec["school_lan"] == {"network": lan.network, "address": lan.server}
        classroom = lab.classroom_spec(farm, lan, "room:1")
        assert classroom["network"] == lan.network and classroom["cap_add"] == ["NET_ADMIN"]
        assert "ports" not in classroom
        # Docker's addresses stay out of the DHCP range and away from the server's
        etab = next(e for e in farm.spec.etablissements if e.uai == host.etablissement)
        assert etab.lan is not None
        docker_range = ipaddress.IPv4Network(lan.ip_range)
        assert docker_range.network_address > ipaddress.IPv4Address(etab.lan.leases()[1])
        assert ipaddress.IPv4Address(lan.server) not in docker_range


def test_school_servers_get_their_lan_as_flat_variables(farm: Farm) -> None:
    hv = host_vars(farm)
    lan = hv["se-0360005k"]["entfarm_school_lan"]
    assert set(lan) == {"subnet", "netmask", "prefix", "address", "router", "dhcp_start",
                        "dhcp_end"}
    assert "entfarm_school_lan" not in hv["idp"]


def test_school_server_step_converges_its_host_then_gates_on_its_suite(
        farm: Farm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from entfarm import runner, verify
    from entfarm.waves import steps

    step = steps.SchoolServerStep(farm)
    etab = next(e for e in farm.spec.etablissements if e.school_server)
    other = next(e for e in farm.spec.etablissements if not e.school_server)
    assert step.applicable(etab) and not step.applicable(other)
    played: list[tuple[str, str | None]] = []

    def fake_playbook(_farm: Farm, playbook: str, **kw: object) -> runner.RunResult:
        played.append((playbook, kw.get("limit")))  # type: ignore[arg-type]
        return runner.RunResult(playbook, tmp_path, "failed", 2, failures=[
            {"task": "replica | Wait", "message": "unreachable"}])

    monkeypatch.setattr(runner, "run_playbook", fake_playbook)
    with pytest.raises(UserError, match="se-0360005k: schools play failed"):
        step.apply(etab)
    assert played == [("playbooks/schools.yml", "se-0360005k")]

    suites: list[tuple[list[str], list[str] | None]] = []

    def fake_verify(_farm: Farm, roles: list[str], limit: str = "all",
                    extra_args: list[str] | None = None, hosts: list[str] | None = None,
                    log: Path | None = None) -> int:
        suites.append((roles, hosts))
        report = next(a.split("=", 1)[1] for a in extra_args or [] if a.startswith("--junit"))
        Path(report).write_text('<testsuite tests="9" failures="0" errors="0" skipped="9"/>')
        return 0

    monkeypatch.setattr(verify, "run_verify", fake_verify)
    monkeypatch.setattr(runner, "new_run_dir", lambda _farm, name: tmp_path)
    evidence = step.verify(etab)
    assert suites == [(["school_server"], ["se-0360005k"])]
    # every check skipped ("not verifiable") proves nothing: the gate does not pass
    assert evidence.outcome == steps.FAILED_GATE and "no check ran" in evidence.detail
