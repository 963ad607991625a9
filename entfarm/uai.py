"""UAI (Unité Administrative Immatriculée): the national identifier of an établissement.

Seven characters -- three for the département, four digits -- then a check letter: the 7-digit
number modulo 23 indexes ``ABCDEFGHJKLMNPRSTUVWXYZ`` (I, O and Q are left out).
"""

from __future__ import annotations

import re

CHECK_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
_SHAPE = re.compile(r"^[0-9]{7}[A-Z]$")
# Corsica (2A/2B) UAIs start with 620/720 in practice; the shape stays numeric.
EXAMPLE = "0290009C"


def check_letter(seven_digits: str) -> str:
    """The check letter for a 7-digit UAI stem."""
    if not re.fullmatch(r"[0-9]{7}", seven_digits):
        raise ValueError(f"{seven_digits!r} is not 7 digits")
    return CHECK_LETTERS[int(seven_digits) % 23]


def uai_problem(value: object) -> str | None:
    """Why ``value`` is not a valid UAI (naming the value and the valid form), or None."""
    if not isinstance(value, str):
        return (f"{value!r} is not a UAI: expected text, 7 digits then a check letter, "
                f"e.g. {EXAMPLE}")
    if re.fullmatch(r"[0-9]{7}", value):
        return (f"{value!r} lacks its check letter: {value} mod 23 gives "
                f"{check_letter(value)!r}, so the UAI would be {value}{check_letter(value)}")
    if not _SHAPE.match(value):
        if _SHAPE.match(value.upper()):
            upper = value.upper()
            fixed = upper[:7] + check_letter(upper[:7])
            return (f"{value!r} is not a UAI: the check letter must be upper case "
                    f"({fixed})")
        return (f"{value!r} is not a UAI: expected 7 digits then a check letter "
                f"({len(value)} characters instead of 8), e.g. {EXAMPLE}")
    expected = check_letter(value[:7])
    if value[7] != expected:
        return (
            f"{value!r} has a wrong check letter: {value[:7]} mod 23 gives "
            f"{expected!r}, so the UAI would be {value[:7]}{expected}"
        )
    return None


def is_valid_uai(value: object) -> bool:
    return uai_problem(value) is None
