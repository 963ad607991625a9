"""The local lab: every host of a lab farm as a Docker container with systemd as PID 1.

No image registry is reachable, so the Debian 12 base image is bootstrapped here from the
controller's own Debian mirror (read from its apt sources) and imported into Docker, tagged by
the hash of its recipe: it is rebuilt only when the recipe changes. Containers are disposable (the
farm's state lives in its inventory): ``up`` creates what is missing, starts what is stopped and
recreates what was made from another image or another spec; it never touches a container that is
right.
"""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from .errors import UserError
from .model import Farm, FarmHost

Progress = Callable[[str], None]


class LabError(UserError):
    """A lab problem the user can fix (Docker missing, no Debian mirror, a host not booting)."""


# -- the base image recipe ------------------------------------------------------------------------

SUITE = "bookworm"
SECURITY_SUITE = f"{SUITE}-security"
UPDATES_SUITE = f"{SUITE}-updates"
VARIANT = "minbase"
# Only what systemd as PID 1 and Ansible's modules need; roles install the rest.
INCLUDE: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",  # /sbin/init
    "dbus",  # systemctl talks to systemd through it; logind and hostnamed need it
    "python3",  # Ansible modules
    "python3-apt",  # ansible.builtin.apt
    "ca-certificates",
    "iproute2",  # facts: default interface and address
    "procps",
    "sudo",  # become
)
# Units that make no sense in a container: no consoles, no devices to manage (Docker fills /dev),
# no root file system to remount, nothing to ask on first boot, no kernel modules or debug fs.
# apt's daily timers are masked so that they never hold the dpkg lock while Ansible runs.
MASKED_UNITS: tuple[str, ...] = (
    "getty.target",
    "getty@tty1.service",
    "console-getty.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-remount-fs.service",
    "systemd-firstboot.service",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)
# Emptied: systemd generates a machine id per container on its first boot; Docker provides
# resolv.conf, hostname and hosts.
EMPTIED_FILES: tuple[str, ...] = ("etc/machine-id", "etc/resolv.conf", "etc/hostname")
REMOVED_PATHS: tuple[str, ...] = ("var/lib/dbus/machine-id", "etc/apt/sources.list")
# The hosts keep using the controller's mirror; {main}, {security} are filled at build time
# (the mirror is deliberately not part of the recipe hash: a moved mirror serves the same archive).
SOURCES_PATH = "etc/apt/sources.list.d/debian.sources"
SOURCES_HEADER = "# Written by entfarm's lab from the controller's apt sources.\n"
SOURCES_STANZA = """\
Types: deb
URIs: {uri}
Suites: {suites}
Components: {components}
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
IMAGE_CHANGES: tuple[str, ...] = (
    'CMD ["/sbin/init"]',
    "ENV container=docker",
)
# STOPSIGNAL SIGRTMIN+3 (systemd's orderly shutdown) belongs here too, but Engine 20.10 refuses it
# in an import ("stopsignal is not a valid change command"): the containers set it instead.
RECIPE_VERSION = 1  # bump when the build steps change in a way the data above does not show
IMAGE_REPOSITORY = "entfarm/debian-base"
BUILD_DIR = "/var/tmp"

BOOT_TIMEOUT = 90.0  # seconds for systemd to reach running or degraded in a container


def recipe() -> dict[str, Any]:
    """Everything that decides the content of the base image, except the mirror it comes from."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "variant": VARIANT,
        "include": sorted(INCLUDE),
        "masked_units": sorted(MASKED_UNITS),
        "emptied_files": sorted(EMPTIED_FILES),
        "removed_paths": sorted(REMOVED_PATHS),
        "sources": [SOURCES_PATH, SOURCES_HEADER, SOURCES_STANZA],
        "changes": list(IMAGE_CHANGES),
    }


