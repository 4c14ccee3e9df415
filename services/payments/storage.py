"""Payments storage: cards (ciphertext only), charges and refunds in SQLite.

What is stored in clear is what PCI DSS allows to be shown: brand, last four
digits, expiry. The card number exists only as an AWS Encryption SDK message
(`cards.ciphertext`); the CVV is never stored.

Idempotency is enforced by the database, not by the code in front of it:
`charges.idempotency_key` and `refunds.idempotency_key` are UNIQUE, a charge
is inserted with ON CONFLICT DO NOTHING (the loser of a race reads the
winner's row), and a refund's checks and writes run in one IMMEDIATE
transaction, so two refunds can never both spend the same balance.

Every method opens its own connection: the servicer calls them from worker
threads (asyncio.to_thread), and SQLite connections are not shared across
threads. WAL mode lets readers proceed while a writer commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from services.payments.processor import CardOnFile

DB_NAME = "payments.db"
BUSY_TIMEOUT_SECONDS = 10.0

SUCCEEDED = "SUCCEEDED"
DECLINED = "DECLINED"
REFUNDED = "REFUNDED"
PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cards (
    token TEXT PRIMARY KEY,
    brand TEXT NOT NULL,
    last4 TEXT NOT NULL,
    exp_month INTEGER NOT NULL,
    exp_year INTEGER NOT NULL,
    ciphertext BLOB NOT NULL,          -- AWS Encryption SDK message; the only copy of the number
    key_provider TEXT NOT NULL,        -- which wrapping key sealed it (for rotation / KMS migration)
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS charges (
    charge_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL REFERENCES cards (token),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('SUCCEEDED', 'DECLINED', 'REFUNDED', 'PARTIALLY_REFUNDED')),
    decline_reason TEXT NOT NULL,
    refunded_minor INTEGER NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    brand TEXT NOT NULL,
    last4 TEXT NOT NULL,
    processor TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS refunds (
    refund_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    charge_id TEXT NOT NULL REFERENCES charges (charge_id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock up front.

    IMMEDIATE (not DEFERRED) so that a transaction which reads and then
    writes cannot be overtaken between its read and its write.
    """
    conn.execute("BEGIN IMMEDIATE")
    committed = False
    try:
        yield
        conn.execute("COMMIT")
        committed = True
    finally:
        if not committed:
            conn.execute("ROLLBACK")


