"""UAI (Unité Administrative Immatriculée): the national identifier of an établissement.

Seven characters -- three for the département, four digits -- then a check letter: the 7-digit
number modulo 23 indexes ``ABCDEFGHJKLMNPRSTUVWXYZ`` (I, O and Q are left out).
"""

from __future__ import annotations

import re

CHECK_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
_SHAPE = re.compile(r"^[0-9]{3}[0-9]{4}[A-Z]$")
# Corsica (2A/2B) UAIs start with 620/720 in practice; the shape stays numeric.


def check_letter(seven_digits: str) -> str:
    """The check letter for a 7-digit UAI stem."""
    return CHECK_LETTERS[int(seven_digits) % 23]


def uai_problem(value: object) -> str | None:
    """Why ``value`` is not a valid UAI, or None when it is."""
    if not isinstance(value, str):
        return f"{value!r} is not a UAI: expected a string of 7 digits and a check letter, e.g. 0290009C"
    if not _SHAPE.match(value):
        hint = " (letters must be upper case)" if _SHAPE.match(value.upper()) else ""
        return (
            f"{value!r} is not a UAI: expected 7 digits then a check letter, e.g. 0290009C{hint}"
        )
    expected = check_letter(value[:7])
    if value[7] != expected:
        return (
            f"{value!r} has a wrong check letter: {value[:7]} mod 23 gives "
            f"{expected!r}, so the UAI would be {value[:7]}{expected}"
        )
    return None


def is_valid_uai(value: object) -> bool:
    return uai_problem(value) is None
