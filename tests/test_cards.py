"""Card validation and tokens (services/payments/cards.py)."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from services.payments import cards
from services.payments.cards import (
    Card,
    CardError,
    brand_of,
    contains_card_number,
    looks_like_luhn_number,
    luhn_valid,
    new_token,
    validate_card,
)

TODAY = dt.date(2026, 11, 21)


def check(number: str, month: int = 12, year: int = 2030, cvv: str = "123") -> Card:
    return validate_card(number, month, year, cvv, today=TODAY)


def refused(number: str, month: int = 12, year: int = 2030, cvv: str = "123") -> str:
    with pytest.raises(CardError) as info:
        check(number, month, year, cvv)
    message = str(info.value)
    digits = re.sub(r"\D", "", number)
    # Whatever was wrong, the message never repeats the number (or a long run of it).
    if number.strip(" -"):
        assert number not in message
    if len(digits) >= 6:
        assert digits not in re.sub(r"\D", "", message)
    if cvv:
        assert f" {cvv}" not in message
    return message


@pytest.mark.parametrize(
    "number",
    ["4242424242424242", "4000056655665556", "5555555555554444", "2223003122003222", "378282246310005",
     "6011111111111117", "3056930009020004", "79927398713", "4111111111111111"],
)
def test_luhn_accepts_valid_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize("number", ["4242424242424241", "5555555555554440", "79927398710", "", "42a2", "٤٢٤٢"])
def test_luhn_rejects_invalid_numbers(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4242424242424242", "visa"),
        ("5105105105105100", "mastercard"),
        ("5555555555554444", "mastercard"),
        ("2221000000000009", "mastercard"),
        ("2720990000000007", "mastercard"),
        ("378282246310005", "amex"),
        ("371449635398431", "amex"),
        ("6011111111111117", "discover"),
        ("6500000000000002", "discover"),
        ("6445644564456445", "discover"),
        ("6491000000000000", "discover"),
        ("3056930009020004", "unknown"),
        ("2220990000000000", "unknown"),
        ("2721000000000000", "unknown"),
        ("5000000000000000", "unknown"),
        ("6430000000000000", "unknown"),
    ],
)
def test_brand_by_iin(number: str, brand: str) -> None:
    assert brand_of(number) == brand


def test_a_valid_card_is_normalized_and_never_shown() -> None:
    card = check("4242 4242-4242 4242", 1, 2027, "123")
    assert (card.number, card.brand, card.last4, card.exp_month, card.exp_year) == (
        "4242424242424242", "visa", "4242", 1, 2027
    )
    assert "4242424242424242" not in repr(card) and "4242424242424242" not in str(card)
    amex = check("3782 822463 10005", cvv="1234")
    assert (amex.brand, amex.last4) == ("amex", "0005")


def test_the_current_month_is_not_expired() -> None:
    assert check("4242424242424242", 11, 2026).exp_month == 11


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ("4242424242424241", "card number fails the Luhn check"),
        ("42424242424", "card number must be 12 to 19 digits"),
        ("42424242424242424242", "card number must be 12 to 19 digits"),
        ("4242-4242-4242-424x", "card number may contain only digits, spaces and dashes"),
        ("4242.4242.4242.4242", "card number may contain only digits, spaces and dashes"),
        ("٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢", "card number may contain only digits, spaces and dashes"),
        ("", "card number is required"),
        (" - ", "card number is required"),
        ("4" * 65, "card number is longer than 64 characters"),
        ("4242 " * 13, "card number is longer than 64 characters"),
        ("378282246310005" + "4", "card number fails the Luhn check"),
        ("3782822463100", "card number fails the Luhn check"),
    ],
)
def test_bad_numbers_are_refused_without_echo(number: str, message: str) -> None:
    assert refused(number) == message


def test_an_amex_number_must_have_15_digits() -> None:
    # 16 digits, Luhn-valid, amex IIN.
    number = "3700000000000007"
    assert luhn_valid(number)
    assert refused(number, cvv="1234") == "an amex card number has 15 digits"


@pytest.mark.parametrize(
    ("month", "year", "message"),
    [
        (0, 2030, "exp_month must be 1 to 12, got 0"),
        (13, 2030, "exp_month must be 1 to 12, got 13"),
        (10, 2026, "card expired at the end of 2026-10"),
        (12, 2025, "card expired at the end of 2025-12"),
        (1, 30, "exp_year must have four digits, got 30"),
        (1, 2047, "exp_year 2047 is more than 20 years ahead"),
    ],
)
def test_expiry_is_checked(month: int, year: int, message: str) -> None:
    assert refused("4242424242424242", month, year) == message


@pytest.mark.parametrize(
    ("number", "cvv", "message"),
    [
        ("4242424242424242", "", "cvv is required"),
        ("4242424242424242", "12", "cvv must be 3 digits"),
        ("4242424242424242", "1234", "cvv must be 3 digits"),
        ("4242424242424242", "12a", "cvv must be 3 digits"),
        ("378282246310005", "123", "cvv must be 4 digits for an amex card"),
        ("378282246310005", "9" * 65, "cvv is longer than 64 characters"),
    ],
)
def test_cvv_is_checked(number: str, cvv: str, message: str) -> None:
    assert refused(number, cvv=cvv) == message


def test_tokens_are_random_hex_and_never_luhn_numbers() -> None:
    tokens = {new_token() for _ in range(500)}
    assert len(tokens) == 500
    for token in tokens:
        assert re.fullmatch(r"tok_[0-9a-f]{32}", token)
        assert not looks_like_luhn_number(token)


def test_a_token_whose_digits_form_a_luhn_number_is_redrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 digits (a Luhn-valid visa number) spread among 16 letters: digits alone = a card number.
    unlucky = "4a2b4c2d4e2f4a2b4c2d4e2f4a2b4c2d"
    assert looks_like_luhn_number(unlucky) and "".join(c for c in unlucky if c.isdigit()) == "4242424242424242"
    fine = "0123456789abcdef0123456789abcdef"
    draws = iter([unlucky, unlucky, fine])
    monkeypatch.setattr(cards.secrets, "token_hex", lambda nbytes: next(draws))
    assert new_token() == "tok_" + fine


def test_looks_like_luhn_number_counts_only_12_to_19_digits() -> None:
    assert looks_like_luhn_number("tok_4242424242424242")
    assert not looks_like_luhn_number("tok_4242424242424241")
    assert not looks_like_luhn_number("tok_79927398713")  # Luhn-valid but 11 digits
    assert not looks_like_luhn_number("tok_" + "0" * 32)  # 32 digits


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("order for 4242424242424242", True),
        ("card 4242 4242 4242 4242 thanks", True),
        ("4242-4242-4242-4242", True),
        ("card 4242424242424241", False),
        ("ShopMesh order ord_424242424242424242424242", False),
        ("order:ord_4242424242424242aaaaaaaa", False),
        ("invoice 12345", False),
    ],
)
def test_contains_card_number(text: str, found: bool) -> None:
    assert contains_card_number(text) is found