def recipe_hash(spec: dict[str, Any] | None = None) -> str:
    data = json.dumps(recipe() if spec is None else spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def image_tag(spec: dict[str, Any] | None = None) -> str:
    return f"{IMAGE_REPOSITORY}:12-{recipe_hash(spec)[:12]}"


# -- the controller's Debian mirror ---------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str  # file it was read from, for messages


@dataclass(frozen=True)
class Mirror:
    """Where the lab takes Debian from: the controller's own sources for bookworm."""

    main: str
    components: tuple[str, ...]
    updates: str | None
    security: str | None

    def sources_file(self) -> str:
        """The image's deb822 sources: one stanza per mirror, in the controller's order."""
        by_uri: dict[str, list[str]] = {}
        for uri, suite in ((self.main, SUITE), (self.updates, UPDATES_SUITE),
                           (self.security, SECURITY_SUITE)):
            if uri:
                by_uri.setdefault(uri, []).append(suite)
        stanzas = [
            SOURCES_STANZA.format(uri=uri, suites=" ".join(suites),
                                  components=" ".join(self.components))
            for uri, suites in by_uri.items()
        ]
        return SOURCES_HEADER + "\n".join(stanzas)


def parse_one_line(text: str, origin: str) -> list[AptSource]:
    """``deb [options] uri suite component...`` lines (sources.list and *.list)."""
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=amd64 signed-by=...]
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            continue
        found.append(AptSource(words[1].rstrip("/"), (words[2],), tuple(words[3:]), origin))
    return found


def parse_deb822(text: str, origin: str) -> list[AptSource]:
    """Stanzas of ``Types: / URIs: / Suites: / Components:`` (*.sources)."""
    found = []
    stanzas: list[dict[str, str]] = [{}]
    last_key: str | None = None
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            if stanzas[-1]:
                stanzas.append({})
            last_key = None
            continue
        if raw[0] in " \t" and last_key:  # continuation line
            stanzas[-1][last_key] += " " + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last_key = key.strip().lower()
        stanzas[-1][last_key] = value.strip()
    for stanza in stanzas:
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        suites = tuple(stanza.get("suites", "").split())
        components = tuple(stanza.get("components", "").split())
        for uri in stanza.get("uris", "").split():
            found.append(AptSource(uri.rstrip("/"), suites, components, origin))
    return found


def read_apt_sources(etc_apt: str | Path = "/etc/apt") -> list[AptSource]:
    """Every ``deb`` source apt itself would read (other file names are ignored by apt too)."""
    root = Path(etc_apt)
    found: list[AptSource] = []
    main_list = root / "sources.list"
    if main_list.is_file():
        found += parse_one_line(main_list.read_text(errors="replace"), str(main_list))
    for path in sorted(glob.glob(str(root / "sources.list.d" / "*"))):
        if path.endswith(".list"):
            found += parse_one_line(Path(path).read_text(errors="replace"), path)
        elif path.endswith(".sources"):
            found += parse_deb822(Path(path).read_text(errors="replace"), path)
    return found


def find_mirror(etc_apt: str | Path = "/etc/apt") -> Mirror:
    """The controller's mirror for bookworm (and its security archive). Third-party repositories
    are those serving no Debian suite (nodistro, cloud-sdk-bookworm ...): they are skipped."""
    sources = [s for s in read_apt_sources(etc_apt) if not s.uri.startswith("cdrom:")]

    def serving(suite: str) -> AptSource | None:
        return next((s for s in sources if suite in s.suites), None)

    main = serving(SUITE)
    if main is None:
        raise LabError(
            f"no Debian {SUITE} mirror in the controller's apt sources ({etc_apt}/sources.list, "
            f"{etc_apt}/sources.list.d/*.sources|*.list): add a `deb <mirror> {SUITE} main` entry; "
            "the lab bootstraps its base image from it"
        )
    updates = serving(UPDATES_SUITE)
    security = serving(SECURITY_SUITE)
    components = main.components or ("main",)
    return Mirror(
        main=main.uri,
        components=components,
        updates=updates.uri if updates else None,
        security=security.uri if security else None,
    )


# -- Docker ---------------------------------------------------------------------------------------

_ENSURE_DOCKER = "run `bash scripts/ensure-docker` (installs Debian's docker.io and starts dockerd)"


