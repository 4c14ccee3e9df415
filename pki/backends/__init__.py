"""CA backends: who signs the mesh's certificates.

The CA server speaks to one CaBackend and does not care which:

- `local.LocalBackend` — self-signed roots in the state directory (the default);
- `acm_pca.UpstreamBackend` — ACM Private CA signs the mesh's intermediate,
  which signs the short-lived leaves here (cheap for short TTLs);
- `acm_pca.DirectBackend` — ACM Private CA signs every leaf.

Every method may block (ACM PCA is a network call): the CA server calls them
from a worker thread.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509

from pki.authority import AuthorityState, fingerprint
from pki.errors import RotationError


class Profile(enum.Enum):
    SVID = "svid"  # an X509-SVID: one URI SAN, serverAuth + clientAuth
    SERVER = "server"  # the CA server's own TLS certificate: URI + DNS SANs, serverAuth


@dataclass(frozen=True)
class AuthorityInfo:
    """What `shopmesh ca rotate` and the admin API show about one signing authority."""

    fingerprint: str
    role: str  # active, prepared, retiring
    subject: str
    not_after: datetime
    trust_anchor_fingerprint: str


@dataclass(frozen=True)
class BackendState:
    """A consistent snapshot: what peers must trust, who signs, and the CA certificates in between."""

    bundle: list[x509.Certificate]
    signing_authority: str  # fingerprint of the certificate that signs new leaves
    intermediates: list[x509.Certificate] = field(default_factory=list)
    authorities: list[AuthorityInfo] = field(default_factory=list)

    @property
    def bundle_fingerprints(self) -> list[str]:
        return [fingerprint(c) for c in self.bundle]

    @property
    def key(self) -> tuple[tuple[str, ...], str]:
        """Changes whenever the bundle or the signing authority changes."""
        return tuple(self.bundle_fingerprints), self.signing_authority


def authority_infos(state: AuthorityState) -> list[AuthorityInfo]:
    roles = [("active", state.active)]
    if state.prepared is not None:
        roles.append(("prepared", state.prepared))
    roles += [("retiring", a) for a in state.retiring]
    return [
        AuthorityInfo(
            fingerprint=a.fingerprint,
            role=role,
            subject=a.cert.subject.rfc4514_string(),
            not_after=a.cert.not_valid_after_utc,
            trust_anchor_fingerprint=fingerprint(a.anchor),
        )
        for role, a in roles
    ]


class CaBackend(abc.ABC):
    """One way of signing the mesh's certificates."""

    name: str
    trust_domain: str

    @abc.abstractmethod
    def state(self) -> BackendState:
        """The current bundle and signing authority (cheap: no network call)."""

    @abc.abstractmethod
    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        spiffe_id: str,
        ttl: timedelta,
        profile: Profile = Profile.SVID,
        dns_names: tuple[str, ...] = (),
    ) -> list[x509.Certificate]:
        """Sign csr's key for spiffe_id; return the chain, leaf first, without the trust anchor.

        The CSR has been checked (signature, key). Raises IssuanceError
        (CaUnavailableError, CaNotUsableError, CaResponseError) when the
        backend cannot issue.
        """

    def maintain(self) -> bool:
        """Periodic upkeep (e.g. renewing an intermediate at half its life); True if the state changed."""
        return False

    def prepare(self) -> None:
        raise RotationError(f"the {self.name} backend cannot rotate its CA")

    def activate(self) -> None:
        raise RotationError(f"the {self.name} backend cannot rotate its CA")

    def retire(self) -> None:
        raise RotationError(f"the {self.name} backend cannot rotate its CA")
