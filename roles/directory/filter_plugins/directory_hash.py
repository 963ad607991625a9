"""Password hashes for slapd, computed on the controller, deterministic: reruns change nothing.

passlib is not a dependency of the project; {SSHA512} (pw-sha2 module) needs only hashlib.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any


def directory_ssha512(password: str, salt_seed: str) -> str:
    """Return ``{SSHA512}`` of ``password`` with a 16-byte salt derived from ``salt_seed``.

    The seed (base DN and account) is unique per farm and per account, so equal passwords
    never share a hash, and the same inputs always give the same value (idempotent runs).
    """
    salt = hashlib.sha256(("entfarm-directory:" + salt_seed).encode()).digest()[:16]
    digest = hashlib.sha512(password.encode() + salt).digest()
    return "{SSHA512}" + base64.b64encode(digest + salt).decode()


class FilterModule:
    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"directory_ssha512": directory_ssha512}