def docker_client() -> Any:
    """A client of a Docker Engine that answers, or a LabError saying how to get one."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        socket = host[len("unix://"):]
        if not os.path.exists(socket):
            raise LabError(f"Docker Engine is not running (no socket {socket}): {_ENSURE_DOCKER}")
        if not os.access(socket, os.R_OK | os.W_OK):
            raise LabError(
                f"no permission on {socket}: run as root or add your user to the docker group"
            )
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as exc:
        raise LabError(f"Docker Engine does not answer on {host}: {_ENSURE_DOCKER}") from exc
    return client


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


# -- building the base image ----------------------------------------------------------------------


def ensure_base_image(client: Any, progress: Progress | None = None) -> str:
    """The tag of the base image for the current recipe, built first when missing."""
    tag = image_tag()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        pass
    else:
        _say(progress, f"base image: cached ({tag})")
        return tag
    mirror = find_mirror()
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None
    )
    if debootstrap is None:
        raise LabError("debootstrap is missing: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise LabError("building the lab base image needs root (debootstrap): run as root")
    started = time.monotonic()
    _say(progress, f"base image: building {tag} from {mirror.main} (takes a few minutes)")
    workdir = tempfile.mkdtemp(prefix="entfarm-base-", dir=BUILD_DIR)
    try:
        rootfs = Path(workdir) / "rootfs"
        _debootstrap(debootstrap, rootfs, mirror, progress)
        _prepare_rootfs(rootfs, mirror)
        _say(progress, "base image: importing into Docker")
        _import(client, rootfs, tag)
    finally:
        _remove_tree(workdir)
    _say(progress, f"base image: built {tag} in {time.monotonic() - started:.0f} s")
    return tag


def _debootstrap(binary: str, rootfs: Path, mirror: Mirror, progress: Progress | None) -> None:
    command = [
        binary, f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
        f"--components={','.join(mirror.components)}", SUITE, str(rootfs), mirror.main,
    ]
    tail: list[str] = []
    seen: set[str] = set()
    last = time.monotonic()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail = [*tail[-19:], line]
            # "I: Retrieving adduser 3.134" ...: the first line of each kind of step, then a
            # heartbeat every 15 s, rather than one line per package
            if line.startswith("I: "):
                verb = line[3:].split(" ", 1)[0]
                if verb not in seen or time.monotonic() - last > 15:
                    seen.add(verb)
                    last = time.monotonic()
                    _say(progress, f"base image: debootstrap: {line[3:]}")
    if proc.returncode != 0:
        errors = [t for t in tail if t.startswith(("E:", "W:"))] or tail[-1:]
        raise LabError(
            f"base image: debootstrap {SUITE} from {mirror.main} failed "
            f"(exit {proc.returncode}): {' | '.join(errors[-3:]) or 'no output'}"
        )


def _prepare_rootfs(rootfs: Path, mirror: Mirror) -> None:
    for name in EMPTIED_FILES:
        (rootfs / name).write_text("")
    for name in REMOVED_PATHS:
        (rootfs / name).unlink(missing_ok=True)
    (rootfs / SOURCES_PATH).parent.mkdir(parents=True, exist_ok=True)
    (rootfs / SOURCES_PATH).write_text(mirror.sources_file())
    units = rootfs / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    for leftover in glob.glob(str(rootfs / "var/cache/apt/archives/*.deb")):
        os.unlink(leftover)


def _import(client: Any, rootfs: Path, tag: str) -> None:
    """Import the root file system untagged, then tag it: a partial image never gets the tag."""
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs),
         "-cf", "-", "."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert tar.stdout is not None and tar.stderr is not None
    stdout = tar.stdout

    def chunks() -> Iterator[bytes]:
        while block := stdout.read(1 << 20):
            yield block

    image_id = None
    saved_timeout = client.api.timeout
    client.api.timeout = 900  # the daemon unpacks the whole tree before it answers
    try:
        answer = client.api.import_image_from_stream(chunks(), changes=list(IMAGE_CHANGES))
        image_id = _imported_id(answer)
    except docker.errors.DockerException as exc:
        raise LabError(f"base image: Docker refused the import: {exc}") from exc
    finally:
        client.api.timeout = saved_timeout
        stdout.close()
        tar_errors = tar.stderr.read().decode(errors="replace").strip()
        tar.stderr.close()
        rc = tar.wait()
    if rc != 0 or image_id is None:
        if image_id:
            client.images.remove(image_id, force=True)
        reason = tar_errors.splitlines()[-1] if tar_errors else f"no image id in {answer!r}"
        raise LabError(f"base image: packing the root file system failed: {reason}")
    client.images.get(image_id).tag(*tag.split(":", 1))


def _imported_id(answer: Any) -> str | None:
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    ids = re.findall(r"sha256:[0-9a-f]{64}", text)
    return ids[-1] if ids else None


def _remove_tree(path: str) -> None:
    """Remove a build directory; unmount whatever a failed debootstrap left mounted inside."""
    with open("/proc/self/mounts") as mounts:
        inside = [
            line.split()[1] for line in mounts
            if line.split()[1] == path or line.split()[1].startswith(path + "/")
        ]
    for mountpoint in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)
    # --one-file-system: never follow a mount we failed to remove into the host's tree
    subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


# -- containers -----------------------------------------------------------------------------------


@dataclass
class HostState:
    host: str
    container: str
    state: str  # Docker's status (running, exited, created ...) or "absent"
    action: str = ""  # created | started | unchanged | recreated | removed; "" for status
    ip: str | None = None  # address on the lab network
    published: dict[str, str] = field(default_factory=dict)  # "127.0.0.1:8443" -> "443/tcp"


def is_edge(host: FarmHost) -> bool:
    return "proxy" in host.services


def network_aliases(farm: Farm, host: FarmHost) -> list[str]:
    """Names the host answers to on the lab network: its farm name and, for the edge, every
    public name of the farm, so that hosts reach public services (the portal validating
    tickets at https://cas.<domain>/) through the edge as they would through DNS in
    production. Docker's embedded DNS resolves them on every lab container."""
    aliases = [host.name]
    if is_edge(host):
        aliases += [n for n in farm.all_public_names() if n not in aliases]
    return aliases


def lab_addresses(farm: Farm) -> dict[str, str]:
    """Host name -> its fixed address on the lab network.

    Fixed, because Docker hands dynamic addresses out again when its daemon restarts, in
    whatever order the containers come back, and services bind to their host's address
    (ansible_default_ipv4): a lab whose addresses moved is broken until the next deploy. Each
    address comes from a hash of the host's name (first free one after it, names taken in
    order), so adding or removing a host leaves the others where they were, unless they
    collide. The subnet's first host address is the bridge's own (the gateway).
    """
    net = ipaddress.IPv4Network(farm.lab.subnet)
    pool = list(net.hosts())[1:]
    names = sorted(h.name for h in farm.hosts())
    if len(names) > len(pool):
        raise LabError(f"lab.subnet {net} has room for {len(pool)} hosts, the farm has "
                       f"{len(names)}: give a larger one in {farm.file}")
    taken: dict[ipaddress.IPv4Address, str] = {}
    out: dict[str, str] = {}
    for name in names:
        i = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % len(pool)
        while pool[i] in taken:
            i = (i + 1) % len(pool)
        taken[pool[i]] = name
        out[name] = str(pool[i])
    return out


def container_spec(farm: Farm, host: FarmHost, image: str) -> dict[str, Any]:
    """``client.containers.create`` arguments for one host: systemd as PID 1 without --privileged.

    On this cgroup v1 host, SYS_ADMIN (systemd mounts its own file systems), the host cgroup
    namespace with /sys/fs/cgroup read-write (systemd creates its hierarchy under the container's
    cgroup) and tmpfs on /run and /run/lock are enough: Docker's default seccomp profile lets
    systemd boot, so it stays on. /tmp is not a tmpfs: Docker mounts tmpfs noexec and installers
    run from /tmp.
    """
    network = farm.lab.network
    lan = school_lan(farm, host)
    spec: dict[str, Any] = {
        "image": image,
        "name": farm.container_name(host.name),
        "hostname": host.name,
        "detach": True,
        # dnsmasq answers DHCP on the school LAN: it sets ARP entries, which needs NET_ADMIN
        "cap_add": ["SYS_ADMIN", *(["NET_ADMIN"] if lan else [])],
        "cgroupns": "host",
        "volumes": {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
        "tmpfs": {"/run": "", "/run/lock": ""},
        "environment": {"container": "docker"},
        "stop_signal": "SIGRTMIN+3",
        "restart_policy": {"Name": "unless-stopped"},
        "network": network,
        # the alias lets hosts reach each other by their farm name (idp, edge ...); the
        # address asked for is kept across restarts of the Docker daemon (see lab_addresses)
        "networking_config": {network: {
            "Aliases": network_aliases(farm, host),
            "IPAMConfig": {"IPv4Address": lab_addresses(farm)[host.name]}}},
        "ports": {},
    }
    if is_edge(host):
        publish = farm.lab.publish
        spec["ports"] = {"443/tcp": ("127.0.0.1", publish.https),
                         "80/tcp": ("127.0.0.1", publish.http)}
    if lan:
        # connected after create (one network per create call): part of the spec all the same
        spec["school_lan"] = {"network": lan.network, "address": lan.server}
    spec["labels"] = {
        "entfarm.farm": farm.name,
        "entfarm.host": host.name,
        "entfarm.image": image,
        # any other change of the spec (ports, network ...) recreates the container
        "entfarm.spec": hashlib.sha256(
            json.dumps(spec, sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
    }
    return spec


# -- school LANs and their classroom clients ----------------------------------------------------
# A school server serves its collège's LAN (DHCP, DNS, proxy, files): in the lab each LAN is a
# Docker network of its own (no route out: see _ensure_lan_network), where the school server has
# its farm.yml address and a "classroom" container plays a pupil's workstation. Docker's IPAM hands
# out addresses only from a small block at the top of the subnet, outside the school server's
# DHCP range; the classroom drops its Docker address and asks the school server for a lease.

CLASSROOM_PACKAGES: tuple[str, ...] = ("isc-dhcp-client", "smbclient", "curl", "bind9-host")
CLASSROOM_REPOSITORY = "entfarm/classroom"


@dataclass(frozen=True)
class SchoolLanSpec:
    network: str  # Docker network name
    subnet: str
    gateway: str  # the Docker bridge's own address (the controller side), last host of subnet
    ip_range: str  # where Docker's IPAM may hand addresses
    server: str  # the school server's address on it
    classroom: str  # host name of the classroom client


def school_lan(farm: Farm, host: FarmHost) -> SchoolLanSpec | None:
    """The lab LAN of a school server, None for central hosts and schools without a LAN."""
    etab = next((e for e in farm.spec.etablissements if e.uai == host.etablissement), None)
    if etab is None or etab.lan is None:
        return None
    net = etab.lan.network()
    top = ipaddress.IPv4Network(f"{net[-1]}/{max(net.prefixlen, 28)}", strict=False)
    return SchoolLanSpec(
        network=f"{farm.lab.network}-{host.name}", subnet=str(net), gateway=str(net[-2]),
        ip_range=str(top), server=etab.lan.server_address(),
        classroom=f"classroom-{host.name.removeprefix('se-')}")


def school_lans(farm: Farm) -> list[SchoolLanSpec]:
    return [lan for host in farm.hosts() if (lan := school_lan(farm, host))]


def classroom_image_tag(base: str) -> str:
    digest = hashlib.sha256(json.dumps([base, sorted(CLASSROOM_PACKAGES)]).encode()).hexdigest()
    return f"{CLASSROOM_REPOSITORY}:{digest[:12]}"


def ensure_classroom_image(client: Any, farm: Farm, base: str,
                           progress: Progress | None = None) -> str:
    """The base image with the classroom's tools (DHCP client, smbclient, curl, host), built
    once on the farm network, where the Debian mirror is reachable, and committed."""
    tag = classroom_image_tag(base)
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    _say(progress, f"classroom image: installing {', '.join(CLASSROOM_PACKAGES)}")
    builder = client.containers.run(
        base, ["sleep", "infinity"], name=f"entfarm-{farm.name}-classroom-build", detach=True,
        network=farm.lab.network, labels={"entfarm.farm": farm.name}, remove=False)
    try:
        command = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                   "--no-install-recommends " + " ".join(CLASSROOM_PACKAGES)
                   + " && apt-get clean")
        result = builder.exec_run(["sh", "-c", command])
        if result.exit_code != 0:
            tail = result.output.decode(errors="replace").strip().splitlines()[-3:]
            raise LabError(f"classroom image: apt-get failed: {' | '.join(tail)}")
        repository, version = tag.split(":", 1)
        builder.commit(repository=repository, tag=version,
                       changes=['CMD ["sleep", "infinity"]'])
    finally:
        builder.remove(force=True)
    _say(progress, f"classroom image: built {tag}")
    return tag


def _ensure_lan_network(client: Any, farm: Farm, lan: SchoolLanSpec,
                        progress: Progress | None) -> None:
    found = [n for n in client.networks.list(names=[lan.network]) if n.name == lan.network]
    if found:
        labels = found[0].attrs.get("Labels") or {}
        if labels.get("entfarm.farm") != farm.name:
            raise LabError(f"Docker network {lan.network!r} exists but does not belong to farm "
                           f"{farm.name!r}: remove it")
        config = (found[0].attrs.get("IPAM") or {}).get("Config") or [{}]
        if config[0].get("Subnet") == lan.subnet and not found[0].attrs.get("Internal"):
            return
        found[0].reload()  # a listed network does not name its containers
        for container in found[0].containers:
            found[0].disconnect(container, force=True)
        found[0].remove()
    pool = docker.types.IPAMPool(subnet=lan.subnet, gateway=lan.gateway, iprange=lan.ip_range)
    # Not internal: Docker drops the DHCP broadcasts (to 255.255.255.255, outside the subnet)
    # of an internal network. No address of the LAN has a route out all the same: the leases
    # announce no router, and the classroom drops the one Docker gave it.
    client.networks.create(lan.network, driver="bridge", internal=False,
                           ipam=docker.types.IPAMConfig(pool_configs=[pool]),
                           labels={"entfarm.farm": farm.name, "entfarm.lan": lan.subnet})
    _say(progress, f"network {lan.network}: created ({lan.subnet})")


def _connect_lan(container: Any, client: Any, lan: SchoolLanSpec) -> None:
    container.reload()
    if lan.network in (container.attrs.get("NetworkSettings", {}).get("Networks") or {}):
        return
    client.networks.get(lan.network).connect(container, ipv4_address=lan.server)


def classroom_spec(farm: Farm, lan: SchoolLanSpec, image: str) -> dict[str, Any]:
    """A workstation of the school LAN: no systemd, only tools; NET_ADMIN for its DHCP client."""
    spec: dict[str, Any] = {
        "image": image,
        "name": farm.container_name(lan.classroom),
        "hostname": lan.classroom,
        "detach": True,
        "command": ["sleep", "infinity"],
        "cap_add": ["NET_ADMIN"],
        "restart_policy": {"Name": "unless-stopped"},
        "network": lan.network,
    }
    spec["labels"] = {
        "entfarm.farm": farm.name, "entfarm.host": lan.classroom, "entfarm.image": image,
        "entfarm.spec": hashlib.sha256(
            json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16],
    }
    return spec


def _ensure_classrooms(client: Any, farm: Farm, base: str,
                       progress: Progress | None) -> list[HostState]:
    lans = school_lans(farm)
    if not lans:
        return []
    image = ensure_classroom_image(client, farm, base, progress)
    states = []
    for lan in lans:
        spec = classroom_spec(farm, lan, image)
        container = _container(client, spec["name"])
        action = "unchanged"
        if container is not None and container.labels.get("entfarm.spec") != \
                spec["labels"]["entfarm.spec"]:
            container.remove(force=True)
            container, action = None, "recreated"
        if container is None:
            container = _create(client, spec, lan.classroom, farm)
            action = "created" if action == "unchanged" else action
        container.reload()
        if lan.network not in (container.attrs.get("NetworkSettings", {}).get("Networks") or {}):
            client.networks.get(lan.network).connect(container)  # its LAN was recreated
        if container.status != "running":
            _start(container, lan.classroom, farm)
            action = "started" if action == "unchanged" else action
        _say(progress, f"{lan.classroom}: {action} (classroom of {lan.network})")
        states.append(HostState(lan.classroom, spec["name"], "running", action))
    return states


def _farm_containers(client: Any, farm: Farm) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"entfarm.farm={farm.name}"}))


