"""The payments audit log: append-only JSON lines, each entry chained to the previous by hash.

Every tokenization, detokenization, charge, refund, rewrap and key use is
one line in `<data dir>/audit/audit.jsonl`:

    {"seq": 7, "time": "2026-…Z", "caller": "spiffe://…/sa/orders", "operation": "detokenize",
     "token": "tok_…", "outcome": "ok", "details": {…}, "prev": "<hash of entry 6>", "hash": "…"}

`hash` is SHA-256 over the entry's canonical JSON without `hash` (so it
covers `prev`): changing, removing or reordering an entry breaks the chain
from that entry on, and `verify` names the first broken line. A hash chain
cannot tell a log truncated at its end from a shorter log, so `verify` also
prints the head hash and count, to be recorded somewhere the payments host
cannot write (a ticket, a SIEM) and compared later.

Never logged: card numbers, CVVs, key material. Entries carry tokens, charge
ids, key ARNs/ids and outcomes only. `details` values are checked against
contains_card_number before writing, as a last line of defence.

Several processes append (the service, `shopmesh payments rewrap`): an
exclusive flock on the file serializes them, and each append reads the last
entry under that lock. Each entry is fsynced before the operation it records
is reported as done: if the audit log cannot be written, the operation fails.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.payments.cards import contains_card_number
from shopmesh.config import ensure_private_dir

AUDIT_PATH = Path("audit") / "audit.jsonl"
GENESIS = "0" * 64
ANONYMOUS = "anonymous"
_TAIL_CHUNK = 8192

# Mirrors every entry as one log line, so the service log tells the same story.
log = logging.getLogger("services.payments.audit")

# Who is being served: set by each RPC from the XFCC header its sidecar sent,
# read by the key-use entries written deep inside the vault (worker threads
# get a copy of the context through asyncio.to_thread).
current_caller: contextvars.ContextVar[str] = contextvars.ContextVar("payments_caller", default=ANONYMOUS)


class AuditError(Exception):
    """The audit log could not be written or is damaged; the message says where."""


class AuditChainBroken(AuditError):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_clean(value: Any, where: str) -> None:
    if isinstance(value, str) and contains_card_number(value):
        raise AuditError(f"refusing to write an audit entry whose {where} looks like a card number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_clean(item, f"{where}.{key}")


def _last_line(handle: Any) -> bytes:
    """The last line of an open binary file ("" when empty), read from its end."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size == 0:
        return b""
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        handle.seek(start)
        data = handle.read(size - start)
        # Skip the final newline; the line starts after the one before it.
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0 or start == 0:
            return data[cut + 1 :]
        chunk *= 2


class AuditLog:
    """Append-only, hash-chained audit entries in one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ensure_private_dir(path.parent, what=str(path.parent))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        self._lock = threading.Lock()

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> AuditLog:
        return cls(data_dir / AUDIT_PATH)

    def append(
        self,
        operation: str,
        outcome: str,
        *,
        token: str | None = None,
        caller: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one entry (fsynced) and return it; AuditError if it cannot be written."""
        entry_details = {k: v for k, v in (details or {}).items() if v is not None}
        _check_clean(entry_details, "details")
        _check_clean(token, "token")
        who = caller or current_caller.get()
        try:
            with self._lock, open(self.path, "a+b") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    last = _last_line(handle)
                    if last and not last.endswith(b"\n"):
                        raise AuditError(
                            f"{self.path} ends with an incomplete entry; run `shopmesh payments audit verify` "
                            "and repair it before payments can write again"
                        )
                    if last:
                        previous = json.loads(last)
                        seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
                    else:
                        seq, prev = 1, GENESIS
                    entry: dict[str, Any] = {
                        "seq": seq,
                        "time": _now(),
                        "caller": who,
                        "operation": operation,
                        "token": token,
                        "outcome": outcome,
                        "details": entry_details,
                        "prev": prev,
                    }
                    entry["hash"] = _entry_hash(entry)
                    # One write of one line to an O_APPEND file: readers never see half an entry.
                    handle.write((json.dumps(entry, separators=(",", ":"), ensure_ascii=True) + "\n").encode())
                    handle.flush()
                    os.fsync(handle.fileno())
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        except (OSError, ValueError, KeyError) as exc:
            raise AuditError(f"cannot append to the audit log {self.path} ({type(exc).__name__})") from None
        extras = "".join(f" {k}={v}" for k, v in entry_details.items())
        log.info("%s token=%s outcome=%s%s caller=%s", operation, token or "-", outcome, extras, who)
        return entry


@dataclass(frozen=True)
class ChainSummary:
    entries: int
    head: str  # the last entry's hash (GENESIS for an empty log)


def verify(path: Path) -> ChainSummary:
    """Check every entry's hash and link; AuditChainBroken names the first bad line."""
    prev, count = GENESIS, 0
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditChainBroken(number, "incomplete last entry (a write was cut off or the file was truncated)")
            try:
                entry = json.loads(raw)
            except ValueError:
                raise AuditChainBroken(number, "not a JSON entry") from None
            if not isinstance(entry, dict) or "hash" not in entry:
                raise AuditChainBroken(number, "not an audit entry (no hash)")
            if entry.get("seq") != number:
                raise AuditChainBroken(number, f"sequence number {entry.get('seq')!r}, expected {number} (an entry was removed or inserted)")
            if entry.get("prev") != prev:
                raise AuditChainBroken(number, "does not link to the previous entry (an entry before it was changed, removed or reordered)")
            if _entry_hash(entry) != entry["hash"]:
                raise AuditChainBroken(number, "hash mismatch (this entry was modified)")
            prev, count = entry["hash"], number
    return ChainSummary(entries=count, head=prev)


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every entry, for tests and tooling (no verification)."""
    with open(path, "rb") as handle:
        return [json.loads(line) for line in handle if line.strip()]
