"""NT hashes (MD4 of the UTF-16LE password), as Samba checks logins against them.

OpenSSL 3 keeps MD4 in its legacy provider, which Debian does not load, so ``hashlib`` has no
MD4 on the controller nor on the hosts: this is RFC 1320 in plain Python. The module needs only
the standard library, so the school servers run the same file (roles/school_server links it).
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF


# The 48 steps of RFC 1320 as (word index, shift) per round; the rotation is written inline in
# the loops below (a function call per step made a first import's activation codes cost
# seconds per 100 000 accounts).
_ROUND1 = tuple((i, (3, 7, 11, 19)[i % 4]) for i in range(16))
_ROUND2 = tuple(((i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]) for i in range(16))
_ROUND3 = tuple(zip((0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15),
                    (3, 9, 11, 15) * 4, strict=True))


def md4(data: bytes) -> bytes:
    """The MD4 digest of ``data`` (RFC 1320)."""
    length = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    data += b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", length)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for offset in range(0, len(data), 64):
        x = struct.unpack("<16I", data[offset:offset + 64])
        aa, bb, cc, dd = a, b, c, d
        for k, s in _ROUND1:  # F(b, c, d) = (b & c) | (~b & d)
            t = (a + ((b & c) | (~b & d)) + x[k]) & _MASK
            a, b, c, d = d, ((t << s) | (t >> (32 - s))) & _MASK, b, c
        for k, s in _ROUND2:  # G = majority, constant 0x5A827999
            t = (a + ((b & c) | (b & d) | (c & d)) + x[k] + 0x5A827999) & _MASK
            a, b, c, d = d, ((t << s) | (t >> (32 - s))) & _MASK, b, c
        for k, s in _ROUND3:  # H = parity, constant 0x6ED9EBA1
            t = (a + (b ^ c ^ d) + x[k] + 0x6ED9EBA1) & _MASK
            a, b, c, d = d, ((t << s) | (t >> (32 - s))) & _MASK, b, c
        a, b, c, d = ((a + aa) & _MASK, (b + bb) & _MASK, (c + cc) & _MASK, (d + dd) & _MASK)
    return struct.pack("<4I", a, b, c, d)


def md4_many(messages: list[bytes]) -> list[bytes]:
    """The MD4 digests of many messages, the same as :func:`md4` on each.

    Messages of at most 55 bytes are one MD4 block; those are hashed together, each in its own
    64-bit lane of one large integer, so that every step of RFC 1320 is a few integer
    operations for all of them (sums stay below 2**34 within a lane; masking each lane to 32
    bits after a shift drops what crossed into a neighbour). Longer messages go through
    :func:`md4`. A first import hashes every new account's one-time code this way."""
    out: list[bytes] = [b""] * len(messages)
    short = [i for i, m in enumerate(messages) if len(m) <= 55]
    for i, m in enumerate(messages):
        if len(m) > 55:
            out[i] = md4(m)
    n = len(short)
    if not n:
        return out
    words = [struct.unpack("<16I", messages[i] + b"\x80" + b"\x00" * (55 - len(messages[i]))
                           + struct.pack("<Q", 8 * len(messages[i]))) for i in short]
    lanes = struct.Struct(f"<{n}Q")

    def pack(values: list[int] | tuple[int, ...]) -> int:
        return int.from_bytes(lanes.pack(*values), "little")

    x = [pack([w[k] for w in words]) for k in range(16)]
    one = pack([1] * n)
    mask = _MASK * one
    a, b, c, d = 0x67452301 * one, 0xEFCDAB89 * one, 0x98BADCFE * one, 0x10325476 * one
    aa, bb, cc, dd = a, b, c, d
    for k, s in _ROUND1:
        t = (a + ((b & c) | ((b ^ mask) & d)) + x[k]) & mask
        a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
    k2 = 0x5A827999 * one
    for k, s in _ROUND2:
        t = (a + ((b & c) | (b & d) | (c & d)) + x[k] + k2) & mask
        a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
    k3 = 0x6ED9EBA1 * one
    for k, s in _ROUND3:
        t = (a + (b ^ c ^ d) + x[k] + k3) & mask
        a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
    size = 8 * n
    regs = [lanes.unpack(((r + r0) & mask).to_bytes(size, "little"))
            for r, r0 in ((a, aa), (b, bb), (c, cc), (d, dd))]
    for j, i in enumerate(short):
        out[i] = struct.pack("<4I", regs[0][j], regs[1][j], regs[2][j], regs[3][j])
    return out


def nt_hashes(passwords: list[str]) -> list[str]:
    """:func:`nt_hash` of many passwords at once (see :func:`md4_many`)."""
    return [h.hex().upper() for h in md4_many([p.encode("utf-16-le") for p in passwords])]


def nt_hash(password: str) -> str:
    """The NT hash of a password: 32 upper-case hexadecimal digits (smbpasswd's format)."""
    return md4(password.encode("utf-16-le")).hex().upper()