def _container(client: Any, name: str) -> Any | None:
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def _ensure_network(client: Any, farm: Farm, progress: Progress | None) -> None:
    """The lab network with lab.subnet as its own (fixed addresses need a subnet given at
    creation). A network of the farm with another subnet, or none given (labs made before
    addresses were fixed), is made again: its containers are removed first, and `up` then
    creates them again with their addresses (deploy again after that)."""
    name = farm.lab.network
    found = [n for n in client.networks.list(names=[name]) if n.name == name]
    if found:
        labels = found[0].attrs.get("Labels") or {}
        if labels.get("entfarm.farm") != farm.name:
            raise LabError(
                f"Docker network {name!r} exists but does not belong to farm {farm.name!r} "
                f"(label entfarm.farm={labels.get('entfarm.farm')!r}): remove it or set "
                f"lab.network in {farm.file}"
            )
        config = (found[0].attrs.get("IPAM") or {}).get("Config") or []
        if [c.get("Subnet") for c in config] == [farm.lab.subnet]:
            return
        found[0].reload()  # a listed network does not name its containers
        for container in found[0].containers:
            container.remove(force=True)
        found[0].remove()
        _say(progress, f"network {name}: removed, with its {len(found[0].containers)} "
                       f"container(s), to give it the subnet {farm.lab.subnet}")
    net = ipaddress.IPv4Network(farm.lab.subnet)
    pool = docker.types.IPAMPool(subnet=str(net), gateway=str(net[1]))
    try:
        client.networks.create(name, driver="bridge", labels={"entfarm.farm": farm.name},
                               ipam=docker.types.IPAMConfig(pool_configs=[pool]))
    except docker.errors.APIError as exc:
        raise LabError(f"Docker cannot create the lab network {name} on {net}: "
                       f"{exc.explanation or exc}; choose another lab.subnet in {farm.file}"
                       ) from exc
    _say(progress, f"network {name}: created ({net})")


