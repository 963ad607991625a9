"""The farm's artifact store: every release and build the hosts install, held by the controller.

Hosts never reach the internet (DESIGN principle 4). The controller fills a local store,
``<inventory>/<artifacts.store>`` (default ``state/artifacts``), and roles copy from it:

- **fetched** artifacts are the releases named in farm.yml (``artifacts.sources``: URL and
  sha256). The checksum in farm.yml is the authority: a download that does not match it is
  discarded, and a stored file that no longer matches it is reported.
- **built** artifacts come from a recipe run on the controller (the portal's wheelhouse). Their
  checksums are recorded at build time in the store's manifest; a file that changes afterwards is
  reported. A name under ``artifacts.sources`` is always fetched, even if a recipe has the same
  name, so that production can pin a release where the lab builds one.

Layout::

    <store>/manifest.json           what the store holds (format below), written atomically
    <store>/<name>/<file>            one directory per artifact; paths in the manifest are
                                     relative to <store>, e.g. portal/entfarm-0.1.0-py3-none-any.whl

``manifest.json``: ``{"format": 1, "artifacts": {<name>: {"kind": "fetched" | "built",
"version": ..., "source": <URL or build recipe>, "files": [{"path", "sha256", "size"}]}}}``.

With ``artifacts.mirror`` set, a source is downloaded from ``<mirror>/<name>/<file name>`` (the
file name being the last segment of its URL's path) instead of its URL: a mirror is laid out like
a store, so an académie fills it by copying the ``<name>/`` directories of a store.

``preflight`` is what ``entfarm deploy`` runs before ansible-runner starts; playbooks/artifacts.yml
checks the same files from Ansible, for runs that do not go through entfarm.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .errors import UserError
from .model import Farm, resolve_inventory

Progress = Callable[[str], None]
Kind = Literal["fetched", "built"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT = 60  # seconds without data before a download is abandoned


class ArtifactError(UserError):
    """An artifact that cannot be fetched, built or trusted; the message says which and why."""


class ArtifactsNotReady(ArtifactError):
    """Raised before a deploy when a required artifact is missing or does not match."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{len(problems)} artifact problem{'s' if len(problems) != 1 else ''}; "
            "nothing was run, no host was touched:\n" + "\n".join(problems))


# -- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the store, e.g. portal/requirements.txt
    sha256: str
    size: int


@dataclass(frozen=True)
class Entry:
    """What the manifest says about one artifact."""

    name: str
    kind: Kind
    version: str | None
    source: str
    files: tuple[FileRecord, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "version": self.version, "source": self.source,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }


