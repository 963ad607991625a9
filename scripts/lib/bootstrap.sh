# shellcheck shell=bash
# Shared set-up for the README's two commands: everything a fresh Debian 12 machine (as root)
# needs, installed by the project itself. Sourced, not run.
set -euo pipefail

ENTFARM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ENTFARM_ROOT/.venv"
export PATH="$VENV/bin:$PATH"
export ANSIBLE_CONFIG="$ENTFARM_ROOT/ansible.cfg"

log() { printf '\033[1m[entfarm set-up]\033[0m %s\n' "$*" >&2; }

_apt_updated=0
apt_install() {
  # Install the Debian packages given, updating the package lists once per run.
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "needs root to install: ${missing[*]}"; exit 2
  fi
  if [ "$_apt_updated" -eq 0 ]; then
    log "apt-get update"; apt-get update -q >/dev/null; _apt_updated=1
  fi
  log "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_python_env() {
  # The virtualenv with entfarm and its pinned dependencies; reinstalled when pyproject changes.
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  # slapd and ldap-utils: the AAF importer's tests run a real (throwaway) slapd on the controller.
  # Preseeded so that Debian's postinst creates no database and starts no server of its own.
  if ! dpkg-query -W -f='${Status}' slapd 2>/dev/null | grep -q "install ok installed"; then
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  fi
  # chromium + chromium-driver (one Debian source package: always the same version) and
  # libnss3-tools (certutil, to trust the farm CA): the portal's browser test in tests/lab.
  apt_install debootstrap openssl git ca-certificates slapd ldap-utils \
    chromium chromium-driver libnss3-tools
  # npm (with Debian's nodejs): the controller builds the Etherpad tree of the artifact store
  # (`entfarm artifacts build etherpad`); hosts never run npm against a registry. A Node.js
  # already installed with its own npm is kept.
  command -v npm >/dev/null 2>&1 || apt_install npm
  local stamp="$VENV/.entfarm-installed"
  local want
  # The extras installed are part of what the stamp stands for.
  local extras="dev,portal"
  want="$(cat "$ENTFARM_ROOT/pyproject.toml" <(echo "$extras") | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing entfarm and its pinned dependencies (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ENTFARM_ROOT[$extras]"
    echo "$want" > "$stamp"
  fi
}

docker_answers() { docker info >/dev/null 2>&1; }

ensure_docker() {
  # A Docker Engine must answer; install Debian's docker.io and start dockerd when none does.
  if command -v docker >/dev/null 2>&1 && docker_answers; then return 0; fi
  if ! command -v dockerd >/dev/null 2>&1; then
    apt_install docker.io
  fi
  command -v docker >/dev/null 2>&1 || apt_install docker.io
  if docker_answers; then return 0; fi
  log "starting dockerd"
  if [ "$(ps -p 1 -o comm= 2>/dev/null)" = "systemd" ]; then
    systemctl start docker || true
  fi
  if ! docker_answers; then
    clear_stale_docker_pids
    nohup dockerd >/var/log/entfarm-dockerd.log 2>&1 &
  fi
  for _ in $(seq 1 90); do
    docker_answers && return 0
    sleep 1
  done
  log "dockerd did not answer within 90 s; the end of /var/log/entfarm-dockerd.log:"
  tail -n 15 /var/log/entfarm-dockerd.log >&2 || true
  exit 2
}

clear_stale_docker_pids() {
  # On a machine restored from a snapshot (or whose /run is not a tmpfs) the pid files of a
  # daemon that no longer runs survive. dockerd then takes whatever process now holds that pid
  # for its containerd, waits for a socket that never comes, and gives up. A pid file is kept
  # only when its process is the daemon it names.
  local file want pid
  for file in /var/run/docker/containerd/containerd.pid:containerd /var/run/docker.pid:dockerd; do
    want="${file##*:}"; file="${file%:*}"
    [ -f "$file" ] || continue
    pid="$(cat "$file" 2>/dev/null || true)"
    if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != "$want" ]; then
      log "removing the stale $file (pid ${pid:-none} is not $want)"
      rm -f "$file"
    fi
  done
}