def _state(farm: Farm, host: str, container: Any | None, action: str = "") -> HostState:
    name = farm.container_name(host)
    if container is None:
        return HostState(host, name, "absent", action)
    container.reload()
    settings = container.attrs.get("NetworkSettings", {})
    network = (settings.get("Networks") or {}).get(farm.lab.network) or {}
    published = {}
    for port, bindings in (settings.get("Ports") or {}).items():
        for binding in bindings or []:
            published[f"{binding['HostIp']}:{binding['HostPort']}"] = port
    return HostState(host, name, container.status, action, network.get("IPAddress") or None,
                     published)


def _start(container: Any, host: str, farm: Farm) -> None:
    try:
        container.start()
    except docker.errors.APIError as exc:
        detail = str(exc.explanation or exc)
        hint = ""
        if "address already in use" in detail or "port is already allocated" in detail:
            hint = (f"; another program uses a lab port: change lab.publish in {farm.file}")
        raise LabError(f"{host}: container {container.name} does not start: {detail}{hint}") \
            from exc


def _create(client: Any, spec: dict[str, Any], host: str, farm: Farm) -> Any:
    try:
        return client.containers.create(**spec)
    except docker.errors.APIError as exc:
        raise LabError(
            f"{host}: Docker refused to create {spec['name']}: {exc.explanation or exc}"
        ) from exc


