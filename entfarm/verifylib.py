"""Helpers shared by the roles' verify suites (roles/<role>/verify/test_<role>.py).

They keep the suites read-only and honest: a check that cannot run is skipped as
"not verifiable: <reason>", a host outside the role's group as "not applicable", never passed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

FACTS_DIR = "/etc/ansible/facts.d"


def read_fact(host: Any, role: str) -> dict[str, Any]:
    """The role's local fact (``/etc/ansible/facts.d/<role>.fact``), or skip as not verifiable."""
    path = f"{FACTS_DIR}/{role}.fact"
    f = host.file(path)
    if not f.exists:
        pytest.skip(f"not verifiable: {path} missing ({role} role not applied)")
    data: dict[str, Any] = json.loads(f.content_string)
    return data


def only_in_group(host: Any, group: str) -> None:
    """Against an inventory, skip hosts outside ``group`` (a role's suite concerns its hosts)."""
    if host.backend.NAME != "ansible":
        return  # a single host named on the command line: the caller chose it
    groups = host.ansible.get_variables().get("group_names", [])
    if group not in groups:
        pytest.skip(f"not applicable: {host.backend.get_pytest_id()} is not in the {group} group")


def role_suite(role: str, group: str | None = None) -> tuple[Any, Any]:
    """The two things every role suite starts with: an autouse fixture keeping the suite to the
    role's group (when it has one), and ``fact(host)`` reading the role's local fact.

        _hosts_only, fact = role_suite("cas", group="cas")
    """

    @pytest.fixture(autouse=True)
    def _hosts_only(host: Any) -> None:
        if group is not None:
            only_in_group(host, group)

    def fact(host: Any) -> dict[str, Any]:
        return read_fact(host, role)

    return _hosts_only, fact


def q(value: object) -> str:
    """A value quoted for the host's shell."""
    return shlex.quote(str(value))


def name_check(address: str) -> str:
    """openssl's option checking the certificate against the address clients use."""
    is_ip = re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", address) is not None
    return f"-verify_ip {q(address)}" if is_ip else f"-verify_hostname {q(address)}"


def inventory_vars(host: Any) -> dict[str, Any]:
    """The host's inventory variables, or skip: checks reaching other hosts need the inventory."""
    if host.backend.NAME != "ansible":
        pytest.skip("not verifiable: needs the inventory (--hosts=ansible://…) to reach clients")
    variables: dict[str, Any] = host.ansible.get_variables()
    return variables


def other_host(host: Any, name: str) -> Any:
    """Another host of the same inventory, reached the way the inventory says."""
    inventory_vars(host)
    backend = host.backend
    other = backend.ansible_runner.get_host(
        name, ssh_config=backend.ssh_config, ssh_identity_file=backend.ssh_identity_file
    )
    if other is None:
        pytest.skip(f"not verifiable: {name} is not reachable through the inventory")
    return other


def release_tests(fact: Any) -> tuple[Any, Any]:
    """The two checks of an app installed as ``<root>/releases/<release>`` with a ``current``
    link (the portal's and Etherpad's layout), for a suite to bind at module level::

        test_fact_present, test_release_is_current_and_complete = release_tests(fact)
    """

    def test_fact_present(host: Any) -> None:
        info = fact(host)
        assert info["version"] and info["version"] != "unknown", info
        assert info["release"], info

    def test_release_is_current_and_complete(host: Any) -> None:
        info = fact(host)
        current = host.file(f"{info['root']}/current")
        assert current.is_symlink
        assert current.linked_to == f"{info['root']}/releases/{info['release']}"
        marker = host.file(f"{info['root']}/releases/{info['release']}/.entfarm-release")
        assert marker.exists, "release not marked complete"
        assert json.loads(marker.content_string)["release"] == info["release"]

    return test_fact_present, test_release_is_current_and_complete


