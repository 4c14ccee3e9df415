"""Orders storage in SQLite: orders with an explicit state, and their line items.

An order is written once as PENDING (before payment is attempted) and then
settled exactly once, PENDING → PAID or PENDING → PAYMENT_FAILED; the
settling UPDATE only touches PENDING rows, so a late or repeated settlement
cannot overwrite a final state. `idempotency_key` is UNIQUE: of two
concurrent PlaceOrder calls with the same key, one inserts and the other
reads that row.

The store runs on the event loop thread with one connection: every call is
one or two statements on a local file, and keeping them on one thread means
no coroutine interleaves inside a transaction.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "orders.db"

PENDING = "PENDING"
PAID = "PAID"
PAYMENT_FAILED = "PAYMENT_FAILED"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, for newest-first listing
    order_id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    request_fingerprint TEXT NOT NULL,      -- sha256 of the request, to spot a key reused for another order
    state TEXT NOT NULL CHECK (state IN ('PENDING', 'PAID', 'PAYMENT_FAILED')),
    payment_token TEXT NOT NULL,
    total_minor INTEGER NOT NULL CHECK (total_minor > 0),
    currency TEXT NOT NULL,
    charge_id TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    card TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS order_items (
    order_id TEXT NOT NULL REFERENCES orders (order_id),
    position INTEGER NOT NULL,
    product_id TEXT NOT NULL,
    name TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 100),
    unit_price_minor INTEGER NOT NULL CHECK (unit_price_minor >= 0),
    PRIMARY KEY (order_id, position)
);
"""


def utc_now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class OrderItem:
    product_id: str
    name: str
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True)
class OrderRecord:
    order_id: str
    idempotency_key: str
    request_fingerprint: str
    state: str
    payment_token: str
    total_minor: int
    currency: str
    items: list[OrderItem] = field(default_factory=list)
    charge_id: str = ""
    failure_reason: str = ""
    card: str = ""
    created_at: str = ""
    seq: int = 0


class OrdersStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.executescript(_SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> OrdersStore:
        return cls(data_dir / DB_NAME)

    def close(self) -> None:
        self._conn.close()

    def _items(self, order_id: str) -> list[OrderItem]:
        rows = self._conn.execute(
            "SELECT product_id, name, quantity, unit_price_minor FROM order_items WHERE order_id = ? ORDER BY position",
            (order_id,),
        ).fetchall()
        return [OrderItem(r["product_id"], r["name"], r["quantity"], r["unit_price_minor"]) for r in rows]

    def _record(self, row: sqlite3.Row) -> OrderRecord:
        return OrderRecord(
            order_id=row["order_id"],
            idempotency_key=row["idempotency_key"],
            request_fingerprint=row["request_fingerprint"],
            state=row["state"],
            payment_token=row["payment_token"],
            total_minor=row["total_minor"],
            currency=row["currency"],
            items=self._items(row["order_id"]),
            charge_id=row["charge_id"],
            failure_reason=row["failure_reason"],
            card=row["card"],
            created_at=row["created_at"],
            seq=row["seq"],
        )

    def _one(self, where: str, value: str) -> OrderRecord | None:
        row = self._conn.execute(f"SELECT * FROM orders WHERE {where} = ?", (value,)).fetchone()
        return None if row is None else self._record(row)

    def get(self, order_id: str) -> OrderRecord | None:
        return self._one("order_id", order_id)

    def by_idempotency_key(self, key: str) -> OrderRecord | None:
        return self._one("idempotency_key", key)

    def insert_pending(self, order: OrderRecord) -> tuple[OrderRecord, bool]:
        """Store a new PENDING order with its items, unless its idempotency key is taken.

        Returns the stored order for the key and whether this call created it.
        """
        now = utc_now_rfc3339()
        self._conn.execute("BEGIN IMMEDIATE")
        committed = False
        try:
            cursor = self._conn.execute(
                "INSERT INTO orders (order_id, idempotency_key, request_fingerprint, state, payment_token, "
                "total_minor, currency, created_at, updated_at) VALUES (?, ?, ?, 'PENDING', ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    order.order_id,
                    order.idempotency_key,
                    order.request_fingerprint,
                    order.payment_token,
                    order.total_minor,
                    order.currency,
                    now,
                    now,
                ),
            )
            created = cursor.rowcount == 1
            if created:
                self._conn.executemany(
                    "INSERT INTO order_items (order_id, position, product_id, name, quantity, unit_price_minor) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (order.order_id, position, i.product_id, i.name, i.quantity, i.unit_price_minor)
                        for position, i in enumerate(order.items)
                    ],
                )
            self._conn.execute("COMMIT")
            committed = True
        finally:
            if not committed:
                self._conn.execute("ROLLBACK")
        stored = self.by_idempotency_key(order.idempotency_key)
        assert stored is not None  # inserted above, or already there
        return stored, created

    def settle(self, order_id: str, state: str, *, charge_id: str = "", failure_reason: str = "", card: str = "") -> OrderRecord:
        """Move a PENDING order to its final state (no-op if it already has one); return it."""
        if state not in (PAID, PAYMENT_FAILED):
            raise ValueError(f"cannot settle an order as {state!r}")
        self._conn.execute(
            "UPDATE orders SET state = ?, charge_id = ?, failure_reason = ?, card = ?, updated_at = ? "
            "WHERE order_id = ? AND state = 'PENDING'",
            (state, charge_id, failure_reason, card, utc_now_rfc3339(), order_id),
        )
        settled = self.get(order_id)
        assert settled is not None
        return settled

    def list_newest_first(self, limit: int, *, before_seq: int | None = None) -> list[OrderRecord]:
        if before_seq is None:
            rows = self._conn.execute("SELECT * FROM orders ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        else:
            rows = self._conn.execute(
                "SELECT * FROM orders WHERE seq < ? ORDER BY seq DESC LIMIT ?", (before_seq, limit)
            ).fetchall()
        return [self._record(r) for r in rows]

    def count(self, *, states: Sequence[str] = (PENDING, PAID, PAYMENT_FAILED)) -> int:
        placeholders = ", ".join("?" for _ in states)
        row = self._conn.execute(f"SELECT count(*) FROM orders WHERE state IN ({placeholders})", tuple(states)).fetchone()
        return int(row[0])
