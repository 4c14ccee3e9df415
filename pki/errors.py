"""The PKI's error hierarchy.

Every message names the offending input, so the person reading a log line or
a gRPC status knows what to fix. Secrets (join tokens, keys) are never echoed:
a join token is named by a short fingerprint of its hash instead.
"""

from __future__ import annotations


class PkiError(Exception):
    """Base class of every error raised by the pki package."""


class InvalidSpiffeIdError(PkiError):
    """A SPIFFE ID is malformed or outside the CA's trust domain."""


class CsrError(PkiError):
    """A certificate signing request is malformed, unsigned, or asks for the wrong thing."""


class JoinTokenError(PkiError):
    """A join token is unknown, used, expired, or bound to another identity."""


class JoinTokenIdentityError(JoinTokenError):
    """A valid join token presented for an identity it was not created for."""


class RenewalError(PkiError):
    """Obtaining a new SVID from the CA failed (the agent keeps its current one)."""


class CaStateError(PkiError):
    """The CA's state directory is inconsistent (e.g. a root certificate without its key)."""


class DurationError(PkiError, ValueError):
    """A duration string such as '10s' or '5m' could not be parsed."""


class SvidError(PkiError):
    """An SVID received or loaded from disk fails verification."""


class IssuanceError(PkiError):
    """The CA backend could not issue a certificate; the agent keeps its current one and retries."""


class CaUnavailableError(IssuanceError):
    """Transient: the upstream CA is throttling us or unreachable. Retry with back-off."""


class CaNotUsableError(IssuanceError):
    """The upstream CA refuses to issue (disabled, deleted, access denied) until someone fixes it."""


class CaResponseError(IssuanceError):
    """The upstream CA answered with something we must not hand out (not PEM, wrong key, not an SVID)."""


class RotationError(PkiError):
    """A CA rotation step cannot run now (nothing prepared, or the backend cannot rotate)."""