def up(farm: Farm, progress: Progress | None = None) -> list[HostState]:
    """Bring every host of the farm up; idempotent. Hosts removed from farm.yml are removed."""
    client = docker_client()
    image = ensure_base_image(client, progress)
    _ensure_network(client, farm, progress)
    for lan in school_lans(farm):
        _ensure_lan_network(client, farm, lan, progress)
    hosts = farm.hosts()
    wanted = {h.name for h in hosts} | {lan.classroom for lan in school_lans(farm)}
    states: list[HostState] = []
    for container in _farm_containers(client, farm):
        host = container.labels.get("entfarm.host", container.name)
        if host not in wanted:
            container.remove(force=True)
            _say(progress, f"{host}: removed (no longer in {farm.file})")
            states.append(HostState(host, container.name, "absent", "removed"))

    booting: list[tuple[FarmHost, Any]] = []
    results: dict[str, tuple[Any, str]] = {}
    total = len(hosts)
    for index, host in enumerate(hosts, 1):
        spec = container_spec(farm, host, image)
        container = _container(client, spec["name"])
        if container is not None and container.labels.get("entfarm.farm") != farm.name:
            raise LabError(
                f"{host.name}: a container named {spec['name']} exists that entfarm did not "
                f"create for farm {farm.name!r}: remove it (docker rm -f {spec['name']})"
            )
        if container is None:
            action = "created"
        elif (container.labels.get("entfarm.image") != image
              or container.labels.get("entfarm.spec") != spec["labels"]["entfarm.spec"]):
            container.remove(force=True)
            action = "recreated"
        elif container.status == "running":
            action = "unchanged"
        elif container.status == "paused":
            container.unpause()
            action = "started"
        else:
            action = "started"
        if action in ("created", "recreated"):
            container = _create(client, {k: v for k, v in spec.items() if k != "school_lan"},
                                host.name, farm)
        school = school_lan(farm, host)
        if school is not None:
            _connect_lan(container, client, school)
        if action != "unchanged":
            _start(container, host.name, farm)
        booting.append((host, container))
        results[host.name] = (container, action)
        _say(progress, f"{host.name}: {action} ({index} of {total})")

    for index, (host, container) in enumerate(booting, 1):
        state = wait_for_systemd(container, host.name)
        if results[host.name][1] != "unchanged":
            _say(progress, f"{host.name}: systemd {state} ({index} of {total})")
    states += [_state(farm, h.name, *results[h.name]) for h in hosts]
    states += _ensure_classrooms(client, farm, image, progress)
    _remove_stale_networks(client, farm, progress)
    return states


