"""The lab's pure parts: the controller's mirror, the base image recipe, the container spec."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from entfarm import lab
from entfarm.model import Farm, load_farm

ROOT = Path(__file__).resolve().parents[2]

DEBIAN_SOURCES = """\
Types: deb
# http://snapshot.example.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

NODESOURCE = """\
Types: deb
URIs: https://nodejs.example.com/node_20.x
Suites: nodistro
Components: main
Architectures: amd64
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "sources.list.d").mkdir(exist_ok=True)
    return root


def test_mirror_from_deb822_skips_third_party_and_deb_src(tmp_path: Path) -> None:
    etc = write(tmp_path, {
        "sources.list.d/nodesource.sources": NODESOURCE,
        "sources.list.d/debian.sources": DEBIAN_SOURCES,
        "sources.list.d/google-cloud-sdk.list":
            "deb https://cloud-sdk.example.com/apt cloud-sdk-bookworm main\n",
    })
    mirror = lab.find_mirror(etc)
    assert mirror == lab.Mirror(
        main="http://mirror.example.org/debian",
        components=("main", "contrib"),
        updates="http://mirror.example.org/debian",
        security="http://mirror.example.org/debian-security",
    )


def test_third_party_listed_first_is_not_taken_for_debian(tmp_path: Path) -> None:
    etc = write(tmp_path, {
        "sources.list": "deb https://cloud-sdk.example.com/apt cloud-sdk-bookworm main\n",
        "sources.list.d/aaa-nodesource.sources": NODESOURCE,
        "sources.list.d/debian.sources": DEBIAN_SOURCES,
    })
    assert lab.find_mirror(etc).main == "http://mirror.example.org/debian"


def test_mirror_from_one_line_format_with_options_and_comments(tmp_path: Path) -> None:
    etc = write(tmp_path, {"sources.list": """\
