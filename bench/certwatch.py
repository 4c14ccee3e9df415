"""Watch which SVID one Envoy serves: poll its admin /certs, print each change.

    python -m bench.certwatch --admin 127.0.0.1:9901 --spiffe-id ID --out FILE [--interval 0.02] [--duration 120]

Writes "<epoch seconds> <serial>" to FILE each time the serial Envoy serves
for ID changes (pki.envoy.served_serial_from_certs: with several TLS
contexts, the oldest one, so a change is seen once every context serves the
new certificate). The admin port listens on the pod's own 127.0.0.1, so the
propagation benchmark runs one watcher inside each pod's network namespace.
It stops after --duration seconds or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pki.envoy import served_serial_from_certs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.certwatch")
    parser.add_argument("--admin", required=True, help="Envoy admin HOST:PORT")
    parser.add_argument("--spiffe-id", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between polls (the time resolution)")
    parser.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds")
    args = parser.parse_args(argv)
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    url = f"http://{args.admin}/certs"
    deadline = time.monotonic() + args.duration
    last: str | None = None
    with open(args.out, "a", buffering=1) as out:
        while not stopping and time.monotonic() < deadline:
            began = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    doc: dict[str, Any] = json.loads(resp.read())
                serial = served_serial_from_certs(doc, args.spiffe_id)
            except (urllib.error.URLError, OSError, ValueError):
                serial = None
            seen = time.time()
            if serial and serial != last:
                out.write(f"{seen:.6f} {serial}\n")
                last = serial
            # The poll interval is the resolution of what is measured, not a synchronisation.
            time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
