"""SPIFFE ID validation, stricter than py-spiffe where the mesh needs it to be.

py-spiffe (`spiffe.SpiffeId`) does the parsing: scheme, trust-domain
characters (which rules out ports and user info), path segments (no empty
segment, no trailing '/', no '.' or '..', no '%xx', no query or fragment).
It is lenient in two ways the X509-SVID standard is not, so we add:

- it lowercases the scheme and trust domain silently; a SPIFFE ID with an
  uppercase trust domain is not a valid ID (it would be issued under a name
  the requester did not write), so we refuse anything not already canonical;
- it has no length limit; SPIFFE IDs are at most 2048 bytes.
"""

from __future__ import annotations

from spiffe import SpiffeId
from spiffe.errors import PySpiffeError

from pki.errors import InvalidSpiffeIdError
from shopmesh.topology import TRUST_DOMAIN

DEFAULT_TRUST_DOMAIN = TRUST_DOMAIN
MAX_SPIFFE_ID_BYTES = 2048
# How much of an over-long input an error message repeats.
_ECHO_LIMIT = 80


def _shown(value: str) -> str:
    if len(value) <= _ECHO_LIMIT:
        return value
    return f"{value[:_ECHO_LIMIT]}…"


def parse_spiffe_id(value: str, trust_domain: str | None = None) -> SpiffeId:
    """Validate a workload SPIFFE ID (with a path) and return it parsed.

    trust_domain, when given, is the only trust domain accepted.
    Raises InvalidSpiffeIdError("invalid SPIFFE ID '…': reason").
    """
    size = len(value.encode("utf-8"))
    if size > MAX_SPIFFE_ID_BYTES:
        raise InvalidSpiffeIdError(
            f"invalid SPIFFE ID '{_shown(value)}': {size} bytes long, the limit is {MAX_SPIFFE_ID_BYTES}"
        )
    try:
        parsed = SpiffeId(value)
    except PySpiffeError as err:
        # py-spiffe's message already reads "Invalid SPIFFE ID '…': reason";
        # keep only the reason so ours has one consistent shape.
        reason = str(err)
        for prefix in (f"Invalid SPIFFE ID '{value}': ", "Invalid SPIFFE ID: "):
            reason = reason.removeprefix(prefix)
        raise InvalidSpiffeIdError(f"invalid SPIFFE ID '{_shown(value)}': {reason}") from err
    if str(parsed) != value:
        td_part = value[len("spiffe://") :].split("/", 1)[0]
        if td_part != td_part.lower():
            reason = f"trust domain '{td_part}' must be lowercase"
        else:
            reason = "scheme must be lowercase 'spiffe://'"
        raise InvalidSpiffeIdError(f"invalid SPIFFE ID '{_shown(value)}': {reason}")
    if not parsed.path:
        raise InvalidSpiffeIdError(
            f"invalid SPIFFE ID '{_shown(value)}': a workload ID needs a path, e.g. /ns/shop/sa/orders"
        )
    if trust_domain is not None and parsed.trust_domain.name != trust_domain:
        raise InvalidSpiffeIdError(
            f"invalid SPIFFE ID '{_shown(value)}': trust domain '{parsed.trust_domain.name}' "
            f"is not this CA's trust domain '{trust_domain}'"
        )
    return parsed
