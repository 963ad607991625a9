"""NT hashes (MD4 of the UTF-16LE password), as Samba checks logins against them.

OpenSSL 3 keeps MD4 in its legacy provider, which Debian does not load, so ``hashlib`` has no
MD4 on the controller nor on the hosts: this is RFC 1320 in plain Python. The module needs only
the standard library, so the school servers run the same file (roles/school_server links it).
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF


def _rotl(x: int, n: int) -> int:
    x &= _MASK
    return ((x << n) | (x >> (32 - n))) & _MASK


def md4(data: bytes) -> bytes:
    """The MD4 digest of ``data`` (RFC 1320)."""
    length = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    data += b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", length)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for offset in range(0, len(data), 64):
        x = struct.unpack("<16I", data[offset:offset + 64])
        aa, bb, cc, dd = a, b, c, d
        for i in range(16):  # round 1: F(b, c, d) = (b & c) | (~b & d)
            k, s = i, (3, 7, 11, 19)[i % 4]
            a = _rotl(a + ((b & c) | (~b & d)) + x[k], s)
            a, b, c, d = d, a, b, c
        for i in range(16):  # round 2: G = majority, constant 0x5A827999
            k, s = (i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]
            a = _rotl(a + ((b & c) | (b & d) | (c & d)) + x[k] + 0x5A827999, s)
            a, b, c, d = d, a, b, c
        for i in range(16):  # round 3: H = parity, constant 0x6ED9EBA1
            k, s = (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15)[i], (3, 9, 11, 15)[i % 4]
            a = _rotl(a + (b ^ c ^ d) + x[k] + 0x6ED9EBA1, s)
            a, b, c, d = d, a, b, c
        a, b, c, d = ((a + aa) & _MASK, (b + bb) & _MASK, (c + cc) & _MASK, (d + dd) & _MASK)
    return struct.pack("<4I", a, b, c, d)


def nt_hash(password: str) -> str:
    """The NT hash of a password: 32 upper-case hexadecimal digits (smbpasswd's format)."""
    return md4(password.encode("utf-16-le")).hex().upper()