class Store:
    """The store of one farm: its directory and its manifest."""

    def __init__(self, farm: Farm):
        self.farm = farm
        self.root = farm.inventory_dir / farm.spec.artifacts.store
        self.manifest = self.root / MANIFEST

    def path(self, relative: str) -> Path:
        return self.root / relative

    def entries(self) -> dict[str, Entry]:
        if not self.manifest.is_file():
            return {}
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
            entries = {}
            for name, raw in data["artifacts"].items():
                files = tuple(FileRecord(_safe_relative(f["path"]), str(f["sha256"]),
                                         int(f["size"])) for f in raw["files"])
                if raw["kind"] not in ("fetched", "built"):
                    raise ValueError(f"artifact {name!r} has kind {raw['kind']!r}")
                entries[name] = Entry(name, raw["kind"], raw.get("version"), str(raw["source"]),
                                      files)
            return entries
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(
                f"{self.manifest} is not a valid artifact manifest ({exc}); remove it and run "
                f"{command(self.farm, 'fetch')} and {command(self.farm, 'build')} again"
            ) from None

    def save(self, entries: dict[str, Entry]) -> None:
        data = {"format": MANIFEST_FORMAT,
                "artifacts": {n: entries[n].as_json() for n in sorted(entries)}}
        _write_atomically(self.manifest,
                          json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time: two builds swapping the same directory would lose one."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _safe_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"file path {path!r} is not inside the store")
    return str(pure)


def _write_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_under(directory: Path, prefix: str) -> list[Path]:
    """Every regular file below ``directory``, as store-relative paths (sorted, stable)."""
    if not directory.is_dir():
        return []
    return sorted(Path(prefix) / p.relative_to(directory)
                  for p in directory.rglob("*") if p.is_file() or p.is_symlink())


def _record(store_root: Path, relatives: list[Path]) -> tuple[FileRecord, ...]:
    return tuple(FileRecord(r.as_posix(), sha256_of(store_root / r),
                            (store_root / r).stat().st_size) for r in relatives)


# -- names, kinds and the commands that fix things ----------------------------------------------


def command(farm: Farm, verb: str, name: str | None = None) -> str:
    """The command that produces an artifact; ``-i`` only when the farm is not the default."""
    cmd = f"entfarm artifacts {verb}" + (f" {name}" if name else "")
    if not _is_default_inventory(farm):
        cmd += f" -i {shlex.quote(str(farm.inventory_dir))}"
    return cmd


def _is_default_inventory(farm: Farm) -> bool:
    # Same default as the CLI's -i: ENTFARM_INVENTORY, else the checkout's inventories/lab.
    from .runner import project_root

    env = os.environ.get("ENTFARM_INVENTORY")
    try:
        default = resolve_inventory(env) if env else project_root() / "inventories" / "lab"
    except UserError:
        return False
    return default.resolve() == farm.inventory_dir.resolve()


def kind_of(farm: Farm, name: str) -> Kind | None:
    """fetched when farm.yml names a source, built when a recipe exists, else None."""
    if name in farm.spec.artifacts.sources:
        return "fetched"
    if name in RECIPES:
        return "built"
    return None


def known_names(farm: Farm) -> list[str]:
    return sorted({*farm.spec.artifacts.sources, *RECIPES})


def required_artifacts(farm: Farm) -> list[str]:
    """Artifacts a deploy needs: one per placed service that has a source or a recipe, and the
    school servers' proxy blocklist when the farm has school servers."""
    names = [s for s in farm.spec.services if kind_of(farm, s) is not None]
    if any(e.school_server for e in farm.spec.etablissements):
        names.append(BLOCKLIST)
    return names


def source_file(name: str, url: str) -> str:
    """Store-relative path of a fetched artifact: ``<name>/<last segment of the URL path>``."""
    # Not PurePosixPath(...).name: it would read .../etherpad/ as a file named etherpad.
    file_name = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1]
    if file_name in ("", ".", "..") or "\\" in file_name or "\0" in file_name:
        raise ArtifactError(
            f"artifact {name!r}: the URL {url} does not end with a file name; "
            f"artifacts.sources.{name}.url must name the release file itself")
    return f"{name}/{file_name}"


def download_url(farm: Farm, name: str) -> str:
    """Where the controller downloads a source: its URL, or ``<mirror>/<name>/<file name>``."""
    source = farm.spec.artifacts.sources[name]
    mirror = farm.spec.artifacts.mirror
    if not mirror:
        return source.url
    _, file_name = source_file(name, source.url).split("/", 1)
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(name)}/{urllib.parse.quote(file_name)}"


# -- state of the store: list, verify, preflight ------------------------------------------------


@dataclass
class ArtifactState:
    name: str
    kind: str  # fetched, built, or unused (in the manifest, but neither a source nor a recipe)
    version: str | None
    files: int
    size: int
    status: str  # ok, missing, checksum mismatch, not built, unrecorded file, unused
    problems: list[str] = field(default_factory=list)
    used_by: list[str] = field(default_factory=list)  # placed services that need it

    @property
    def ok(self) -> bool:
        return not self.problems


# Shown in list when an artifact has several problems: the one to fix first.
_STATUS_ORDER = ("not built", "missing", "checksum mismatch", "unrecorded file")


