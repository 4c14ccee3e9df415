"""SQLite connections for stores whose methods run on worker threads.

    db = ThreadConnections(path, setup=lambda conn: conn.execute("PRAGMA foreign_keys = ON"))
    with db.connection() as conn:          # reads, autocommit statements
        ...
    with db.write() as conn:               # one IMMEDIATE transaction
        ...

Why not a new connection per call: SQLite reads and parses the schema on
the first statement of every new connection, which cost more than the
statements themselves (about 0.25 ms against 0.005 ms for a primary-key
lookup on the benchmark machine), and a Charge opened seven (see
docs/benchmarks.md, "Profiling"). Each thread now keeps one connection per
database and reuses it; the servicer calls the stores through
asyncio.to_thread, whose worker threads live as long as the process.

- A connection never crosses threads (sqlite3's same-thread check stays on).
- It is handed back with no transaction open: one left open (by an error
  between BEGIN and COMMIT) is rolled back, and a connection that cannot be
  rolled back is closed and replaced.
- A nested use on the same thread (a method that calls another while it
  holds the connection) gets a connection of its own, so two transactions
  never share one by surprise.
- Writers of this process queue on a lock before BEGIN IMMEDIATE instead
  of meeting in SQLite's busy handler, which sleeps 1, 2, 5, 10 … ms between
  retries whether or not the lock was freed meanwhile. Other processes (a
  second payments instance, `shopmesh payments rewrap`) still meet in the
  busy handler, with the store's busy timeout, so cross-process safety is
  SQLite's, as before.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class ThreadConnections:
    def __init__(
        self,
        path: Path,
        *,
        timeout: float,
        setup: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        self.path = path
        self._timeout = timeout
        self._setup = setup
        self._local = threading.local()
        # Re-entrant: a nested write on the same thread fails in SQLite's busy
        # timeout, as it always did, instead of hanging on this lock.
        self._write_lock = threading.RLock()

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; write() begins them explicitly.
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        ready = False
        try:
            if self._setup is not None:
                self._setup(conn)
            ready = True
        finally:
            if not ready:
                conn.close()
        return conn

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, in autocommit mode, with no transaction open."""
        if getattr(self._local, "in_use", False):
            nested = self._open()
            try:
                yield nested
            finally:
                nested.close()
            return
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        self._local.in_use = True
        try:
            yield conn
        finally:
            self._local.in_use = False
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._local.conn = None
                    conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the write lock taken up front (BEGIN IMMEDIATE), committed
        on success, rolled back on any exception.

        IMMEDIATE (not DEFERRED) so that a transaction which reads and then
        writes cannot be overtaken between its read and its write.
        """
        with self._write_lock, self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                yield conn
                conn.execute("COMMIT")
                committed = True
            finally:
                if not committed:
                    conn.execute("ROLLBACK")

    @contextmanager
    def autocommit_write(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection for single-statement writes (each its own
        transaction), queued with the other writers of this process."""
        with self._write_lock, self.connection() as conn:
            yield conn
