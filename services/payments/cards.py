"""Card validation and token minting.

Rule for this module: no message, repr or log line ever contains the card
number or the CVV. Errors say what is wrong ("card number fails the Luhn
check"), never what was sent; the number lives only in local variables and
in the `Card.number` field, which is left out of the dataclass repr.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass, field

MIN_DIGITS = 12
MAX_DIGITS = 19
# Longer inputs are refused before any parsing: nothing legitimate is longer.
MAX_INPUT_CHARS = 64
# Expiry dates further out than this are typos, not cards.
MAX_YEARS_AHEAD = 20
TOKEN_PREFIX = "tok_"
TOKEN_PATTERN = re.compile(r"^tok_[0-9a-f]{32}$")

_SEPARATORS = re.compile(r"[ \-]")
# A card number written inside free text: 12..19 digits, optionally grouped
# with single spaces or dashes, not glued to other letters or digits.
_EMBEDDED_NUMBER = re.compile(r"(?<![0-9A-Za-z])\d(?:[ \-]?\d){11,18}(?![0-9A-Za-z])")


class CardError(ValueError):
    """A card field is invalid. The message never contains the number or CVV."""


@dataclass(frozen=True)
class Card:
    """A validated card. `number` is digits only and never shown in repr."""

    number: str = field(repr=False)
    brand: str
    last4: str
    exp_month: int
    exp_year: int


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check over a string of ASCII digits."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def brand_of(digits: str) -> str:
    """Card brand by issuer identification number (IIN) prefix."""
    if digits.startswith("4"):
        return "visa"
    if digits[:2] in ("34", "37"):
        return "amex"
    two, four = int(digits[:2] or 0), int(digits[:4] or 0)
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return "mastercard"
    if digits.startswith("6011") or digits.startswith("65") or 644 <= int(digits[:3] or 0) <= 649:
        return "discover"
    return "unknown"


def normalize_number(raw: str) -> str:
    """Digits only, after removing spaces and dashes; CardError otherwise."""
    if len(raw) > MAX_INPUT_CHARS:
        raise CardError(f"card number is longer than {MAX_INPUT_CHARS} characters")
    digits = _SEPARATORS.sub("", raw)
    if not digits:
        raise CardError("card number is required")
    # isdecimal() alone would accept other scripts' digits ('٣'); a PAN is ASCII.
    if not (digits.isascii() and digits.isdigit()):
        raise CardError("card number may contain only digits, spaces and dashes")
    return digits


def validate_card(number: str, exp_month: int, exp_year: int, cvv: str, *, today: dt.date | None = None) -> Card:
    """Check a card as entered; return it normalized or raise CardError."""
    digits = normalize_number(number)
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS:
        raise CardError(f"card number must be {MIN_DIGITS} to {MAX_DIGITS} digits")
    if not luhn_valid(digits):
        raise CardError("card number fails the Luhn check")
    brand = brand_of(digits)
    if brand == "amex" and len(digits) != 15:
        raise CardError("an amex card number has 15 digits")

    if not 1 <= exp_month <= 12:
        raise CardError(f"exp_month must be 1 to 12, got {exp_month}")
    if not 1000 <= exp_year <= 9999:
        raise CardError(f"exp_year must have four digits, got {exp_year}")
    now = today or dt.datetime.now(dt.timezone.utc).date()
    # A card is valid through the last day of its expiry month.
    if (exp_year, exp_month) < (now.year, now.month):
        raise CardError(f"card expired at the end of {exp_year:04d}-{exp_month:02d}")
    if exp_year > now.year + MAX_YEARS_AHEAD:
        raise CardError(f"exp_year {exp_year} is more than {MAX_YEARS_AHEAD} years ahead")

    cvv_digits = 4 if brand == "amex" else 3
    if len(cvv) > MAX_INPUT_CHARS:
        raise CardError(f"cvv is longer than {MAX_INPUT_CHARS} characters")
    if not cvv:
        raise CardError("cvv is required")
    if len(cvv) != cvv_digits or not (cvv.isascii() and cvv.isdigit()):
        raise CardError("cvv must be 4 digits for an amex card" if brand == "amex" else "cvv must be 3 digits")
    return Card(number=digits, brand=brand, last4=digits[-4:], exp_month=exp_month, exp_year=exp_year)


def looks_like_luhn_number(text: str) -> bool:
    """True if the digits of `text`, taken alone, form a Luhn-valid 12..19-digit number."""
    digits = "".join(ch for ch in text if "0" <= ch <= "9")
    return MIN_DIGITS <= len(digits) <= MAX_DIGITS and luhn_valid(digits)


def contains_card_number(text: str) -> bool:
    """True if free text holds something that looks like a card number.

    Used to keep card numbers out of fields stored in clear (a charge's
    description): a Luhn-valid run of 12..19 digits, grouped or not.
    """
    for match in _EMBEDDED_NUMBER.finditer(text):
        if luhn_valid(_SEPARATORS.sub("", match.group())):
            return True
    return False


def new_token() -> str:
    """A random card token: "tok_" + 128 random bits in hex.

    Random, never derived from the card, so the token says nothing about the
    number. It is also never mistakable for a card number: if its digits
    alone would pass as one (astronomically unlikely), draw again, so that no
    PAN scanner (or person) mistakes a token for a card.
    """
    while True:
        token = TOKEN_PREFIX + secrets.token_hex(16)
        if not looks_like_luhn_number(token):
            return token
