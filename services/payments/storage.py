"""Payments storage: cards (ciphertext only), charges and refunds in SQLite.

What is stored in clear is what PCI DSS allows to be shown: brand, last four
digits, expiry. The card number exists only as an AWS Encryption SDK message
(`cards.ciphertext`) and as a keyed fingerprint (`cards.fingerprint`, an
HMAC-SHA-256 under a key that is itself stored wrapped, in `wrapped_keys`);
the CVV is never stored.

Idempotency is enforced by the database, not by the code in front of it:
`charges.idempotency_key` and `refunds.idempotency_key` are UNIQUE, and a
refund's checks and writes run in one IMMEDIATE transaction, so two refunds
can never both spend the same balance. A charge is written in two steps
around the call to the card processor: first an intent
(`charge_intents`, keyed by the idempotency key, holding the charge id and
the request), then, in one transaction, the final charge replaces the
intent. An intent left behind by a crash is resumed by the next request with
the same key: the processor deduplicates on the same key, so the card is
authorized once, and the charge keeps the id the intent gave it.

`rewrap_runs` records the progress of `shopmesh payments rewrap`, so an
interrupted run resumes where it stopped.

The servicer calls every method from worker threads (asyncio.to_thread), and
SQLite connections are not shared across threads: each thread keeps its own
connection, reused from call to call, and writers of this process queue for
the write lock in turn (connections.ThreadConnections). WAL mode lets readers
proceed while a writer commits.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from services.payments.connections import ThreadConnections
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
    key_provider TEXT NOT NULL,        -- the wrapping key that sealed it ("local:…", "aws-kms:arn…")
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    fingerprint TEXT                   -- HMAC-SHA-256 of the number (fingerprint.py): same card, same token
);
CREATE TABLE IF NOT EXISTS charge_intents (
    idempotency_key TEXT PRIMARY KEY,
    charge_id TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL REFERENCES cards (token),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS wrapped_keys (
    name TEXT PRIMARY KEY,
    ciphertext BLOB NOT NULL,          -- AWS Encryption SDK message holding the key
    key_provider TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS rewrap_runs (
    run_id TEXT PRIMARY KEY,
    target_key TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    last_token TEXT NOT NULL DEFAULT '',
    started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at TEXT
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
class ChargeIntent:
    """A charge being made: stored before the processor is called."""

    charge_id: str
    idempotency_key: str
    token: str
    amount_minor: int
    currency: str
    description: str
    created_at: str = ""


@dataclass(frozen=True)
class RewrapRun:
    run_id: str
    target_key: str
    total: int
    done: int
    last_token: str
    finished_at: str | None = None


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
_INTENT_COLUMNS = "charge_id, idempotency_key, token, amount_minor, currency, description, created_at"
_CARD_COLUMNS = "token, brand, last4, exp_month, exp_year, ciphertext, key_provider"


def _charge(row: sqlite3.Row) -> ChargeRecord:
    return ChargeRecord(**{key: row[key] for key in row.keys()})


def _refund(row: sqlite3.Row) -> RefundRecord:
    return RefundRecord(**{key: row[key] for key in row.keys()})


def _intent(row: sqlite3.Row) -> ChargeIntent:
    return ChargeIntent(**{key: row[key] for key in row.keys()})


def _stored_card(row: sqlite3.Row) -> StoredCard:
    card = CardOnFile(
        token=row["token"],
        brand=row["brand"],
        last4=row["last4"],
        exp_month=row["exp_month"],
        exp_year=row["exp_year"],
    )
    return StoredCard(card=card, ciphertext=bytes(row["ciphertext"]), key_provider=row["key_provider"])


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an earlier version up to this schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(cards)")}
    if "fingerprint" not in columns:
        conn.execute("ALTER TABLE cards ADD COLUMN fingerprint TEXT")
    # NULLs (cards stored before fingerprints existed) do not collide.
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS cards_fingerprint ON cards (fingerprint)")


def _setup_connection(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")


class PaymentsStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = ThreadConnections(path, timeout=BUSY_TIMEOUT_SECONDS, setup=_setup_connection)
        with self._connect() as conn:
            # WAL is persistent in the file: set once, applies to every later connection.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            _migrate(conn)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> PaymentsStore:
        return cls(data_dir / DB_NAME)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        """This thread's connection, for reads (autocommit, no implicit transactions)."""
        return self._db.connection()

    # --- cards ---------------------------------------------------------------

    def insert_card(
        self, card: CardOnFile, ciphertext: bytes, key_provider: str, fingerprint: str | None = None
    ) -> tuple[StoredCard, bool]:
        """Store a card unless one with the same fingerprint exists.

        Returns the stored card for that fingerprint and whether it is ours
        (False: the same card was tokenized first, maybe concurrently; its
        token wins, and the expiry just given replaces the stored one).
        """
        with self._db.write() as conn:
            cursor = conn.execute(
                "INSERT INTO cards (token, brand, last4, exp_month, exp_year, ciphertext, key_provider, fingerprint) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
                (card.token, card.brand, card.last4, card.exp_month, card.exp_year, ciphertext, key_provider, fingerprint),
            )
            if cursor.rowcount == 1:
                row = conn.execute(f"SELECT {_CARD_COLUMNS} FROM cards WHERE token = ?", (card.token,)).fetchone()
                return _stored_card(row), True
            conn.execute(
                "UPDATE cards SET exp_month = ?, exp_year = ? WHERE fingerprint = ?",
                (card.exp_month, card.exp_year, fingerprint),
            )
            row = conn.execute(f"SELECT {_CARD_COLUMNS} FROM cards WHERE fingerprint = ?", (fingerprint,)).fetchone()
            return _stored_card(row), False

    def card_by_fingerprint(self, fingerprint: str) -> StoredCard | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_CARD_COLUMNS} FROM cards WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return None if row is None else _stored_card(row)

    def update_expiry(self, token: str, exp_month: int, exp_year: int) -> None:
        with self._db.autocommit_write() as conn:
            conn.execute("UPDATE cards SET exp_month = ?, exp_year = ? WHERE token = ?", (exp_month, exp_year, token))

    def get_card(self, token: str) -> StoredCard | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_CARD_COLUMNS} FROM cards WHERE token = ?", (token,)).fetchone()
        return None if row is None else _stored_card(row)

    def count_cards(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT count(*) FROM cards").fetchone()[0])

    def cards_after(self, token: str, limit: int) -> list[tuple[StoredCard, str | None]]:
        """Cards in token order after `token`, with their fingerprints (for rewrap)."""
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {_CARD_COLUMNS}, fingerprint FROM cards WHERE token > ? ORDER BY token LIMIT ?", (token, limit)
            ).fetchall()
        return [(_stored_card(row), row["fingerprint"]) for row in rows]

    # --- wrapped keys ----------------------------------------------------------

    def get_wrapped_key(self, name: str) -> tuple[bytes, str] | None:
        with self._connect() as conn:
            row = conn.execute("SELECT ciphertext, key_provider FROM wrapped_keys WHERE name = ?", (name,)).fetchone()
        return None if row is None else (bytes(row["ciphertext"]), row["key_provider"])

    def insert_wrapped_key(self, name: str, ciphertext: bytes, key_provider: str) -> bytes:
        """Store a wrapped key unless `name` exists; return the stored ciphertext (the first writer's)."""
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO wrapped_keys (name, ciphertext, key_provider) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, ciphertext, key_provider),
            )
            row = conn.execute("SELECT ciphertext FROM wrapped_keys WHERE name = ?", (name,)).fetchone()
        return bytes(row["ciphertext"])

    def wrapped_key_names(self) -> list[str]:
        with self._connect() as conn:
            return [row[0] for row in conn.execute("SELECT name FROM wrapped_keys ORDER BY name")]

    def replace_wrapped_key(self, name: str, old: bytes, new: bytes, key_provider: str) -> bool:
        """Swap a wrapped key's ciphertext if it is still `old`; False if someone changed it meanwhile."""
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE wrapped_keys SET ciphertext = ?, key_provider = ? WHERE name = ? AND ciphertext = ?",
                (new, key_provider, name, old),
            )
            return cursor.rowcount == 1

    # --- rewrap progress ---------------------------------------------------------

    def open_rewrap_run(self, run_id: str, target_key: str) -> tuple[RewrapRun, bool]:
        """The unfinished run for `target_key` (resumed: False), or a new one (True).

        An unfinished run for another key is closed: its records get the new
        key in the new run anyway.
        """
        with self._db.write() as conn:
            conn.execute(
                "UPDATE rewrap_runs SET finished_at = 'abandoned' WHERE finished_at IS NULL AND target_key != ?",
                (target_key,),
            )
            row = conn.execute(
                "SELECT run_id, target_key, total, done, last_token, finished_at FROM rewrap_runs "
                "WHERE finished_at IS NULL AND target_key = ? ORDER BY started_at DESC LIMIT 1",
                (target_key,),
            ).fetchone()
            if row is not None:
                return RewrapRun(**{key: row[key] for key in row.keys()}), False
            total = int(conn.execute("SELECT count(*) FROM cards").fetchone()[0])
            conn.execute("INSERT INTO rewrap_runs (run_id, target_key, total) VALUES (?, ?, ?)", (run_id, target_key, total))
            return RewrapRun(run_id=run_id, target_key=target_key, total=total, done=0, last_token=""), True

    def rewrap_card(
        self, run_id: str, token: str, old: bytes, new: bytes, key_provider: str, fingerprint: str | None
    ) -> bool:
        """Swap one card's ciphertext (if unchanged since it was read) and advance the run, atomically.

        False if the card changed meanwhile: the run does not advance past
        it, and the caller reads it again. A fingerprint is filled in only
        where none was stored (cards from before fingerprints existed).
        """
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE cards SET ciphertext = ?, key_provider = ?, fingerprint = coalesce(fingerprint, ?) "
                "WHERE token = ? AND ciphertext = ?",
                (new, key_provider, fingerprint, token, old),
            )
            if cursor.rowcount != 1:
                return False
            conn.execute(
                "UPDATE rewrap_runs SET done = done + 1, last_token = ? WHERE run_id = ?", (token, run_id)
            )
            return True

    def skip_rewrap_card(self, run_id: str, token: str) -> None:
        """Advance the run past a card that no longer exists."""
        with self._db.autocommit_write() as conn:
            conn.execute("UPDATE rewrap_runs SET last_token = ? WHERE run_id = ?", (token, run_id))

    def finish_rewrap_run(self, run_id: str) -> None:
        with self._db.autocommit_write() as conn:
            conn.execute(
                "UPDATE rewrap_runs SET finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE run_id = ?", (run_id,)
            )

    def key_providers_in_use(self) -> dict[str, int]:
        """How many cards each wrapping key sealed."""
        with self._connect() as conn:
            rows = conn.execute("SELECT key_provider, count(*) FROM cards GROUP BY key_provider ORDER BY key_provider")
            return {row[0]: int(row[1]) for row in rows}

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

    def begin_charge(self, intent: ChargeIntent) -> ChargeRecord | ChargeIntent:
        """Claim the idempotency key for a charge, in one IMMEDIATE transaction.

        Returns the final charge if the key already has one; else the intent
        already stored for the key (an attempt that has not finished: a
        crashed process, or a concurrent request in another one); else
        `intent`, now stored.
        """
        with self._db.write() as conn:
            row = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE idempotency_key = ?", (intent.idempotency_key,)
            ).fetchone()
            if row is not None:
                return _charge(row)
            row = conn.execute(
                f"SELECT {_INTENT_COLUMNS} FROM charge_intents WHERE idempotency_key = ?", (intent.idempotency_key,)
            ).fetchone()
            if row is not None:
                return _intent(row)
            conn.execute(
                "INSERT INTO charge_intents (charge_id, idempotency_key, token, amount_minor, currency, description) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (intent.charge_id, intent.idempotency_key, intent.token, intent.amount_minor, intent.currency, intent.description),
            )
            return intent

    def finish_charge(self, record: ChargeRecord) -> ChargeRecord:
        """Store the final charge and drop its intent, atomically; returns the charge stored for the key.

        If another process finished the same key first, its row is the
        charge (the processor answered both with the same authorization).
        """
        with self._db.write() as conn:
            conn.execute(
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
            conn.execute("DELETE FROM charge_intents WHERE idempotency_key = ?", (record.idempotency_key,))
            row = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges WHERE idempotency_key = ?", (record.idempotency_key,)
            ).fetchone()
        return _charge(row)

    def abandon_charge(self, intent: ChargeIntent) -> None:
        """Drop an intent whose charge certainly did not reach the processor."""
        with self._db.autocommit_write() as conn:
            conn.execute(
                "DELETE FROM charge_intents WHERE idempotency_key = ? AND charge_id = ?",
                (intent.idempotency_key, intent.charge_id),
            )

    def count_intents(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT count(*) FROM charge_intents").fetchone()[0])

    def count_charges(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT count(*) FROM charges").fetchone()[0])

    # --- refunds -------------------------------------------------------------

    def refund(self, refund_id: str, charge_id: str, amount_minor: int, idempotency_key: str) -> tuple[RefundRecord, ChargeRecord]:
        """Refund part or all of a charge, idempotently; RefundRefused says why not.

        Returns the refund (the earlier one for a repeated key) and the charge
        as it stands now.
        """
        with self._db.write() as conn:
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