# deb http://commented.example.org/debian bookworm main
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
http://ftp.example.net/debian bookworm main non-free-firmware  # the main archive
deb http://ftp.example.net/debian bookworm-updates main
deb http://security.example.net/debian-security bookworm-security main
"""})
    mirror = lab.find_mirror(etc)
    assert mirror.main == "http://ftp.example.net/debian"
    assert mirror.components == ("main", "non-free-firmware")
    assert mirror.updates == "http://ftp.example.net/debian"
    assert mirror.security == "http://security.example.net/debian-security"


def test_disabled_stanzas_and_files_apt_ignores_are_skipped(tmp_path: Path) -> None:
    etc = write(tmp_path, {
        "sources.list.d/old.sources": DEBIAN_SOURCES.replace(
            "Types: deb\n# http", "Enabled: no\nTypes: deb\n# http", 1
        ).replace("mirror.example.org", "old.example.org"),
        "sources.list.d/debian.list.disabled":
            "deb http://disabled.example.org/debian bookworm main\n",
        "sources.list.d/zz-debian.list": "deb http://live.example.org/debian bookworm main\n",
    })
    mirror = lab.find_mirror(etc)
    assert mirror.main == "http://live.example.org/debian"
    assert mirror.security == "http://old.example.org/debian-security"


def test_no_bookworm_source_is_a_user_error(tmp_path: Path) -> None:
    etc = write(tmp_path, {
        "sources.list.d/nodesource.sources": NODESOURCE,
        "sources.list": "deb http://archive.example.net/debian bullseye main\n",
    })
    with pytest.raises(lab.LabError, match="no Debian bookworm mirror"):
        lab.find_mirror(etc)


def test_sources_file_groups_suites_by_mirror() -> None:
    mirror = lab.Mirror("http://m.example.org/debian", ("main",),
                        "http://m.example.org/debian", "http://s.example.org/debian-security")
    text = mirror.sources_file()
    assert "URIs: http://m.example.org/debian\nSuites: bookworm bookworm-updates\n" in text
    assert "URIs: http://s.example.org/debian-security\nSuites: bookworm-security\n" in text
    assert text.count("Types: deb") == 2
    no_security = lab.Mirror("http://m.example.org/debian", ("main",), None, None)
    assert "security" not in no_security.sources_file()


# -- the recipe -----------------------------------------------------------------------------------


def test_recipe_hash_is_stable_and_ignores_the_mirror() -> None:
    assert lab.recipe_hash() == lab.recipe_hash()
    assert lab.image_tag() == lab.image_tag()
    assert "example" not in str(lab.recipe()) and "debian.org" not in str(lab.recipe())
    assert lab.image_tag().startswith("entfarm/debian-base:12-")
    assert len(lab.image_tag().rsplit("-", 1)[1]) == 12


def test_recipe_hash_changes_with_the_include_list() -> None:
    base = lab.recipe()
    more = {**base, "include": sorted([*base["include"], "vim"])}
    assert lab.recipe_hash(more) != lab.recipe_hash(base)
    assert lab.image_tag(more) != lab.image_tag(base)


def test_recipe_hash_changes_with_the_post_debootstrap_steps() -> None:
    base = lab.recipe()
    fewer_masks = {**base, "masked_units": base["masked_units"][1:]}
    assert lab.recipe_hash(fewer_masks) != lab.recipe_hash(base)


def test_include_list_has_what_systemd_and_ansible_need() -> None:
    for package in ("systemd", "systemd-sysv", "dbus", "python3", "python3-apt"):
        assert package in lab.INCLUDE


# -- the container spec ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def farm() -> Farm:
    return load_farm(ROOT / "inventories" / "lab")


def test_only_the_edge_publishes_and_only_on_loopback(farm: Farm) -> None:
    specs = {h.name: lab.container_spec(farm, h, "img:1") for h in farm.hosts()}
    assert len(specs) == 8
    published = {name: spec["ports"] for name, spec in specs.items() if spec["ports"]}
    assert list(published) == ["edge"]
    assert published["edge"] == {
        "443/tcp": ("127.0.0.1", farm.lab.publish.https),
        "80/tcp": ("127.0.0.1", farm.lab.publish.http),
    }


def test_spec_runs_systemd_without_privileged(farm: Farm) -> None:
    host = next(h for h in farm.hosts() if h.name == "idp")
    spec = lab.container_spec(farm, host, "img:1")
    assert "privileged" not in spec
    assert spec["cap_add"] == ["SYS_ADMIN"]
    assert spec["cgroupns"] == "host"
    assert spec["volumes"] == {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}}
    assert set(spec["tmpfs"]) == {"/run", "/run/lock"}  # never /tmp: Docker's tmpfs is noexec
    assert spec["environment"] == {"container": "docker"}
    assert spec["stop_signal"] == "SIGRTMIN+3"
    assert spec["name"] == "entfarm-lab-idp"
    assert spec["hostname"] == "idp"
    assert spec["network"] == "entfarm-lab"
    assert spec["networking_config"] == {"entfarm-lab": {
        "Aliases": ["idp"], "IPAMConfig": {"IPv4Address": lab.lab_addresses(farm)["idp"]}}}
    assert spec["labels"]["entfarm.farm"] == "lab"
    assert spec["labels"]["entfarm.host"] == "idp"
    assert spec["labels"]["entfarm.image"] == "img:1"


def test_spec_label_changes_with_ports_and_image(farm: Farm) -> None:
    edge = next(h for h in farm.hosts() if h.name == "edge")
    before = lab.container_spec(farm, edge, "img:1")["labels"]["entfarm.spec"]
    assert lab.container_spec(farm, edge, "img:1")["labels"]["entfarm.spec"] == before
    assert lab.container_spec(farm, edge, "img:2")["labels"]["entfarm.spec"] != before
    moved = farm.spec.model_copy(update={"lab": farm.lab.model_copy(
        update={"publish": farm.lab.publish.model_copy(update={"https": 9443})})})
    other = Farm(moved, farm.inventory_dir)
    assert lab.container_spec(other, edge, "img:1")["labels"]["entfarm.spec"] != before


def _with_lab(farm: Farm, **update: object) -> Farm:
    spec = farm.spec.model_copy(update={"lab": farm.lab.model_copy(update=update)})
    return Farm(spec, farm.inventory_dir)


def test_each_host_gets_a_fixed_address_that_other_hosts_leave_alone(farm: Farm) -> None:
    addresses = lab.lab_addresses(farm)
    assert set(addresses) == {h.name for h in farm.hosts()}
    assert len(set(addresses.values())) == len(addresses)  # one each
    net = ipaddress.IPv4Network(farm.lab.subnet)
    # Inside the subnet, never the bridge's own (the gateway, first host) address.
    assert all(ipaddress.IPv4Address(a) in list(net.hosts())[1:] for a in addresses.values())
    assert lab.lab_addresses(farm) == addresses  # the same every time
    # A school server more, or one less, moves nobody else (no collision in this farm).
    more = farm.spec.model_copy(update={"etablissements": [
        *farm.spec.etablissements, farm.spec.etablissements[-1].model_copy(
            update={"uai": "0450041A", "lan": farm.spec.etablissements[-1].lan})]})
    grown = lab.lab_addresses(Farm(more, farm.inventory_dir))
    assert len(grown) == len(addresses) + 1
    assert {h: grown[h] for h in addresses} == addresses
    # Another subnet moves everyone into it; one too small for the hosts is refused.
    other = lab.lab_addresses(_with_lab(farm, subnet="10.99.0.0/26"))
    assert all(a.startswith("10.99.0.") for a in other.values())
    crowded = Farm(more.model_copy(update={"lab": farm.lab.model_copy(
        update={"subnet": "10.99.0.0/26"})}), farm.inventory_dir)
    assert len(lab.lab_addresses(crowded)) == len(grown)
    tiny = _with_lab(farm, subnet="10.99.0.0/29")  # past validation: 5 addresses for 8 hosts
    with pytest.raises(lab.LabError, match=r"room for 5 hosts, the farm has 8"):
        lab.lab_addresses(tiny)


def test_school_servers_get_containers(farm: Farm) -> None:
    names = [lab.container_spec(farm, h, "img:1")["name"] for h in farm.hosts()]
    assert "entfarm-lab-se-0360005k" in names
    assert "entfarm-lab-se-0450040z" in names


# -- Docker missing -------------------------------------------------------------------------------


def test_no_docker_socket_says_how_to_start_docker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(lab.LabError, match=r"scripts/ensure-docker") as info:
        lab.docker_client()
    assert "\n" not in str(info.value)


def test_docker_not_answering_says_how_to_start_docker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    path = tmp_path / "docker.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # bound, never listening: connections are refused
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        with pytest.raises(lab.LabError, match=r"does not answer on unix://.*ensure-docker"):
            lab.docker_client()
    finally:
        dead.close()


# -- boot timeout ---------------------------------------------------------------------------------


class _Exec:
    def __init__(self, exit_code: int, output: str):
        self.exit_code, self.output = exit_code, output.encode()


class _StuckContainer:
    """A container whose systemd never finishes booting, with one failed unit."""

    name = "entfarm-lab-idp"
    status = "running"

    def reload(self) -> None:
        pass

    def exec_run(self, command: list[str]) -> _Exec:
        if "is-system-running" in command:
            return _Exec(1, "starting\n")
        if "--failed" in command:
            return _Exec(0, "slapd.service loaded failed failed OpenLDAP\n")
        return _Exec(0, "12 lemonldap-ng.service start waiting\n")


def test_boot_timeout_names_the_host_and_its_failed_units() -> None:
    with pytest.raises(lab.LabError) as info:
        lab.wait_for_systemd(_StuckContainer(), "idp", timeout=0)
    message = str(info.value)
    assert message.startswith("idp: systemd is still 'starting' after 0 s")
    assert "failed units: slapd.service" in message
    assert "lemonldap-ng.service" in message
    assert "\n" not in message