def systemd_exposure(host: Any, unit: str) -> tuple[float, str]:
    """``systemd-analyze security``'s exposure score of a unit and its summary line, or skip
    as not verifiable when the host's systemd cannot compute it."""
    cmd = host.run(f"systemd-analyze security {q(unit)} --no-pager")
    if cmd.rc != 0 and "Unknown" in cmd.stderr:
        pytest.skip(f"not verifiable: systemd-analyze security unavailable: {cmd.stderr.strip()}")
    last: str = cmd.stdout.strip().splitlines()[-1]
    return float(last.split("level for")[1].split(":")[1].split()[0]), last


# -- application roles (moodle, nextcloud, onlyoffice): platform first, then the application --

_PROBES = Path(__file__).resolve().parent.parent / "roles"

# One HTTP request made on a host (Python's standard library: no client package there).
_HTTP_GET = (
    "import sys,urllib.request,urllib.error\n"
    "req=urllib.request.Request(sys.argv[1],headers={'Host':sys.argv[2]})\n"
    "class N(urllib.request.HTTPRedirectHandler):\n"
    "    def redirect_request(self,*a,**k): return None\n"
    "try:\n"
    "    r=urllib.request.build_opener(N).open(req,timeout=20); code,body=r.status,r.read()\n"
    "except urllib.error.HTTPError as e:\n"
    "    code,body=e.code,e.read()\n"
    "print(code); sys.stdout.write(body.decode('utf-8','replace')[:4000])\n"
)


def artifact_installed(info: dict[str, Any]) -> None:
    """Skip an application check when the role found no release in the artifact store."""
    if info.get("state") != "installed":
        pytest.skip(f"not verifiable: artifact missing ('{info.get('artifact')}' is not in the "
                    "farm's artifact store, so the application is not installed)")


def http_get_from(host: Any, url: str, host_header: str) -> tuple[int, str]:
    """GET ``url`` from ``host`` presenting ``host_header``: (status, start of the body)."""
    cmd = host.run(f"python3 -c {q(_HTTP_GET)} {q(url)} {q(host_header)}")
    assert cmd.rc == 0, f"GET {url} from the host failed: {cmd.stderr.strip()[-400:]}"
    status, _, body = cmd.stdout.partition("\n")
    return int(status), body


def controller_secret(host: Any, relative: str) -> str:
    """A secret file of the farm's controller (``<secrets>/<relative>``), or skip."""
    secrets = inventory_vars(host).get("entfarm_secrets_dir")
    path = Path(str(secrets)) / relative if secrets else None
    if path is None or not path.is_file():
        pytest.skip(f"not verifiable: {relative} is not among this controller's secrets")
    return path.read_text().strip()


def postgresql_login_from(client: Any, database: dict[str, Any], password: str) -> dict[str, Any]:
    """Log in to the app's database from ``client`` as the app does (TLS, SCRAM), with the
    postgresql role's probe (roles/postgresql/verify/pgprobe.py); its JSON answer."""
    probe = (_PROBES / "postgresql" / "verify" / "pgprobe.py").read_text()
    ca = read_fact(client, "pki")["ca"]
    args = " ".join(q(a) for a in (database["host"], database["port"], database["user"],
                                   database["name"], ca))
    cmd = client.run(f"printf '%s\\n' {q(password)} | python3 -c {q(probe)} "
                     f"--password-stdin {args}")
    assert cmd.rc == 0, f"pgprobe failed on the client: {cmd.stderr[-500:]}"
    result: dict[str, Any] = json.loads(cmd.stdout)
    return result


def redis_from(client: Any, redis: dict[str, Any], password: str,
               commands: list[str]) -> dict[str, Any]:
    """Read commands on the farm's Redis from ``client`` as the app's ACL user, with the redis
    role's probe (roles/redis/verify/redisprobe.py); its JSON answer."""
    probe = (_PROBES / "redis" / "verify" / "redisprobe.py").read_text()
    ca = read_fact(client, "pki")["ca"]
    args = " ".join(q(a) for a in (redis["host"], redis["port"], ca, redis["user"]))
    words = " ".join(q(c) for c in commands)
    cmd = client.run(f"printf '%s\\n' {q(password)} | python3 -c {q(probe)} "
                     f"--password-stdin {args} -- {words}")
    assert cmd.rc == 0, f"redisprobe failed on the client: {cmd.stderr[-500:]}"
    result: dict[str, Any] = json.loads(cmd.stdout)
    return result