def _remove_stale_networks(client: Any, farm: Farm, progress: Progress | None) -> None:
    """Networks of this farm under a former lab.network name, once nothing uses them."""
    keep = {farm.lab.network, *(lan.network for lan in school_lans(farm))}
    for network in client.networks.list(filters={"label": f"entfarm.farm={farm.name}"}):
        network.reload()
        if network.name not in keep and not network.containers:
            network.remove()
            _say(progress, f"network {network.name}: removed (lab.network is now "
                           f"{farm.lab.network})")


def wait_for_systemd(container: Any, host: str, timeout: float = BOOT_TIMEOUT) -> str:
    """Wait until systemd in the container is running or degraded; LabError on timeout."""
    deadline = time.monotonic() + timeout
    state = "unknown"
    while True:
        container.reload()
        if container.status != "running":
            logs = container.logs(tail=5).decode(errors="replace").strip().splitlines()
            raise LabError(
                f"{host}: container {container.name} is {container.status} instead of booting"
                + (f": {logs[-1]}" if logs else "")
            )
        result = container.exec_run(["systemctl", "is-system-running"])
        state = result.output.decode(errors="replace").strip() or "unknown"
        if state in ("running", "degraded"):
            return state
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    failed = container.exec_run(
        ["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"]
    ).output.decode(errors="replace").split("\n")
    units = [line.split()[0] for line in failed if line.strip()]
    jobs = container.exec_run(
        ["systemctl", "list-jobs", "--plain", "--no-legend", "--no-pager"]
    ).output.decode(errors="replace").split("\n")
    waiting = [line.split()[1] for line in jobs if len(line.split()) > 1]
    raise LabError(
        f"{host}: systemd is still {state!r} after {timeout:.0f} s; failed units: "
        f"{', '.join(units) or 'none'}; pending jobs: {', '.join(waiting[:5]) or 'none'} "
        f"(see `docker exec {container.name} journalctl -b`)"
    )


