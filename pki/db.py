"""The CA's SQLite database, <state>/ca/ca.db: join tokens and the issuance ledger.

Several processes open it at once (the CA server redeems tokens while the
runner or `python -m pki.tokens` creates them), so every connection uses WAL
and a busy timeout, and every write is one short transaction.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    token_sha256 TEXT PRIMARY KEY,   -- hex SHA-256 of the token; the token itself is never stored
    spiffe_id    TEXT NOT NULL,      -- the one identity this token may be redeemed for
    created_at   REAL NOT NULL,      -- epoch seconds
    expires_at   REAL NOT NULL,
    used_at      REAL                -- NULL until redeemed; set exactly once
);
CREATE TABLE IF NOT EXISTS issued_svids (
    serial     TEXT PRIMARY KEY,     -- lowercase hex, as Envoy's /certs shows it
    spiffe_id  TEXT NOT NULL,
    method     TEXT NOT NULL,        -- 'join' or 'renew'
    issued_at  REAL NOT NULL,
    not_after  REAL NOT NULL
);
"""


def db_path(state_dir: Path) -> Path:
    return Path(state_dir) / "ca" / "ca.db"


@contextlib.contextmanager
def connect(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """An autocommit connection to <state>/ca/ca.db (created 0600 with its schema on first use)."""
    path = db_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        # Create the file ourselves so it is 0600 from the start (SQLite
        # would honour the umask instead); its -wal/-shm files copy this mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(_SCHEMA)
        yield conn
    finally:
        conn.close()


def record_issuance(state_dir: Path, serial: str, spiffe_id: str, method: str, not_after: float) -> None:
    with connect(state_dir) as conn:
        conn.execute(
            "INSERT INTO issued_svids (serial, spiffe_id, method, issued_at, not_after) VALUES (?, ?, ?, ?, ?)",
            (serial, spiffe_id, method, time.time(), not_after),
        )


def issued_serials(state_dir: Path, spiffe_id: str | None = None) -> list[str]:
    """Serials issued so far (oldest first), optionally for one SPIFFE ID: what tests and audits read."""
    with connect(state_dir) as conn:
        if spiffe_id is None:
            rows = conn.execute("SELECT serial FROM issued_svids ORDER BY issued_at").fetchall()
        else:
            rows = conn.execute(
                "SELECT serial FROM issued_svids WHERE spiffe_id = ? ORDER BY issued_at", (spiffe_id,)
            ).fetchall()
    return [r[0] for r in rows]