def _state(farm: Farm, store: Store, entries: dict[str, Entry], name: str) -> ArtifactState:
    kind = kind_of(farm, name)
    used_by = [s for s in farm.spec.services if s == name]
    if kind is None:
        entry = entries[name]
        return ArtifactState(name, "unused", entry.version, len(entry.files),
                             sum(f.size for f in entry.files), "unused", [], used_by)
    found: list[tuple[str, str]] = []  # (status, message)
    if kind == "fetched":
        source = farm.spec.artifacts.sources[name]
        fix = command(farm, "fetch", name)
        expected = [FileRecord(source_file(name, source.url), source.sha256, 0)]
        version = source.version
        origin, again = " from farm.yml", "fetch it again with"
        missing_fix = f"fetch it with: {fix}"
    else:
        built = entries.get(name)
        fix = command(farm, "build", name)
        if built is None or built.kind != "built":
            return ArtifactState(name, kind, None, 0, 0, "not built",
                                 [f"artifact {name!r}: not built yet (build it with: {fix})"],
                                 used_by)
        expected = list(built.files)
        version = built.version
        origin, again = "", "rebuild with"
        missing_fix = f"rebuild with: {fix}"
    size = 0
    for record in expected:
        path = store.path(record.path)
        if not path.is_file():
            found.append(("missing", f"file {record.path} is missing, expected sha256 "
                          f"{record.sha256}{origin} ({missing_fix})"))
            continue
        size += path.stat().st_size
        actual = sha256_of(path)
        if actual != record.sha256:
            found.append(("checksum mismatch", f"file {record.path} has sha256 {actual}, "
                          f"expected {record.sha256}{origin} ({again}: {fix})"))
    recorded = {r.path for r in expected}
    for extra in _files_under(store.path(name), name):
        if extra.as_posix() not in recorded:
            found.append(("unrecorded file", f"file {extra.as_posix()} is not part of the "
                          f"artifact; roles would copy it ({again}: {fix})"))
    status = min((s for s, _ in found), key=_STATUS_ORDER.index, default="ok")
    return ArtifactState(name, kind, version, len(expected), size, status,
                         [f"artifact {name!r}: {m}" for _, m in found], used_by)


def states(farm: Farm, names: list[str] | None = None) -> list[ArtifactState]:
    """The state of the named artifacts (default: every source, recipe and manifest entry)."""
    store = Store(farm)
    entries = store.entries()
    if names:
        _check_names(farm, names)
        wanted = list(dict.fromkeys(names))
    else:
        wanted = sorted({*known_names(farm), *entries})
    return [_state(farm, store, entries, n) for n in wanted]


def verify(farm: Farm, names: list[str] | None = None) -> tuple[list[ArtifactState], list[str]]:
    """Recompute every checksum of the named artifacts (default: all); states and problems.

    Without names, a recipe that no placed service needs and that was never built is listed
    but is not a problem."""
    found = states(farm, names)
    problems = [p for s in found if names or s.used_by or s.status != "not built"
                for p in s.problems]
    return found, problems


def preflight(farm: Farm, names: list[str]) -> list[str]:
    """Every problem that would make a deploy install something other than what was vouched
    for: one message per problem, naming the artifact, the file, the expected checksum and the
    command that fixes it. Empty when every named artifact is present and intact."""
    store = Store(farm)
    entries = store.entries()
    problems: list[str] = []
    for name in dict.fromkeys(names):
        if kind_of(farm, name) is None:
            problems.append(f"artifact {name!r}: no source under artifacts.sources in "
                            f"{farm.file} and no build recipe (recipes: {', '.join(RECIPES)})")
            continue
        problems += _state(farm, store, entries, name).problems
    return problems


def require(farm: Farm, names: list[str] | None = None) -> None:
    """Raise :class:`ArtifactsNotReady` unless the artifacts (default: the deploy's) are ready."""
    problems = preflight(farm, required_artifacts(farm) if names is None else names)
    if problems:
        raise ArtifactsNotReady(problems)


def _check_names(farm: Farm, names: list[str], kind: Kind | None = None) -> None:
    for name in names:
        actual = kind_of(farm, name)
        if actual is None:
            sources = ", ".join(farm.spec.artifacts.sources) or "none"
            raise ArtifactError(
                f"unknown artifact {name!r}: sources in {farm.file}: {sources}; "
                f"build recipes: {', '.join(RECIPES)}")
        if kind == "built" and actual == "fetched":
            raise ArtifactError(
                f"artifact {name!r} is a release named in {farm.file} (artifacts.sources."
                f"{name}), not built here: run {command(farm, 'fetch', name)}")
        if kind == "fetched" and actual == "built":
            raise ArtifactError(
                f"artifact {name!r} has no source under artifacts.sources in {farm.file}; "
                f"it is built here: run {command(farm, 'build', name)}")


# -- fetch --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    action: str  # fetched, present; built, updated, unchanged
    version: str | None
    files: int
    size: int
    seconds: float


