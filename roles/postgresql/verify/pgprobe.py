"""Probe the farm's PostgreSQL from a client host, with Python's standard library only.

Run on the client host (``python3 -c "$(cat pgprobe.py)" HOST PORT USER DATABASE CAFILE``) so
that the server sees the client's own address, as an application there would connect. Nothing
is written: after authentication the probe only reads who it is and how it is connected.

- Without ``--password-stdin``: TLS, then the startup message. pg_hba.conf decides at that point,
  before any password: the server either asks for SCRAM-SHA-256 ("authentication") or refuses
  the host ("refused", SQLSTATE 28000).
- With ``--password-stdin`` (the password on the first line of stdin): the whole SCRAM-SHA-256
  exchange, then ``SELECT`` of the session's user, database and TLS version ("ok").

Prints one JSON object and exits 0 whatever the server answered; 2 on a probe failure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import ssl
import struct
import sys
from typing import Any

SSL_REQUEST = 80877103
PROTOCOL_3 = 196608


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    return data


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, 5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], _recv_exact(sock, length - 4)


def _send(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(kind + struct.pack("!I", len(payload) + 4) + payload)


def _error(payload: bytes) -> dict[str, str]:
    fields = {chr(p[0]): p[1:].decode("utf-8", "replace") for p in payload.split(b"\0") if p}
    return {"sqlstate": fields.get("C", ""), "error": fields.get("M", "")}


def _auth_code(payload: bytes) -> int:
    return int(struct.unpack("!I", payload[:4])[0])


def _scram(sock: socket.socket, password: str) -> dict[str, Any] | None:
    """SCRAM-SHA-256 (RFC 7677) without channel binding; None when the server accepted."""
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    first = ("n,," + first_bare).encode()
    _send(sock, b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)
    kind, payload = _read(sock)
    if kind == b"E":
        return {"stage": "refused", **_error(payload)}
    server_first = payload[4:].decode()
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise ValueError("server nonce does not extend the client nonce")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    final_bare = f"c=biws,r={attrs['r']}"
    message = f"{first_bare},{server_first},{final_bare}".encode()
    signature = hmac.new(stored_key, message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    _send(sock, b"p", f"{final_bare},p={base64.b64encode(proof).decode()}".encode())
    kind, payload = _read(sock)
    if kind == b"E":
        return {"stage": "refused", **_error(payload)}
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expected = base64.b64encode(hmac.new(server_key, message, "sha256").digest()).decode()
    if payload[4:].decode() != f"v={expected}":
        raise ValueError("the server's SCRAM signature does not match: not the real server")
    return None


def _query(sock: socket.socket, sql: str) -> list[str | None]:
    _send(sock, b"Q", sql.encode() + b"\0")
    row: list[str | None] = []
    while True:
        kind, payload = _read(sock)
        if kind == b"D":
            (count,) = struct.unpack("!H", payload[:2])
            pos = 2
            for _ in range(count):
                (size,) = struct.unpack("!i", payload[pos:pos + 4])
                pos += 4
                row.append(None if size < 0 else payload[pos:pos + size].decode())
                pos += max(size, 0)
        elif kind == b"E":
            raise RuntimeError(_error(payload)["error"])
        elif kind == b"Z":
            return row


def probe(host: str, port: int, user: str, database: str, cafile: str,
          password: str | None) -> dict[str, Any]:
    raw = socket.create_connection((host, port), timeout=15)
    raw.sendall(struct.pack("!II", 8, SSL_REQUEST))
    if _recv_exact(raw, 1) != b"S":
        return {"stage": "tls", "error": "the server does not offer TLS"}
    context = ssl.create_default_context(cafile=cafile)
    with context.wrap_socket(raw, server_hostname=host) as sock:
        tls = sock.version()
        params = b"".join(k + b"\0" + v.encode() + b"\0"
                          for k, v in ((b"user", user), (b"database", database)))
        body = struct.pack("!I", PROTOCOL_3) + params + b"\0"
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        kind, payload = _read(sock)
        if kind == b"E":
            return {"stage": "refused", "tls": tls, **_error(payload)}
        if kind != b"R" or _auth_code(payload) != 10:
            return {"stage": "unexpected", "tls": tls,
                    "error": f"message {kind!r}, not a SASL authentication request"}
        mechanisms = [m.decode() for m in payload[4:].split(b"\0") if m]
        if password is None:
            return {"stage": "authentication", "tls": tls, "mechanisms": mechanisms}
        refused = _scram(sock, password)
        if refused:
            return {**refused, "tls": tls}
        while True:  # AuthenticationOk, parameters, key data, until ReadyForQuery
            kind, payload = _read(sock)
            if kind == b"E":
                return {"stage": "refused", "tls": tls, **_error(payload)}
            if kind == b"Z":
                break
        current_user, current_db, ssl_used, version = _query(
            sock, "SELECT current_user, current_database(), ssl::text, version "
                  "FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        _send(sock, b"X", b"")
        return {"stage": "ok", "tls": tls, "user": current_user, "database": current_db,
                "ssl": ssl_used, "server_tls": version}


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--password-stdin"]
    if len(args) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, user, database, cafile = args
    password = sys.stdin.readline().rstrip("\n") if "--password-stdin" in argv else None
    try:
        result = probe(host, int(port), user, database, cafile, password)
    except (OSError, ValueError, RuntimeError) as exc:
        result = {"stage": "error", "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
