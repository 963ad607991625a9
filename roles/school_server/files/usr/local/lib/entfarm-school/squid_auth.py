#!/usr/bin/python3
"""squid basic authentication helper: "login password" lines in (URL-encoded), OK or ERR out.

Checks the password against the NT hash the accounts synchronisation keeps for the proxy
(/var/lib/entfarm-school/squid/users, login:hash, active accounts only): the proxy answers
from this host alone, with or without the farm.
"""

from __future__ import annotations

import hmac
import sys
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from entfarm_ntlm import nt_hash

USERS = Path("/var/lib/entfarm-school/squid/users")


def load() -> tuple[float, dict[str, str]]:
    try:
        stamp = USERS.stat().st_mtime
        lines = USERS.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0.0, {}
    return stamp, dict(line.split(":", 1) for line in lines if ":" in line)


def main() -> None:
    stamp, users = load()
    for line in sys.stdin:
        if USERS.exists() and USERS.stat().st_mtime != stamp:
            stamp, users = load()
        login, _, password = line.rstrip("\n").partition(" ")
        login, password = urllib.parse.unquote(login), urllib.parse.unquote(password)
        expected = users.get(login)
        ok = expected is not None and hmac.compare_digest(expected, nt_hash(password))
        sys.stdout.write("OK\n" if ok else "ERR\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