def down(farm: Farm, progress: Progress | None = None) -> None:
    """Remove the farm's containers and its network; the base image is kept."""
    client = docker_client()
    containers = _farm_containers(client, farm)
    for index, container in enumerate(containers, 1):
        host = container.labels.get("entfarm.host", container.name)
        container.remove(force=True)
        _say(progress, f"{host}: removed ({index} of {len(containers)})")
    for network in client.networks.list(filters={"label": f"entfarm.farm={farm.name}"}):
        network.remove()
        _say(progress, f"network {network.name}: removed")


def reset(farm: Farm, progress: Progress | None = None) -> list[HostState]:
    """Fresh hosts: down, then up."""
    down(farm, progress)
    return up(farm, progress)


def status(farm: Farm) -> list[HostState]:
    """Each host of the farm (container state, address on the lab network, published ports),
    then each classroom client, as :func:`up` lists them."""
    client = docker_client()
    states = [
        _state(farm, host.name, _container(client, farm.container_name(host.name)))
        for host in farm.hosts()
    ]
    for lan in school_lans(farm):
        name = farm.container_name(lan.classroom)
        container = _container(client, name)
        states.append(HostState(lan.classroom, name,
                                "absent" if container is None else container.status, ""))
    return states


def lab_names(farm: Farm) -> list[str]:
    """The names :func:`up` and :func:`status` report: the farm's hosts, then the classrooms."""
    return [h.name for h in farm.hosts()] + [lan.classroom for lan in school_lans(farm)]


__all__: Sequence[str] = (
    "HostState", "LabError", "Mirror", "Progress", "container_spec", "docker_client", "down",
    "ensure_base_image", "find_mirror", "image_tag", "lab_names", "recipe_hash", "reset",
    "status", "up",
)
