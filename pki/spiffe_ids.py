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


# Paths under /shopmesh/ name the mesh's own control plane (the CA server,
# agents); no join token is ever created for them and no workload gets one.
CONTROL_PLANE_PREFIX = "/shopmesh/"
AGENT_PREFIX = "/shopmesh/agent"


def check_workload_id(value: str, trust_domain: str | None = None) -> SpiffeId:
    """parse_spiffe_id, and refuse the control plane's reserved paths."""
    parsed = parse_spiffe_id(value, trust_domain)
    size = len(value.encode("utf-8"))
    if size + len(AGENT_PREFIX) > MAX_SPIFFE_ID_BYTES:
        raise InvalidSpiffeIdError(
            f"invalid SPIFFE ID '{_shown(value)}': {size} bytes long; a workload ID may have at most "
            f"{MAX_SPIFFE_ID_BYTES - len(AGENT_PREFIX)} so that its agent ID fits in {MAX_SPIFFE_ID_BYTES}"
        )
    if parsed.path.startswith(CONTROL_PLANE_PREFIX):
        raise InvalidSpiffeIdError(
            f"invalid SPIFFE ID '{_shown(value)}': paths under {CONTROL_PLANE_PREFIX} are reserved for the mesh's control plane"
        )
    return parsed


def agent_id_for(workload_id: str) -> str:
    """The agent SPIFFE ID that may renew workload_id: /shopmesh/agent + the workload's path.

    Deriving one from the other (instead of a registration table) binds an
    agent to exactly the workload its join token named, in both directions.
    """
    parsed = check_workload_id(workload_id)
    return f"spiffe://{parsed.trust_domain.name}{AGENT_PREFIX}{parsed.path}"


def workload_id_for_agent(agent_id: str, trust_domain: str | None = None) -> str | None:
    """The workload an agent SVID may renew; None if agent_id is not an agent ID."""
    parsed = parse_spiffe_id(agent_id, trust_domain)
    if not parsed.path.startswith(AGENT_PREFIX + "/"):
        return None
    workload = f"spiffe://{parsed.trust_domain.name}{parsed.path[len(AGENT_PREFIX):]}"
    try:
        check_workload_id(workload, trust_domain)
    except InvalidSpiffeIdError:
        return None
    return workload
