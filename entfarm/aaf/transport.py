"""How the controller runs the OpenLDAP client tools: on the directory host, through the inventory's
connection (lab: ``docker exec``; production: ``ssh``), or locally (tests: a slapd in a temp dir).

The directory is reached over its ldapi socket with SASL EXTERNAL as root of the directory host,
so no bind password travels or is stored on the controller.
"""

from __future__ import annotations

import gzip
import shlex
import subprocess
import tempfile
from typing import Protocol

from ..errors import UserError
from ..model import Farm


class TransportError(UserError):
    """A directory command failed; carries the tool's exit code."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode

    def __reduce__(self) -> tuple[type[TransportError], tuple[str, int]]:
        # Raised in a forked child (entfarm.aaf.forked), it comes back through pickle.
        return type(self), (str(self), self.returncode)

    @classmethod
    def of(cls, tool: str, where: str, returncode: int, stderr: bytes) -> TransportError:
        err = stderr.decode("utf-8", "replace").strip()[-2000:]
        return cls(f"{tool} failed on {where} (exit {returncode}): {err}", returncode)


class Transport(Protocol):
    uri: str  # LDAP URI as seen from where the commands run

    def run(self, argv: list[str], stdin: bytes | None = None, ok: tuple[int, ...] = (0,),
            compress: bool = False) -> bytes: ...

    def describe(self) -> str: ...

    def start(self, argv: list[str]) -> Running: ...


class Running:
    """A tool started with its input still to come (``stdin``); :meth:`wait` raises a
    :class:`TransportError` as :meth:`Transport.run` does when it fails."""

    def __init__(self, argv: list[str], command: list[str], where: str):
        self.tool = argv[0]
        self.where = where
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(command, stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=self._stderr)
        except FileNotFoundError as exc:
            self._stderr.close()
            raise UserError(f"cannot run {command[0]!r}: {exc.strerror}") from exc
        assert self._proc.stdin is not None
        self.stdin = self._proc.stdin

    def wait(self) -> None:
        try:
            try:
                self.stdin.close()
            except OSError:  # it exited without reading everything: its status says why
                pass
            code = self._proc.wait()
            if code != 0:
                self._stderr.seek(0)
                raise TransportError.of(self.tool, self.where, code, self._stderr.read())
        finally:
            self._stderr.close()

    def abandon(self) -> None:
        """End its input and wait for it, whatever it then says. Not a kill: killing the local
        client (``docker exec``, ``ssh``) would leave the tool running on the host, where the
        caller is about to undo what it wrote."""
        try:
            self.stdin.close()
        except OSError:
            pass
        self._proc.wait()
        self._stderr.close()


class LocalTransport:
    """Runs the tools on this machine (optionally behind a prefix such as docker exec or ssh)."""

    def __init__(self, uri: str = "ldapi:///", prefix: list[str] | None = None,
                 quote: bool = False):
        self.uri = uri
        self.prefix = prefix or []
        self.quote = quote

    def describe(self) -> str:
        return " ".join(self.prefix) or "local"

    def run(self, argv: list[str], stdin: bytes | None = None, ok: tuple[int, ...] = (0,),
            compress: bool = False) -> bytes:
        """``argv``'s output; ``compress``: gzipped where it runs and unzipped here, for big
        outputs. Measured on the lab: the 20 MB search of 100 000 persons' state came through
        ``docker exec`` in 1.4-1.5 s on an idle host, its 4 MB gzip -1 in 0.8 s; while the
        importer read its export on both cores, 3.9 s against 1.8 s. gzip and bash are
        essential packages of Debian."""
        command = self._command(
            ["bash", "-o", "pipefail", "-c", '"$@" | gzip -1', "bash", *argv] if compress
            else argv)
        try:
            done = subprocess.run(command, input=stdin if stdin is not None else b"",
                                  capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise UserError(f"cannot run {command[0]!r}: {exc.strerror}") from exc
        if done.returncode not in ok:
            raise TransportError.of(argv[0], self.describe(), done.returncode, done.stderr)
        return gzip.decompress(done.stdout) if compress else done.stdout

    def start(self, argv: list[str]) -> Running:
        return Running(argv, self._command(argv), self.describe())

    def _command(self, argv: list[str]) -> list[str]:
        return [*self.prefix, shlex.join(argv)] if self.quote else [*self.prefix, *argv]


def for_farm(farm: Farm) -> LocalTransport:
    """The transport to the farm's (first) directory host."""
    placement = farm.spec.services.get("directory")
    if placement is None:
        raise UserError(f"{farm.file}: no services.directory; the AAF import needs a directory")
    return for_host(farm, placement.hosts[0])


def for_host(farm: Farm, name: str) -> LocalTransport:
    """The transport to one of the farm's hosts, as the farm reaches it."""
    host = next((h for h in farm.hosts() if h.name == name), None)
    if host is None:
        raise UserError(f"{farm.file}: no host named {name!r}")
    reach = farm.reach(host)
    if reach.connection == "docker":
        return LocalTransport(prefix=["docker", "exec", "-i", reach.target])
    return LocalTransport(
        prefix=["ssh", "-o", "BatchMode=yes", f"{reach.user}@{reach.target}", "--"], quote=True)