def php_platform_tests(fact: Any, label: str) -> dict[str, Any]:
    """The platform checks of a PHP application role (moodle, nextcloud), which hold whether
    or not its release is installed, by test name, for a suite to add at module level::

        globals().update(php_platform_tests(fact, "Moodle"))
    """

    def test_fact_records_the_state(host: Any) -> None:
        info = fact(host)
        assert info["state"] in ("installed", "artifact missing"), info
        assert (info["state"] == "installed") == bool(info["version"]), info

    def test_pool_runs_as_the_app_user(host: Any) -> None:
        info = fact(host)
        assert host.service(f"php{info['php_version']}-fpm").is_running
        socket = host.file(info["fpm_socket"])
        assert socket.is_socket and socket.user == "www-data" and socket.mode == 0o660
        users = host.run(f"ps -o user= -C php-fpm{info['php_version']}").stdout.split()
        assert info["user"] in users, f"no {label} worker among {sorted(set(users))}"
        # OPcache on in PHP-FPM (the pools' php.ini), timestamps not checked.
        fpm = host.run(f"php-fpm{info['php_version']} -i").stdout
        assert re.search(r"^opcache\.enable => On", fpm, re.M), "OPcache is off in PHP-FPM"

    def test_configuration_tests(host: Any) -> None:
        info = fact(host)
        with host.sudo():
            fpm = host.run(f"php-fpm{info['php_version']} -t")
            nginx = host.run("nginx -t")
            syntax = host.run(f"php{info['php_version']} -l {q(info['config_file'])}")
        assert fpm.rc == 0, fpm.stderr
        assert nginx.rc == 0, nginx.stderr
        assert syntax.rc == 0, syntax.stdout + syntax.stderr

    def test_data_and_config_private(host: Any) -> None:
        info = fact(host)
        data = host.file(info["data_dir"])
        assert data.is_directory and data.user == info["user"], info["data_dir"]
        assert data.mode & 0o007 == 0, f"{info['data_dir']} is open to others"
        assert not info["data_dir"].startswith(info["root"]), "data inside the web root"
        config = host.file(info["config_file"])
        assert (config.user, config.group, config.mode) == ("root", info["group"], 0o640)

    def test_site_answers_from_the_farm_network(host: Any) -> None:
        """The site answers the edge's requests: the application, or its maintenance page
        (503) until the release is installed."""
        info = fact(host)
        edges = inventory_vars(host)["groups"].get("proxy", [])
        if not edges:
            pytest.skip("not verifiable: no edge proxy in this inventory")
        edge = other_host(host, edges[0])
        status, body = http_get_from(edge, f"http://{info['bind']}/", info["public_name"])
        if info["state"] == "installed":
            assert status in (200, 302, 303), (status, body[:300])
        else:
            assert status == 503 and f"{label} : service en maintenance" in body, (status, body)

    def test_database_reachable_from_the_app_host(host: Any) -> None:
        database = fact(host)["database"]
        password = controller_secret(host, f"postgresql/{database['user']}.password")
        result = postgresql_login_from(host, database, password)
        assert result.get("stage") == "ok" and result.get("user") == database["user"], result

    def test_redis_reachable_from_the_app_host(host: Any) -> None:
        redis = fact(host)["redis"]
        password = controller_secret(host, f"redis/{redis['user']}.password")
        result = redis_from(host, redis, password, ["PING", f"EXISTS {redis['user']}:verify"])
        assert result["auth"] == "OK", result
        assert result["replies"][0] == "PONG", result

    def test_timer_active(host: Any) -> None:
        timer = host.service(fact(host)["cron_timer"])
        assert timer.is_enabled and timer.is_running

    return {test.__name__: test for test in (
        test_fact_records_the_state, test_pool_runs_as_the_app_user, test_configuration_tests,
        test_data_and_config_private, test_site_answers_from_the_farm_network,
        test_database_reachable_from_the_app_host, test_redis_reachable_from_the_app_host,
        test_timer_active)}
