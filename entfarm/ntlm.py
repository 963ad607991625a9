"""NT hashes (MD4 of the UTF-16LE password), as Samba checks logins against them.

OpenSSL 3 keeps MD4 in its legacy provider, which Debian does not load, so ``hashlib`` has no
MD4 on the controller nor on the hosts: this is RFC 1320 in plain Python. The module needs only
the standard library, so the school servers run the same file (roles/school_server links it).
"""

from __future__ import annotations

import struct

# The 48 steps of RFC 1320 as (word index, shift) per round.
_ROUND1 = tuple((i, (3, 7, 11, 19)[i % 4]) for i in range(16))
_ROUND2 = tuple(((i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]) for i in range(16))
_ROUND3 = tuple(zip((0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15),
                    (3, 9, 11, 15) * 4, strict=True))
_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def _padded(data: bytes) -> bytes:
    """``data`` with MD4's padding and bit length: a whole number of 64-byte blocks."""
    length = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    return data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", length)


def _compress(state: tuple[int, int, int, int], x: list[int], one: int
              ) -> tuple[int, int, int, int]:
    """One block through the 48 steps. Every integer holds lanes of 64 bits, each a 32-bit
    word of its own message; ``one`` has a 1 in each lane (1 for a single message). A lane's
    sums stay below 2**34, and masking each lane to 32 bits after a shift drops what crossed
    into a neighbour. The rotation is written inline (a function call per step made a first
    import's activation codes cost seconds per 100 000 accounts)."""
    mask = 0xFFFFFFFF * one
    a, b, c, d = state
    for k, s in _ROUND1:  # F(b, c, d) = (b & c) | (~b & d)
        t = (a + ((b & c) | ((b ^ mask) & d)) + x[k]) & mask
        a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
    k2 = 0x5A827999 * one
    for k, s in _ROUND2:  # G = majority
        t = (a + ((b & c) | (b & d) | (c & d)) + x[k] + k2) & mask
        a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
    k3 = 0x6ED9EBA1 * one
    for k, s in _ROUND3:  # H = parity
        t = (a + (b ^ c ^ d) + x[k] + k3) & mask
        a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
    w, y, z, v = state
    return (w + a) & mask, (y + b) & mask, (z + c) & mask, (v + d) & mask


def md4(data: bytes) -> bytes:
    """The MD4 digest of ``data`` (RFC 1320)."""
    data = _padded(data)
    state = _INIT
    for offset in range(0, len(data), 64):
        state = _compress(state, list(struct.unpack("<16I", data[offset:offset + 64])), 1)
    return struct.pack("<4I", *state)


def md4_many(messages: list[bytes]) -> list[bytes]:
    """The MD4 digests of many messages, the same as :func:`md4` on each.

    Messages of at most 55 bytes are one MD4 block; those are hashed together, each in its own
    64-bit lane of one large integer (see :func:`_compress`), so that the 48 steps run once for
    all of them. Longer messages go through :func:`md4`. A first import hashes every new
    account's one-time code this way."""
    out = [b"" if len(m) <= 55 else md4(m) for m in messages]
    short = [i for i, m in enumerate(messages) if len(m) <= 55]
    if not short:
        return out
    lanes = struct.Struct(f"<{len(short)}Q")

    def pack(values: list[int]) -> int:
        return int.from_bytes(lanes.pack(*values), "little")

    words = [struct.unpack("<16I", _padded(messages[i])) for i in short]
    one = pack([1] * len(short))
    a0, b0, c0, d0 = (v * one for v in _INIT)
    state = _compress((a0, b0, c0, d0), [pack([w[k] for w in words]) for k in range(16)], one)
    size = 8 * len(short)
    a, b, c, d = (lanes.unpack(r.to_bytes(size, "little")) for r in state)
    for j, i in enumerate(short):
        out[i] = struct.pack("<4I", a[j], b[j], c[j], d[j])
    return out


def nt_hashes(passwords: list[str]) -> list[str]:
    """:func:`nt_hash` of many passwords at once (see :func:`md4_many`)."""
    return [h.hex().upper() for h in md4_many([p.encode("utf-16-le") for p in passwords])]


def nt_hash(password: str) -> str:
    """The NT hash of a password: 32 upper-case hexadecimal digits (smbpasswd's format)."""
    return md4(password.encode("utf-16-le")).hex().upper()
