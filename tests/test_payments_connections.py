"""Payments' SQLite connections: reused per thread, never handed on with a transaction open.

The reuse is a performance fix (docs/benchmarks.md, "Profiling"); these
tests pin what must not change with it: transactions stay atomic and
isolated per thread, and concurrent writers in one process neither lose
updates nor fail with "database is locked".
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.payments import connections
from services.payments.connections import ThreadConnections
from services.payments.processor import CardOnFile, ProcessorLedger, SimulatedCardProcessor
from services.payments.storage import ChargeIntent, PaymentsStore


def _counter_db(tmp_path: Path) -> ThreadConnections:
    db = ThreadConnections(tmp_path / "t.db", timeout=10.0)
    with db.connection() as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (0)")
    return db


def _count(db: ThreadConnections) -> int:
    with db.connection() as conn:
        return int(conn.execute("SELECT n FROM counter").fetchone()[0])


def test_a_thread_reuses_its_connection_and_threads_do_not_share(tmp_path: Path) -> None:
    db = _counter_db(tmp_path)
    with db.connection() as first:
        pass
    with db.connection() as second:
        assert second is first

    def connection_in_this_thread() -> sqlite3.Connection:
        with db.connection() as conn:
            return conn

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(connection_in_this_thread).result() is not first


def test_a_nested_use_gets_a_connection_of_its_own(tmp_path: Path) -> None:
    db = _counter_db(tmp_path)
    with db.connection() as outer, db.connection() as inner:
        assert inner is not outer


def test_a_transaction_left_open_by_an_error_is_rolled_back(tmp_path: Path) -> None:
    db = _counter_db(tmp_path)
    with pytest.raises(RuntimeError), db.connection() as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE counter SET n = 41")
        raise RuntimeError("between BEGIN and COMMIT")
    with db.connection() as conn:
        assert not conn.in_transaction
    assert _count(db) == 0


def test_write_commits_or_rolls_back_as_a_whole(tmp_path: Path) -> None:
    db = _counter_db(tmp_path)
    with db.write() as conn:
        conn.execute("UPDATE counter SET n = n + 1")
    with pytest.raises(ValueError), db.write() as conn:
        conn.execute("UPDATE counter SET n = n + 100")
        raise ValueError("refused half-way")
    assert _count(db) == 1


def test_concurrent_writers_lose_no_update_and_never_see_locked(tmp_path: Path) -> None:
    db = _counter_db(tmp_path)
    # A second instance on the same file stands for another process: it meets
    # the first one's writers in SQLite's busy handler, not on their lock.
    other_process = ThreadConnections(tmp_path / "t.db", timeout=10.0)
    errors: list[BaseException] = []

    def increment(store: ThreadConnections) -> None:
        for _ in range(25):
            try:
                with store.write() as conn:
                    n = conn.execute("SELECT n FROM counter").fetchone()[0]
                    conn.execute("UPDATE counter SET n = ?", (n + 1,))
            except sqlite3.Error as exc:
                errors.append(exc)

    threads = [threading.Thread(target=increment, args=(db if i % 3 else other_process,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert _count(db) == 8 * 25


def test_the_charge_path_opens_one_connection_per_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_connect = sqlite3.connect

    def counting_connect(path: object, *args: object, **kwargs: object) -> sqlite3.Connection:
        opened.append(Path(str(path)).name)
        return real_connect(path, *args, **kwargs)  # type: ignore[arg-type]

    store = PaymentsStore(tmp_path / "payments.db")
    ledger = ProcessorLedger(tmp_path / "ledger.db")
    card = CardOnFile(token="tok_" + "a" * 32, brand="visa", last4="4242", exp_month=12, exp_year=2031)
    store.insert_card(card, b"ciphertext", "local:test", "fingerprint")
    processor = SimulatedCardProcessor(lambda token: "4242424242424242", ledger=ledger)
    monkeypatch.setattr(connections.sqlite3, "connect", counting_connect)
    for n in range(20):
        intent = ChargeIntent(charge_id=f"ch_{n:024x}", idempotency_key=f"key{n}x", token=card.token,
                              amount_minor=100, currency="EUR", description="")
        assert store.begin_charge(intent) is intent
        assert processor.authorize(card, 100, "EUR", f"charge:key{n}x").approved
        assert store.get_card(card.token) is not None
    # Each store opened its connection for this thread when it was created.
    assert opened == []
    assert store.count_intents() == 20 and ledger.count() == 20