def fetch(farm: Farm, names: list[str] | None = None,
          progress: Progress | None = None) -> list[Outcome]:
    """Download the named sources (default: all) into the store, each checked against farm.yml.

    A file already present with the right checksum is not downloaded again. Every source is
    tried; the failures are raised together at the end."""
    sources = farm.spec.artifacts.sources
    wanted = list(dict.fromkeys(names)) if names else sorted(sources)
    _check_names(farm, wanted, "fetched")
    store = Store(farm)
    outcomes: list[Outcome] = []
    failures: list[str] = []
    with store.locked():
        for name in wanted:
            try:
                outcomes.append(_fetch_one(farm, store, name, progress))
            except ArtifactError as exc:
                failures.append(str(exc))
    if failures:
        raise ArtifactError("\n".join(failures))
    return outcomes


def _fetch_one(farm: Farm, store: Store, name: str, progress: Progress | None) -> Outcome:
    source = farm.spec.artifacts.sources[name]
    relative = source_file(name, source.url)
    target = store.path(relative)
    started = time.monotonic()
    action = "present"
    if not (target.is_file() and sha256_of(target) == source.sha256):
        url = download_url(farm, name)
        _say(progress, f"{name}: downloading {url}")
        staging = Path(tempfile.mkdtemp(dir=store.root, prefix=f".fetch-{name}-"))
        try:
            partial = staging / target.name
            actual = _download(name, url, partial)
            if actual != source.sha256:
                via = " (artifacts.mirror)" if url != source.url else ""
                raise ArtifactError(
                    f"artifact {name!r}: {url}{via} has sha256 {actual}, expected "
                    f"{source.sha256} (artifacts.sources.{name}.sha256 in {farm.file}); "
                    "the download was discarded, nothing was stored")
            target.parent.mkdir(parents=True, exist_ok=True)
            # One release per name: an older file left beside it would be copied by roles too.
            for old in _files_under(target.parent, name):
                if old.as_posix() != relative:
                    store.path(old.as_posix()).unlink()
            os.replace(partial, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        action = "fetched"
    size = target.stat().st_size
    entry = Entry(name, "fetched", source.version, source.url,
                  (FileRecord(relative, source.sha256, size),))
    entries = store.entries()
    if entries.get(name) != entry:
        entries[name] = entry
        store.save(entries)
    _say(progress, f"{name}: {action} {relative} ({human_size(size)})")
    return Outcome(name, action, source.version, 1, size, time.monotonic() - started)


def _download(name: str, url: str, dest: Path) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT) as answer, \
                dest.open("wb") as out:
            while chunk := answer.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ArtifactError(f"artifact {name!r}: cannot download {url}: {reason}") from None
    return digest.hexdigest()


# -- build --------------------------------------------------------------------------------------


@dataclass
class BuildContext:
    """What a recipe gets: the farm, the empty directory to fill, a log and progress."""

    farm: Farm
    name: str
    out: Path
    work: Path  # scratch space, removed after the build
    log: Path
    progress: Progress | None

    def say(self, line: str) -> None:
        _say(self.progress, f"{self.name}: {line}")

    def run(self, what: str, cmd: list[str], env: dict[str, str] | None = None,
            cwd: Path | None = None) -> None:
        """Run a build step; its output goes to the log, and its tail into the error."""
        self.say(what)
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"$ {'cd ' + shlex.quote(str(cwd)) + ' && ' if cwd else ''}"
                      f"{shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **(env or {})}, cwd=cwd, check=False)
        if proc.returncode != 0:
            tail = self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise ArtifactError(
                f"artifact {self.name!r}: {what} failed (exit code {proc.returncode}); "
                f"full output in {self.log}:\n" + "\n".join(tail))


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str  # recorded as the manifest's source
    build: Callable[[BuildContext], str]  # fills ctx.out, returns the version


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, summary: str) -> Callable[[Callable[[BuildContext], str]],
                                                Callable[[BuildContext], str]]:
    """Register a build recipe: a function that fills ``ctx.out`` and returns a version."""

    def register(func: Callable[[BuildContext], str]) -> Callable[[BuildContext], str]:
        RECIPES[name] = Recipe(name, summary, func)
        return func

    return register