class RefundRefused(Exception):
    """A refund cannot be made; `reason` says which rule refused it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "unknown_charge", "key_reused", "declined", "exceeds_balance"
        self.message = message


@dataclass(frozen=True)
class StoredCard:
    card: CardOnFile
    ciphertext: bytes = field(repr=False)
    key_provider: str = ""


@dataclass(frozen=True)
class ChargeRecord:
    charge_id: str
    idempotency_key: str
    token: str
    amount_minor: int
    currency: str
    description: str
    status: str
    decline_reason: str
    refunded_minor: int
    brand: str
    last4: str
    processor: str
    created_at: str = ""


@dataclass(frozen=True)
class RefundRecord:
    refund_id: str
    idempotency_key: str
    charge_id: str
    amount_minor: int
    created_at: str = ""


_CHARGE_COLUMNS = (
    "charge_id, idempotency_key, token, amount_minor, currency, description, status, "
    "decline_reason, refunded_minor, brand, last4, processor, created_at"
)
_REFUND_COLUMNS = "refund_id, idempotency_key, charge_id, amount_minor, created_at"


def _charge(row: sqlite3.Row) -> ChargeRecord:
    return ChargeRecord(**{key: row[key] for key in row.keys()})


def _refund(row: sqlite3.Row) -> RefundRecord:
    return RefundRecord(**{key: row[key] for key in row.keys()})


class PaymentsStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as conn:
            # WAL is persistent in the file: set once, applies to every later connection.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> PaymentsStore:
        return cls(data_dir / DB_NAME)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions; we BEGIN explicitly
        # where several statements must be atomic.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn
        finally:
            conn.close()

    # --- cards ---------------------------------------------------------------

    def insert_card(self, card: CardOnFile, ciphertext: bytes, key_provider: str) -> None:
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO cards (token, brand, last4, exp_month, exp_year, ciphertext, key_provider) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (card.token, card.brand, card.last4, card.exp_month, card.exp_year, ciphertext, key_provider),
            )

    def get_card(self, token: str) -> StoredCard | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT token, brand, last4, exp_month, exp_year, ciphertext, key_provider FROM cards WHERE token = ?",
                (token,),
            ).fetchone()
        if row is None:
            return None
        card = CardOnFile(
            token=row["token"],
            brand=row["brand"],
            last4=row["last4"],
            exp_month=row["exp_month"],
            exp_year=row["exp_year"],
        )
        return StoredCard(card=card, ciphertext=bytes(row["ciphertext"]), key_provider=row["key_provider"])

    # --- charges -------------------------------------------------------------

    def charge_by_key(self, idempotency_key: str) -> ChargeRecord | None:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
        return None if row is None else _charge(row)

    def get_charge(self, charge_id: str) -> ChargeRecord | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE charge_id = ?", (charge_id,)).fetchone()
        return None if row is None else _charge(row)

    def insert_charge(self, record: ChargeRecord) -> tuple[ChargeRecord, bool]:
        """Store a charge unless its idempotency key is taken.

        Returns the stored row for the key and whether it is ours (False: a
        concurrent request with the same key stored first; its row wins).
        """
        with self._connect() as conn, _immediate(conn):
            cursor = conn.execute(
                "INSERT INTO charges (charge_id, idempotency_key, token, amount_minor, currency, description, "
                "status, decline_reason, refunded_minor, brand, last4, processor) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    record.charge_id,
                    record.idempotency_key,
                    record.token,
                    record.amount_minor,
                    record.currency,
                    record.description,
                    record.status,
                    record.decline_reason,
                    record.brand,
                    record.last4,
                    record.processor,
                ),
            )
            created = cursor.rowcount == 1
            row = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE idempotency_key = ?", (record.idempotency_key,)
            ).fetchone()
        return _charge(row), created

    def count_charges(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT count(*) FROM charges").fetchone()[0])

    # --- refunds -------------------------------------------------------------

    def refund(self, refund_id: str, charge_id: str, amount_minor: int, idempotency_key: str) -> tuple[RefundRecord, ChargeRecord]:
        """Refund part or all of a charge, idempotently; RefundRefused says why not.

        Returns the refund (the earlier one for a repeated key) and the charge
        as it stands now.
        """
        with self._connect() as conn, _immediate(conn):
            return self._refund_in_transaction(conn, refund_id, charge_id, amount_minor, idempotency_key)

    @staticmethod
    def _refund_in_transaction(
        conn: sqlite3.Connection, refund_id: str, charge_id: str, amount_minor: int, idempotency_key: str
    ) -> tuple[RefundRecord, ChargeRecord]:
        def load_charge() -> ChargeRecord | None:
            row = conn.execute(f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE charge_id = ?", (charge_id,)).fetchone()
            return None if row is None else _charge(row)

        earlier = conn.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        if earlier is not None:
            previous = _refund(earlier)
            if previous.charge_id != charge_id or previous.amount_minor != amount_minor:
                raise RefundRefused(
                    "key_reused",
                    f"idempotency_key '{idempotency_key}' was already used for a refund of "
                    f"{previous.amount_minor} on {previous.charge_id}; use a new key for a different refund",
                )
            current = load_charge()
            assert current is not None  # a refund row references an existing charge (foreign key)
            return previous, current

        charge = load_charge()
        if charge is None:
            raise RefundRefused("unknown_charge", f"unknown charge id '{charge_id}'")
        if charge.status == DECLINED:
            raise RefundRefused("declined", f"charge {charge_id} was declined; there is nothing to refund")
        left = charge.amount_minor - charge.refunded_minor
        if amount_minor > left:
            raise RefundRefused(
                "exceeds_balance",
                f"refund of {amount_minor} exceeds the {left} {charge.currency} left to refund on {charge_id}",
            )
        refunded = charge.refunded_minor + amount_minor
        status = REFUNDED if refunded == charge.amount_minor else PARTIALLY_REFUNDED
        conn.execute(
            "INSERT INTO refunds (refund_id, idempotency_key, charge_id, amount_minor) VALUES (?, ?, ?, ?)",
            (refund_id, idempotency_key, charge_id, amount_minor),
        )
        conn.execute(
            "UPDATE charges SET refunded_minor = ?, status = ? WHERE charge_id = ?", (refunded, status, charge_id)
        )
        row = conn.execute(f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE refund_id = ?", (refund_id,)).fetchone()
        updated = load_charge()
        assert updated is not None
        return _refund(row), updated
