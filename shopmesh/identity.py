"""Who is calling: the caller's SPIFFE ID from `x-forwarded-client-cert`.

The app's own Envoy terminates mTLS, strips any XFCC header a client sent,
and appends one element describing the client certificate it verified, e.g.

    By=spiffe://shopmesh.internal/ns/shop/sa/payments;Hash=3f…;URI=spiffe://shopmesh.internal/ns/shop/sa/orders

Envoy's grammar: elements are separated by ',', key=value pairs by ';'; keys
are case-insensitive; a value containing ',', ';' or '=' is double-quoted,
with '"' inside escaped as '\\"'. Only the LAST element is trusted: it is the
one our sidecar appended (a proxy in front of it could have added others).
"""

from __future__ import annotations

from collections.abc import Iterable

from spiffe import SpiffeId
from spiffe.errors import PySpiffeError

XFCC_HEADER = "x-forwarded-client-cert"

Metadata = Iterable[tuple[str, str | bytes]]
XfccElement = list[tuple[str, str]]


class XfccError(ValueError):
    """An XFCC header value does not follow Envoy's grammar."""


def parse_xfcc(value: str) -> list[XfccElement]:
    """Parse an XFCC header value into elements of (lowercased key, value) pairs."""
    elements: list[XfccElement] = []
    pairs: XfccElement = []
    token: list[str] = []
    key: str | None = None
    quoted = False  # the current value started with '"' and has not been closed
    closed = False  # the current value was quoted and is closed: only ';' or ',' may follow
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\" and i + 1 < len(value):
                token.append(value[i + 1])
                i += 2
                continue
            if ch == '"':
                quoted, closed = False, True
            else:
                token.append(ch)
        elif ch == '"' and key is not None and not token and not closed:
            quoted = True
        elif ch == "=" and key is None:
            key = "".join(token).strip().lower()
            if not key:
                raise XfccError(f"XFCC {value!r}: a pair has an empty key (offset {i})")
            token = []
        elif ch in ";,":
            if key is not None:
                pairs.append((key, "".join(token) if closed else "".join(token).strip()))
            elif "".join(token).strip():
                raise XfccError(f"XFCC {value!r}: '{''.join(token).strip()}' has no '=' (offset {i})")
            key, token, closed = None, [], False
            if ch == ",":
                if pairs:
                    elements.append(pairs)
                pairs = []
        elif closed:
            if not ch.isspace():
                raise XfccError(f"XFCC {value!r}: text after a closing quote (offset {i})")
        else:
            token.append(ch)
        i += 1
    if quoted:
        raise XfccError(f"XFCC {value!r}: unterminated quoted value")
    if key is not None:
        pairs.append((key, "".join(token) if closed else "".join(token).strip()))
    elif "".join(token).strip():
        raise XfccError(f"XFCC {value!r}: '{''.join(token).strip()}' has no '='")
    if pairs:
        elements.append(pairs)
    return elements


def _header_values(metadata: Metadata | None, name: str) -> list[str]:
    values: list[str] = []
    for key, value in metadata or ():
        if key.lower() == name:
            values.append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return values


def caller_spiffe_id(metadata: Metadata | None) -> str | None:
    """The caller's SPIFFE ID from the last XFCC element, or None.

    None means "no verified identity": no header, a malformed header, no URI
    in the last element, more than one URI (an X509-SVID has exactly one), or
    a URI that is not a canonical SPIFFE ID. Callers must treat None as
    anonymous, never as a reason to trust the request more.
    """
    values = _header_values(metadata, XFCC_HEADER)
    if not values:
        return None
    # Repeated headers are equivalent to one header joined with ',' (RFC 9110).
    try:
        elements = parse_xfcc(",".join(values))
    except XfccError:
        return None
    if not elements:
        return None
    uris = [v for k, v in elements[-1] if k == "uri"]
    if len(uris) != 1:
        return None
    try:
        parsed = SpiffeId(uris[0])
    except PySpiffeError:
        return None
    # py-spiffe lowercases scheme and trust domain; a non-canonical ID is not
    # the one in the certificate, so it does not count.
    if str(parsed) != uris[0] or not parsed.path:
        return None
    return uris[0]


def describe_caller(metadata: Metadata | None) -> str:
    """The caller for log lines: its SPIFFE ID, or "anonymous"."""
    return caller_spiffe_id(metadata) or "anonymous"