def build(farm: Farm, names: list[str] | None = None,
          progress: Progress | None = None) -> list[Outcome]:
    """Run the named recipes (default: every recipe not overridden by a source in farm.yml).

    A recipe builds into a staging directory; the store changes only when the result differs
    from what it holds (then the artifact's directory is swapped whole), so a rebuild with the
    same inputs reports "unchanged"."""
    wanted = (list(dict.fromkeys(names)) if names
              else [n for n in RECIPES if kind_of(farm, n) == "built"])
    _check_names(farm, wanted, "built")
    store = Store(farm)
    from .runner import new_run_dir

    run_dir = new_run_dir(farm, "artifacts-build")
    outcomes = []
    with store.locked():
        for name in wanted:
            outcomes.append(_build_one(farm, store, RECIPES[name], run_dir, progress))
    return outcomes


def _build_one(farm: Farm, store: Store, rec: Recipe, run_dir: Path,
               progress: Progress | None) -> Outcome:
    started = time.monotonic()
    # Staging inside the store: the final rename stays on one file system, hence atomic.
    staging = Path(tempfile.mkdtemp(dir=store.root, prefix=f".build-{rec.name}-"))
    out, work = staging / rec.name, staging / "work"
    ctx = BuildContext(farm, rec.name, out, work, run_dir / f"{rec.name}.log", progress)
    try:
        out.mkdir()
        work.mkdir()
        version = rec.build(ctx)
        files = _record(staging, _files_under(out, rec.name))
        entries = store.entries()
        old = entries.get(rec.name)
        entry = Entry(rec.name, "built", version, rec.summary, files)
        intact = _state(farm, store, entries, rec.name).ok if old else False
        if old == entry and intact:
            action = "unchanged"
        else:
            final = store.path(rec.name)
            previous = staging / "previous"
            if final.exists():
                final.rename(previous)
            out.rename(final)
            entries[rec.name] = entry
            store.save(entries)
            action = "built" if old is None else "updated"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.size for f in files)
    ctx.say(f"{action}: {len(files)} file(s), {human_size(size)}")
    return Outcome(rec.name, action, version, len(files), size, time.monotonic() - started)


# -- recipe: the portal wheelhouse ----------------------------------------------------------------

