"""How the controller runs the OpenLDAP client tools: on the directory host, through the inventory's
connection (lab: ``docker exec``; production: ``ssh``), or locally (tests: a slapd in a temp dir).

The directory is reached over its ldapi socket with SASL EXTERNAL as root of the directory host,
so no bind password travels or is stored on the controller.
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Protocol

from ..errors import UserError
from ..model import Farm


class TransportError(UserError):
    """A directory command failed; carries the tool's exit code."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


class Transport(Protocol):
    uri: str  # LDAP URI as seen from where the commands run

    def run(self, argv: list[str], stdin: bytes | None = None, ok: tuple[int, ...] = (0,)
            ) -> bytes: ...

    def describe(self) -> str: ...


class LocalTransport:
    """Runs the tools on this machine (optionally behind a prefix such as docker exec or ssh)."""

    def __init__(self, uri: str = "ldapi:///", prefix: list[str] | None = None,
                 quote: bool = False):
        self.uri = uri
        self.prefix = prefix or []
        self.quote = quote

    def describe(self) -> str:
        return " ".join(self.prefix) or "local"

    def run(self, argv: list[str], stdin: bytes | None = None, ok: tuple[int, ...] = (0,)
            ) -> bytes:
        command = [*self.prefix, shlex.join(argv)] if self.quote else [*self.prefix, *argv]
        try:
            done = subprocess.run(command, input=stdin if stdin is not None else b"",
                                  capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise UserError(f"cannot run {command[0]!r}: {exc.strerror}") from exc
        if done.returncode not in ok:
            err = done.stderr.decode("utf-8", "replace").strip()[-2000:]
            raise TransportError(
                f"{argv[0]} failed on {self.describe()} (exit {done.returncode}): {err}",
                done.returncode)
        return done.stdout


def for_farm(farm: Farm) -> LocalTransport:
    """The transport to the farm's (first) directory host."""
    placement = farm.spec.services.get("directory")
    if placement is None:
        raise UserError(f"{farm.file}: no services.directory; the AAF import needs a directory")
    host = next(h for h in farm.hosts() if h.name == placement.hosts[0])
    reach = farm.reach(host)
    if reach.connection == "docker":
        return LocalTransport(prefix=["docker", "exec", "-i", reach.target])
    return LocalTransport(
        prefix=["ssh", "-o", "BatchMode=yes", f"{reach.user}@{reach.target}", "--"], quote=True)
