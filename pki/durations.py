"""Duration strings for flags: "10s", "5m", "1h", "1h30m", "250ms", "90" (seconds)."""

from __future__ import annotations

import re
from datetime import timedelta

from pki.errors import DurationError

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(text: str) -> timedelta:
    """Parse a positive duration; a bare number is seconds.

    Raises DurationError naming the input for anything else (negative, zero,
    empty, unknown unit), so a bad `--ttl` stops start-up with a clear message.
    """
    s = text.strip()
    if _BARE_NUMBER.fullmatch(s):
        seconds = float(s)
    else:
        pos = 0
        seconds = 0.0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise DurationError(
                f"invalid duration {text!r}: expected e.g. '90', '10s', '5m', '1h', '1h30m' or '250ms'"
            )
    if seconds <= 0:
        raise DurationError(f"invalid duration {text!r}: must be greater than zero")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The inverse of parse_duration for passing a TTL on to another process ("4s", "0.5s")."""
    seconds = value.total_seconds()
    return f"{seconds:g}s"