# The hosts' interpreter: Debian 12's python3, CPython 3.11 on x86_64 with glibc 2.36. Wheels are
# chosen for it, whatever Python the controller runs.
TARGET_PYTHON = "3.11"
TARGET_ABI = "cp311"
TARGET_GLIBC_MINOR = 36
TARGET_PLATFORMS = (
    # What pip itself would accept on the host: manylinux_2_N for every N the glibc covers;
    # manylinux2014 makes pip accept the legacy manylinux2010 and manylinux1 tags too.
    *(f"manylinux_2_{n}_x86_64" for n in range(TARGET_GLIBC_MINOR, 16, -1)),
    "manylinux2014_x86_64",
)
# Zip timestamps of the wheel we build (setuptools honours it): same sources, same bytes.
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest date a zip file can hold
PORTAL_EXTRA = "portal"
PORTAL_REQUIREMENTS = "requirements.txt"
PORTAL_INSTALL = ("pip install --no-index --find-links {wheelhouse} --require-hashes --no-deps "
                  "-r {wheelhouse}/requirements.txt")
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-[0-9][^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def canonical_name(name: str) -> str:
    """PEP 503 name: Flask, flask and FLASK are one distribution; so are mdurl and md_url."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _portal_inputs(root: Path) -> tuple[str, dict[str, str]]:
    """entfarm's version, and the portal extra's pins {canonical name: version}."""
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise ArtifactError(
            f"artifact 'portal': the recipe builds entfarm from its source checkout, and "
            f"{root} has no pyproject.toml (set ENTFARM_PROJECT to the checkout)")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    extra = project.get("optional-dependencies", {}).get(PORTAL_EXTRA)
    if not extra:
        raise ArtifactError(
            f"artifact 'portal': {pyproject} has no [project.optional-dependencies] "
            f"{PORTAL_EXTRA} list: the portal's runtime requirements, pinned")
    pins: dict[str, str] = {}
    for requirement in extra:
        match = _PIN.match(requirement)
        if not match:
            raise ArtifactError(
                f"artifact 'portal': {pyproject}: {PORTAL_EXTRA} requirement {requirement!r} is "
                "not an exact pin (name==version, no marker): hosts install exactly these")
        pins[canonical_name(match[1])] = match[2]
    return str(project.get("version", "0")), pins


def _copy_source(root: Path, dest: Path) -> None:
    """What setuptools needs to build entfarm, and nothing else: a build in the checkout itself
    would leave build/ there, and setuptools reuses stale build/lib files in later wheels."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(root / name, dest / name)
    for licence in root.glob("LICEN[CS]E*"):
        shutil.copyfile(licence, dest / licence.name)
    shutil.copytree(root / "entfarm", dest / "entfarm", copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    # The wheel records file modes: make them independent of the checkout's umask.
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@recipe("portal", "recipe portal: pip wheel --no-deps of the entfarm checkout, then pip "
        f"download of the [{PORTAL_EXTRA}] extra's pins (pyproject.toml) for CPython "
        f"{TARGET_PYTHON}, manylinux glibc <= 2.{TARGET_GLIBC_MINOR}, x86_64; "
        "requirements.txt with hashes")
def build_portal(ctx: BuildContext) -> str:
    """A wheelhouse from which a host installs the portal offline (see PORTAL_INSTALL)."""
    from .runner import project_root

    root = project_root()
    version, pins = _portal_inputs(root)
    source = ctx.work / "entfarm"
    _copy_source(root, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    ctx.run(f"pip wheel entfarm {version} (from {root})",
            [*pip, "wheel", "--no-deps", "--wheel-dir", str(ctx.out), str(source)],
            env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    platforms = [arg for p in TARGET_PLATFORMS for arg in ("--platform", p)]
    ctx.run(f"pip download {len(pins)} pinned requirement(s) for Python {TARGET_PYTHON}",
            [*pip, "download", "--dest", str(ctx.out), "--only-binary=:all:",
             "--python-version", TARGET_PYTHON, "--implementation", "cp",
             "--abi", TARGET_ABI, *platforms, *(f"{n}=={v}" for n, v in sorted(pins.items()))])
    wheels: dict[str, tuple[str, Path]] = {}
    for wheel in sorted(ctx.out.glob("*.whl")):
        match = _WHEEL.match(wheel.name)
        if not match:
            raise ArtifactError(f"artifact 'portal': unexpected file name {wheel.name}")
        name = canonical_name(match["name"])
        if name in wheels:
            raise ArtifactError(f"artifact 'portal': two wheels of {name}: "
                                f"{wheels[name][1].name} and {wheel.name}")
        wheels[name] = (match["version"], wheel)
    for other in ctx.out.iterdir():
        if other.suffix != ".whl":
            raise ArtifactError(f"artifact 'portal': pip left {other.name}, which is not a "
                                "wheel; hosts cannot build anything")
    # A dependency pip chose by itself would float from one build to the next.
    unpinned = sorted(f"{n}=={v}" for n, (v, _) in wheels.items()
                      if n != "entfarm" and n not in pins)
    if unpinned:
        raise ArtifactError(
            "artifact 'portal': the portal's requirements pull "
            f"{', '.join(unpinned)}, not pinned in pyproject.toml's [{PORTAL_EXTRA}] extra; pin "
            "them there so that a rebuild installs the same versions")
    lines = [
        "# The portal's wheelhouse, built by `entfarm artifacts build portal`: the complete",
        "# closure, pinned and hashed. Install it offline on a host (Debian 12, Python 3.11):",
        "#   " + PORTAL_INSTALL.format(wheelhouse="<this directory>"),
        "# --no-deps because this list is already complete (checked at build time); entfarm's",
        "# controller-side dependencies (Ansible, the Docker SDK...) are not needed to run it.",
    ]
    for name, (wheel_version, wheel) in sorted(wheels.items()):
        lines += [f"{name}=={wheel_version} \\", f"    --hash=sha256:{sha256_of(wheel)}"]
    (ctx.out / PORTAL_REQUIREMENTS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for path in ctx.out.iterdir():
        path.chmod(0o644)
    return version


# -- recipe: Etherpad ----------------------------------------------------------------------------

# The npm package ep_etherpad-lite is the src/ directory of an Etherpad tree; 1.8.14 is the last
# release published under that name. Hosts run it with Debian's nodejs, offline.
ETHERPAD_PACKAGE = "ep_etherpad-lite"
ETHERPAD_VERSION = "1.8.14"
ETHERPAD_FILE = f"etherpad-{ETHERPAD_VERSION}-entfarm.tar.gz"
# Our own plugin (CAS single sign-on) and the preload that keeps Etherpad offline.
ETHERPAD_PLUGIN = "ep_entfarm_cas"
# Dependencies installed INSIDE src/ (src/node_modules), never hoisted to <root>/node_modules:
# Etherpad 1.8's client-side module loader serves some browser libraries (security, ...) from
# src/node_modules only; a hoisted tree loads on the server but the pad page fails in the browser
# ("module at security does not exist"). --ignore-scripts: nothing is compiled (hosts run another
# Node.js than the controller); --omit=optional leaves out sqlite3, a native module.
# --legacy-peer-deps: the package's dev tooling has peer conflicts npm resolves before omitting it.
ETHERPAD_NPM_INSTALL = ("install", "--omit=dev", "--omit=optional", "--ignore-scripts",
                        "--legacy-peer-deps", "--no-audit", "--no-fund", "--no-update-notifier")
# What must be in src/node_modules for the tree to work: the browser libraries served from there,
# the PostgreSQL driver ueberdb2 loads, and npm itself (Etherpad runs `npm ls` to find plugins).
ETHERPAD_REQUIRED_MODULES = ("security", "ueberdb2", "pg", "npm", "socket.io", "express")


def _etherpad_plugin(root: Path) -> Path:
    plugin = root / "entfarm" / "etherpad" / ETHERPAD_PLUGIN
    if not (plugin / "ep.json").is_file():
        raise ArtifactError(f"artifact 'etherpad': {plugin}/ep.json is missing: the recipe "
                            "bundles entfarm's Etherpad plugin from the source checkout")
    return plugin


def etherpad_npm_key() -> str:
    """What decides src/ (the package and its installed dependencies): the cache key of the npm
    step, so that a change of the plugin alone does not download and install everything again."""
    return hashlib.sha256(f"{ETHERPAD_PACKAGE}@{ETHERPAD_VERSION}\n{' '.join(ETHERPAD_NPM_INSTALL)}"
                          .encode()).hexdigest()


def _tar(ctx: BuildContext, tree: Path, tarball: Path, level: int = 9) -> None:
    """A reproducible tarball: sorted names, fixed times and owners, gzip without a timestamp."""
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    ctx.run(f"pack {tree.name}/ into {tarball.name}", [
        "sh", "-c", 'tar --sort=name --mtime="@$1" --owner=0 --group=0 --numeric-owner '
        '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime '
        f'-C "$2" -cf - . | gzip -{level}n > "$3"',
        "tar", SOURCE_DATE_EPOCH, str(tree), str(tarball)])


def _etherpad_src(ctx: BuildContext, src: Path) -> None:
    """src/: the npm package with its dependencies installed inside it, from the build cache
    when the npm step's inputs are unchanged (the registry is asked only when they change)."""
    key = etherpad_npm_key()
    cache = ctx.farm.state_dir / "build-cache" / "etherpad" / f"src-{key[:32]}.tar.gz"
    src.mkdir(parents=True)
    if cache.is_file():
        ctx.say(f"src/ from the build cache ({cache.name}: same package, same npm install)")
        ctx.run("unpack the cached src/", ["tar", "-xzf", str(cache), "-C", str(src),
                                           "--no-same-owner"])
        return
    if shutil.which("npm") is None:
        raise ArtifactError("artifact 'etherpad': npm is not installed on the controller "
                            "(the set-up installs it: scripts/lib/bootstrap.sh)")
    npm_env = {"npm_config_update_notifier": "false", "npm_config_fund": "false",
               "npm_config_audit": "false"}
    ctx.run(f"npm pack {ETHERPAD_PACKAGE}@{ETHERPAD_VERSION}",
            ["npm", "pack", f"{ETHERPAD_PACKAGE}@{ETHERPAD_VERSION}"], env=npm_env, cwd=ctx.work)
    packed = sorted(ctx.work.glob(f"{ETHERPAD_PACKAGE}-*.tgz"))
    if len(packed) != 1:
        raise ArtifactError(f"artifact 'etherpad': npm pack left {[p.name for p in packed]}")
    ctx.run("unpack the package into src/",
            ["tar", "-xzf", str(packed[0]), "-C", str(src), "--strip-components=1",
             "--no-same-owner"])
    ctx.run("npm install the dependencies into src/node_modules (a few minutes)",
            ["npm", *ETHERPAD_NPM_INSTALL], env=npm_env, cwd=src)
    missing = [m for m in ETHERPAD_REQUIRED_MODULES
               if not (src / "node_modules" / m / "package.json").is_file()]
    if missing:
        raise ArtifactError(f"artifact 'etherpad': src/node_modules lacks {', '.join(missing)} "
                            f"after npm install (log: {ctx.log})")
    cache.parent.mkdir(parents=True, exist_ok=True)
    for old in cache.parent.glob("src-*.tar.gz"):
        old.unlink()
    partial = cache.with_name(f".{cache.name}.partial")
    _tar(ctx, src, partial, level=1)
    partial.replace(cache)


@recipe("etherpad", f"recipe etherpad: npm pack {ETHERPAD_PACKAGE}@{ETHERPAD_VERSION} into "
        "<root>/src, npm " + " ".join(ETHERPAD_NPM_INSTALL) + " in src/ (src/node_modules), "
        f"<root>/node_modules/{ETHERPAD_PACKAGE} -> ../src, entfarm's {ETHERPAD_PLUGIN} plugin; "
        "one reproducible tar.gz")
def build_etherpad(ctx: BuildContext) -> str:
    """An Etherpad tree hosts unpack (roles/etherpad) and run with Debian's nodejs.

    npm runs on the controller only, with its own configured registry; hosts get the tree."""
    from .runner import project_root

    plugin = _etherpad_plugin(project_root())
    tree = ctx.work / "etherpad"
    src = tree / "src"
    _etherpad_src(ctx, src)
    hoisted = tree / "node_modules"
    hoisted.mkdir()
    (hoisted / ETHERPAD_PACKAGE).symlink_to("../src")
    shutil.copytree(plugin, hoisted / ETHERPAD_PLUGIN, copy_function=shutil.copyfile)
    # Etherpad writes .ep_initialized into each plugin the first time it loads it (and runs its
    # init_<plugin> hook; neither plugin has one). The tree is read-only on the hosts: shipped.
    for directory in (src, hoisted / ETHERPAD_PLUGIN):
        (directory / ".ep_initialized").write_text("done", encoding="utf-8")
    (tree / "ENTFARM-BUILD.json").write_text(json.dumps({
        "package": f"{ETHERPAD_PACKAGE}@{ETHERPAD_VERSION}", "plugin": ETHERPAD_PLUGIN,
        "npm_key": etherpad_npm_key(), "npm_install": list(ETHERPAD_NPM_INSTALL),
    }, indent=2) + "\n", encoding="utf-8")
    _tar(ctx, tree, ctx.out / ETHERPAD_FILE)
    return ETHERPAD_VERSION


# -- recipe: the school servers' proxy blocklist --------------------------------------------

BLOCKLIST = "blocklist"
BLOCKLIST_SOURCE = "blocklist.txt"  # in the inventory directory: one domain a line, # comments
BLOCKLIST_FILE = "blocklist.txt"  # in the store: squid dstdomain lines, .<domain>


def blocklist_domains(text: str) -> list[str]:
    """Domains of a list, lower case, each once, without those a listed parent covers: squid
    reads ``.example.org`` as the domain and all its subdomains, and warns about overlaps."""
    domains = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip().lower().lstrip(".")
        if line:
            if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9])?", line):
                raise ArtifactError(f"blocklist: {line!r} is not a domain name")
            domains.add(line)

    def covered(domain: str) -> bool:
        parts = domain.split(".")
        return any(".".join(parts[i:]) in domains for i in range(1, len(parts)))

    return sorted(d for d in domains if not covered(d))


@recipe(BLOCKLIST, f"recipe blocklist: <inventory>/{BLOCKLIST_SOURCE} as squid dstdomain lines; "
        "production declares a source (a published list) under artifacts.sources.blocklist")
def build_blocklist(ctx: BuildContext) -> str:
    """The domains the school servers' proxies refuse to pupils."""
    source = ctx.farm.inventory_dir / BLOCKLIST_SOURCE
    if not source.is_file():
        raise ArtifactError(
            f"artifact {BLOCKLIST!r}: {source} is missing; write one domain a line there, or "
            f"declare artifacts.sources.{BLOCKLIST} (a published list) in {ctx.farm.file}")
    domains = blocklist_domains(source.read_text(encoding="utf-8"))
    text = "".join(f".{d}\n" for d in domains)
    (ctx.out / BLOCKLIST_FILE).write_text(text, encoding="utf-8")
    ctx.say(f"{len(domains)} domain(s)")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- helpers ------------------------------------------------------------------------------------


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
