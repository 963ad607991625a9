"""UAI check letters: the 7-digit number mod 23 indexes ABCDEFGHJKLMNPRSTUVWXYZ."""

from __future__ import annotations

import pytest

from entfarm.uai import CHECK_LETTERS, check_letter, is_valid_uai, uai_problem


@pytest.mark.parametrize("uai", ["0290009C", "0750654D", "0360005K", "0450022E", "0360010R"])
def test_known_uais_are_valid(uai: str) -> None:
    assert uai_problem(uai) is None
    assert check_letter(uai[:7]) == uai[7]


def test_letters_skip_i_o_q() -> None:
    assert len(CHECK_LETTERS) == 23
    assert not set("IOQ") & set(CHECK_LETTERS)
    assert check_letter("0000000") == "A" and check_letter("0000022") == "Z"
    assert check_letter("0000023") == "A"


def test_wrong_check_letter_names_the_right_one() -> None:
    message = uai_problem("0290009D")
    assert message is not None
    assert "'0290009D'" in message and "mod 23" in message and "0290009C" in message


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("029009C", "7 digits then a check letter"),
        ("02900090C", "7 digits then a check letter"),
        ("A290009C", "7 digits then a check letter"),
        ("", "7 digits then a check letter"),
        ("0290009", "lacks its check letter"),
        ("0290009c", "upper case (0290009C)"),
        ("0290009d", "upper case (0290009C)"),
        (290009, "expected text"),
        (None, "expected text"),
    ],
)
def test_shape_errors_say_what_is_valid(value: object, hint: str) -> None:
    message = uai_problem(value)
    assert message is not None
    assert hint in message
    assert repr(value) in message


def test_check_letter_needs_seven_digits() -> None:
    with pytest.raises(ValueError, match="not 7 digits"):
        check_letter("123")


def test_is_valid_uai() -> None:
    assert is_valid_uai("0750654D")
    assert not is_valid_uai("0750654E")
