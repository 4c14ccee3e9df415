"""Card processors: who actually moves the money.

Only a simulated processor exists: it approves everything except the classic
test cards that ask for a decline. It still does what a real integration
does with the card: decrypts it (through the `reveal` callable it is given,
the only place payments detokenizes) just before "sending" it, and keeps the
number in a local variable for the duration of the call.

Processors receive an idempotency key: a real processor deduplicates on it,
so a retried charge (after a crash between authorizing and storing the
result) is authorized once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Authorization:
    approved: bool
    decline_reason: str = ""  # machine-readable, e.g. "card_declined"


@dataclass(frozen=True)
class CardOnFile:
    """What payments stores in clear about a card: enough to route and display it."""

    token: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int


class CardProcessor(Protocol):
    @property
    def name(self) -> str: ...

    def authorize(self, card: CardOnFile, amount_minor: int, currency: str, idempotency_key: str) -> Authorization: ...


class SimulatedCardProcessor:
    """Approves every charge except for the well-known decline test numbers."""

    name = "simulated"
    # The test numbers card networks and processors document for declines.
    DECLINES = {
        "4000000000000002": "card_declined",
        "4000000000009995": "insufficient_funds",
    }

    def __init__(self, reveal: Callable[[str], str], today: Callable[[], dt.date] | None = None) -> None:
        self._reveal = reveal
        self._today = today or (lambda: dt.datetime.now(dt.timezone.utc).date())

    def authorize(self, card: CardOnFile, amount_minor: int, currency: str, idempotency_key: str) -> Authorization:
        now = self._today()
        # A card tokenized while valid can expire before it is charged.
        if (card.exp_year, card.exp_month) < (now.year, now.month):
            return Authorization(approved=False, decline_reason="expired_card")
        number = self._reveal(card.token)
        reason = self.DECLINES.get(number)
        if reason is not None:
            return Authorization(approved=False, decline_reason=reason)
        return Authorization(approved=True)
