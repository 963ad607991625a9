"""The lab on a real Docker Engine: every host boots systemd, `up` is idempotent.

The lab is left up at the end: the deploy tests that run after these reuse it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from entfarm import lab
from entfarm.model import Farm, load_farm

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def farm() -> Farm:
    return load_farm(ROOT / "inventories" / "lab")


@pytest.fixture(scope="module")
def client() -> Any:
    return lab.docker_client()


@pytest.fixture(scope="module")
def first_up(farm: Farm) -> list[lab.HostState]:
    lines: list[str] = []
    states = lab.up(farm, progress=lines.append)
    assert any(line.startswith("base image: ") for line in lines)
    return states


def run(client: Any, farm: Farm, host: str, *command: str) -> tuple[int, str]:
    result = client.containers.get(farm.container_name(host)).exec_run(list(command))
    return result.exit_code, result.output.decode().strip()


def by_host(states: list[lab.HostState]) -> dict[str, lab.HostState]:
    return {s.host: s for s in states}


def test_up_runs_every_host_with_systemd(
    first_up: list[lab.HostState], farm: Farm, client: Any
) -> None:
    states = by_host(first_up)
    assert set(states) >= {h.name for h in farm.hosts()}
    assert len(farm.hosts()) == 8
    for host in farm.hosts():
        state = states[host.name]
        assert state.state == "running", state
        assert state.container == farm.container_name(host.name)
        assert state.ip == lab.lab_addresses(farm)[host.name], state
        # Asked for, not handed out: Docker gives it back when its daemon restarts.
        endpoint = client.containers.get(state.container).attrs["NetworkSettings"][
            "Networks"][farm.lab.network]
        assert (endpoint.get("IPAMConfig") or {}).get("IPv4Address") == state.ip
        _, systemd = run(client, farm, host.name, "systemctl", "is-system-running")
        assert systemd in ("running", "degraded"), (host.name, systemd)
        _, pid1 = run(client, farm, host.name, "cat", "/proc/1/comm")
        assert pid1 == "systemd"


def test_second_up_changes_nothing(first_up: list[lab.HostState], farm: Farm) -> None:
    again = lab.up(farm)
    assert {s.host: s.action for s in again} == {n: "unchanged" for n in lab.lab_names(farm)}
    assert {s.host: s.ip for s in again if s.ip} == {s.host: s.ip for s in first_up if s.ip}


def test_only_the_edge_is_published_on_loopback(
    first_up: list[lab.HostState], farm: Farm, client: Any
) -> None:
    https, http = farm.lab.publish.https, farm.lab.publish.http
    for host in farm.hosts():
        container = client.containers.get(farm.container_name(host.name))
        bindings = container.attrs["HostConfig"]["PortBindings"] or {}
        if host.name == "edge":
            assert bindings == {
                "443/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(https)}],
                "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(http)}],
            }
            assert by_host(first_up)["edge"].published == {
                f"127.0.0.1:{https}": "443/tcp", f"127.0.0.1:{http}": "80/tcp",
            }
        else:
            assert bindings == {}, host.name
            assert by_host(first_up)[host.name].published == {}


def test_hosts_resolve_each_other_by_name(
    first_up: list[lab.HostState], farm: Farm, client: Any
) -> None:
    states = by_host(first_up)
    for source, target in (("edge", "idp"), ("idp", "data"), ("se-0360005k", "portal-2")):
        code, out = run(client, farm, source, "getent", "hosts", target)
        assert code == 0, (source, target, out)
        assert out.split()[0] == states[target].ip


def test_each_host_has_its_own_machine_id_and_the_controllers_mirror(
    first_up: list[lab.HostState], farm: Farm, client: Any
) -> None:
    ids = {run(client, farm, h.name, "cat", "/etc/machine-id")[1] for h in farm.hosts()}
    assert len(ids) == len(farm.hosts()) and "" not in ids
    _, sources = run(client, farm, "data", "cat", "/etc/apt/sources.list.d/debian.sources")
    assert f"URIs: {lab.find_mirror().main}\n" in sources + "\n"
    assert run(client, farm, "data", "test", "-e", "/etc/apt/sources.list")[0] != 0


def test_base_image_is_cached(first_up: list[lab.HostState], client: Any) -> None:
    lines: list[str] = []
    assert lab.ensure_base_image(client, lines.append) == lab.image_tag()
    assert lines == [f"base image: cached ({lab.image_tag()})"]


def test_status_reports_every_host(first_up: list[lab.HostState], farm: Farm) -> None:
    states = lab.status(farm)
    assert [s.host for s in states] == lab.lab_names(farm)  # the classrooms after the hosts
    assert all(s.state == "running" and s.action == "" for s in states)
    assert {s.host: s.ip for s in states} == {s.host: s.ip for s in first_up}


def test_a_stopped_host_is_started(first_up: list[lab.HostState], farm: Farm, client: Any) -> None:
    client.containers.get(farm.container_name("portal-1")).stop(timeout=20)
    assert by_host(lab.status(farm))["portal-1"].state == "exited"
    actions = {s.host: s.action for s in lab.up(farm)}
    assert actions["portal-1"] == "started"
    assert {a for h, a in actions.items() if h != "portal-1"} == {"unchanged"}
    _, systemd = run(client, farm, "portal-1", "systemctl", "is-system-running")
    assert systemd in ("running", "degraded")


@pytest.fixture()
def stale_portal(farm: Farm, client: Any) -> Iterator[None]:
    """portal-2 as if made from an older base image."""
    host = next(h for h in farm.hosts() if h.name == "portal-2")
    client.containers.get(farm.container_name("portal-2")).remove(force=True)
    spec = lab.container_spec(farm, host, lab.image_tag())
    spec["labels"]["entfarm.image"] = "entfarm/debian-base:12-000000000000"
    client.containers.create(**spec).start()
    yield


def test_a_host_from_another_image_is_recreated(
    first_up: list[lab.HostState], farm: Farm, client: Any, stale_portal: None
) -> None:
    actions = {s.host: s.action for s in lab.up(farm)}
    assert actions["portal-2"] == "recreated"
    container = client.containers.get(farm.container_name("portal-2"))
    assert container.labels["entfarm.image"] == lab.image_tag()


def test_a_host_gone_from_the_farm_is_removed(
    first_up: list[lab.HostState], farm: Farm, client: Any
) -> None:
    ghost = client.containers.create(
        lab.image_tag(), name=farm.container_name("ghost"), command=["sleep", "60"],
        labels={"entfarm.farm": farm.name, "entfarm.host": "ghost"},
    )
    states = lab.up(farm)
    assert by_host(states)["ghost"].action == "removed"
    assert {s.action for s in states if s.host != "ghost"} == {"unchanged"}
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(ghost.id)


def test_a_subnet_docker_refuses_is_named_with_the_fix(
    first_up: list[lab.HostState], farm: Farm, client: Any, tmp_path: Path
) -> None:
    """A second farm asking for the lab's own subnet: Docker refuses the overlap, and the
    error names lab.subnet and the farm file; nothing is created, the lab keeps its network."""
    text = (ROOT / "inventories" / "lab" / "farm.yml").read_text(encoding="utf-8")
    text = text.replace("  name: lab\n", "  name: labclash\n", 1)
    text = text.replace("  network: entfarm-lab\n",
                        f"  network: entfarm-labclash\n  subnet: {farm.lab.subnet}\n", 1)
    (tmp_path / "farm.yml").write_text(text, encoding="utf-8")
    clash = load_farm(tmp_path)
    assert clash.lab.network == "entfarm-labclash" and clash.lab.subnet == farm.lab.subnet
    with pytest.raises(lab.LabError) as caught:
        lab._ensure_network(client, clash, None)
    message = str(caught.value)
    assert f"Docker cannot create the lab network entfarm-labclash on {farm.lab.subnet}" \
        in message
    assert f"choose another lab.subnet in {clash.file}" in message
    assert not [n for n in client.networks.list(names=["entfarm-labclash"])
                if n.name == "entfarm-labclash"]
    network = client.networks.get(farm.lab.network)
    assert {c.name for c in network.containers} >= {farm.container_name(h.name)
                                                    for h in farm.hosts()}
