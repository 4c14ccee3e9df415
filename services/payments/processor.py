"""Card processors: who actually moves the money.

Only a simulated processor exists: it approves everything except the classic
test cards that ask for a decline. It still does what a real integration
does with the card: decrypts it (through the `reveal` callable it is given,
the only place payments detokenizes) just before "sending" it, and keeps the
number in a local variable for the duration of the call.

Processors receive an idempotency key and deduplicate on it, as real ones do
(Stripe's Idempotency-Key, Adyen's idempotency-key header): a charge retried
after payments crashed between the authorization and storing its result is
answered with the first authorization instead of a second one. The simulated
processor keeps its side of that bargain in its own ledger
(`simulated-processor.db`), which stands for the processor's records: it
holds the token, amount and outcome of every authorization, never the card
number. Tests count authorizations there.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.payments.connections import ThreadConnections

LEDGER_NAME = "simulated-processor.db"


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


class ProcessorLedger:
    """The simulated processor's record of authorizations, one per idempotency key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One reused connection per thread, writers queued in turn (see connections.py).
        self._db = ThreadConnections(path, timeout=10.0)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS authorizations ("
                " idempotency_key TEXT PRIMARY KEY, token TEXT NOT NULL, amount_minor INTEGER NOT NULL,"
                " currency TEXT NOT NULL, approved INTEGER NOT NULL, decline_reason TEXT NOT NULL,"
                " created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
            )

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.connection()

    def find(self, idempotency_key: str) -> Authorization | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT approved, decline_reason FROM authorizations WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
        return None if row is None else Authorization(approved=bool(row[0]), decline_reason=row[1])

    def record(self, idempotency_key: str, card: CardOnFile, amount_minor: int, currency: str, result: Authorization) -> Authorization:
        """Store `result` unless the key has one; return the stored one (the first writer's)."""
        with self._db.autocommit_write() as conn:
            conn.execute(
                "INSERT INTO authorizations (idempotency_key, token, amount_minor, currency, approved, decline_reason) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (idempotency_key, card.token, amount_minor, currency, int(result.approved), result.decline_reason),
            )
        stored = self.find(idempotency_key)
        assert stored is not None
        return stored

    def count(self, idempotency_key: str | None = None) -> int:
        with self._connect() as conn:
            if idempotency_key is None:
                return int(conn.execute("SELECT count(*) FROM authorizations").fetchone()[0])
            return int(
                conn.execute("SELECT count(*) FROM authorizations WHERE idempotency_key = ?", (idempotency_key,)).fetchone()[0]
            )


class SimulatedCardProcessor:
    """Approves every charge except for the well-known decline test numbers."""

    name = "simulated"
    # The test numbers card networks and processors document for declines.
    DECLINES = {
        "4000000000000002": "card_declined",
        "4000000000009995": "insufficient_funds",
    }

    def __init__(
        self,
        reveal: Callable[[str], str],
        today: Callable[[], dt.date] | None = None,
        ledger: ProcessorLedger | None = None,
    ) -> None:
        self._reveal = reveal
        self._today = today or (lambda: dt.datetime.now(dt.timezone.utc).date())
        self.ledger = ledger
        # Without a ledger (unit tests of the decision rules), deduplicate in memory.
        self._memory: dict[str, Authorization] = {}
        self._memory_lock = threading.Lock()

    def authorize(self, card: CardOnFile, amount_minor: int, currency: str, idempotency_key: str) -> Authorization:
        earlier = self.ledger.find(idempotency_key) if self.ledger else self._memory.get(idempotency_key)
        if earlier is not None:
            return earlier
        result = self._decide(card)
        if self.ledger is not None:
            return self.ledger.record(idempotency_key, card, amount_minor, currency, result)
        with self._memory_lock:
            return self._memory.setdefault(idempotency_key, result)

    def _decide(self, card: CardOnFile) -> Authorization:
        now = self._today()
        # A card tokenized while valid can expire before it is charged.
        if (card.exp_year, card.exp_month) < (now.year, now.month):
            return Authorization(approved=False, decline_reason="expired_card")
        number = self._reveal(card.token)
        reason = self.DECLINES.get(number)
        if reason is not None:
            return Authorization(approved=False, decline_reason=reason)
        return Authorization(approved=True)
