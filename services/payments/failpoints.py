"""A test-only fault point: pause a charge between the processor's answer and the commit.

Set SHOPMESH_PAYMENTS_PAUSE_AFTER_AUTHORIZE=/some/marker to arm it (never in
production: the service logs a warning at start when it is armed). Every
charge then, after the card processor has authorized it and before payments
stores the result, writes the marker file (the charge id and idempotency
key, as JSON) and blocks. The kill-mid-charge test waits for the marker,
SIGKILLs the process and restarts it: the one moment where a crash leaves
money moved at the processor but nothing final in payments' database.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

# Bounded, so a forgotten armed process does not hold a worker thread forever.
PAUSE_LIMIT_S = 120.0


class PausedTooLong(RuntimeError):
    """The armed pause was not ended by a kill within PAUSE_LIMIT_S; the charge is not stored."""


class PauseAfterAuthorize:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self, charge_id: str, idempotency_key: str) -> None:
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(json.dumps({"charge_id": charge_id, "idempotency_key": idempotency_key}))
        tmp.replace(self.marker)
        threading.Event().wait(PAUSE_LIMIT_S)
        raise PausedTooLong(f"paused after authorizing {charge_id} for {PAUSE_LIMIT_S:g} s and was not killed")
