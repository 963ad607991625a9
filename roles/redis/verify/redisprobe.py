"""Probe the farm's Redis from a client host, with Python's standard library only.

Run on the client host (``python3 -c "$(cat redisprobe.py)" HOST PORT CAFILE [USER] -- CMD…``)
so that Redis sees the client's own address, as an application there would connect:

- TLS to HOST:PORT, the certificate checked against CAFILE and HOST;
- with USER (and ``--password-stdin``: the password on the first line of stdin), ``AUTH``;
- then each command given after ``--``, words separated by spaces (``"GET moodle:x"``).

Only read commands should be given: the probe is used by read-only checks. Prints one JSON
object: the TLS version, the AUTH answer and each command's answer, errors as "-ERR …"
strings. Exits 0 whatever Redis answered; 2 on a probe failure.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from typing import Any


def _encode(words: list[str]) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$" + str(len(data)).encode() + b"\r\n" + data + b"\r\n")
    return b"".join(out)


class _Reader:
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exact(self, size: int) -> bytes:
        while len(self.buffer) < size + 2:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size + 2:]
        return data

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:].decode("utf-8", "replace")
        if kind == b"+":
            return rest
        if kind == b"-":
            return "-" + rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exact(size).decode("utf-8", "replace")
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.reply() for _ in range(count)]
        raise ValueError(f"unexpected reply {line[:40]!r}")


def probe(host: str, port: int, cafile: str, user: str | None, password: str | None,
          commands: list[str]) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection((host, port), timeout=15)
    with context.wrap_socket(raw, server_hostname=host) as sock:
        reader = _Reader(sock)
        result: dict[str, Any] = {"tls": sock.version(), "auth": None, "replies": []}
        if user is not None:
            sock.sendall(_encode(["AUTH", user, password or ""]))
            result["auth"] = reader.reply()
        for command in commands:
            sock.sendall(_encode(command.split()))
            result["replies"].append(reader.reply())
        return result


def main(argv: list[str]) -> int:
    use_stdin = "--password-stdin" in argv
    argv = [a for a in argv if a != "--password-stdin"]
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    head, commands = argv[:split], argv[split + 1:]
    if len(head) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    host, port, cafile = head[:3]
    user = head[3] if len(head) == 4 else None
    password = sys.stdin.readline().rstrip("\n") if use_stdin else None
    try:
        result = probe(host, int(port), cafile, user, password, commands)
    except (OSError, ValueError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
