"""The local CA: persisted EC P-256 roots that issue X.509-SVIDs.

A root signs the leaves directly (pathLen 0): a short-lived mesh does not
need an intermediate to protect an offline root, and a one-level chain is what
Envoy, py-spiffe and every TLS stack verify without surprises. The roots live
in an AuthorityStore (pki.authority) so the CA can be rotated without
downtime: a next root is prepared (trusted, not signing), activated, and the
old one retired.

State layout (created on first use, never under version control):
    <state>/ca/            0700
    <state>/ca/root.pem    0644  the trust bundle: every trusted root (written by the CA server)
    <state>/ca/local/      0700  the local CA's authorities (see pki.authority)
    <state>/ca/local/<id>/key.pem  0600  a root key, created with O_EXCL, never overwritten
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from pki.authority import (
    BACKDATE,
    Authority,
    AuthorityKey,
    AuthorityState,
    AuthorityStore,
    leaf_spiffe_id,
    pem,
    self_signed_root,
    serial_hex,
    verify_svid_chain,
    write_public_file,
)
from pki.errors import (
    CaStateError,
    CsrError,
    InvalidSpiffeIdError,
    PkiError,
    SvidError,
)
from pki.spiffe_ids import DEFAULT_TRUST_DOMAIN, parse_spiffe_id

__all__ = [
    "BACKDATE",
    "CA_SERVER_DNS_NAME",
    "DEFAULT_TRUST_DOMAIN",
    "CaStateError",
    "CsrError",
    "InvalidSpiffeIdError",
    "LocalCA",
    "PkiError",
    "SvidError",
    "csr_spiffe_id",
    "leaf_spiffe_id",
    "local_store",
    "serial_hex",
    "verify_svid",
]

log = logging.getLogger("pki.ca")

# The CA server's own TLS certificate carries this DNS name; clients set
# grpc.ssl_target_name_override to it, so any IP or hostname reaches the CA.
CA_SERVER_DNS_NAME = "ca.shopmesh.internal"
BUNDLE_FILE = "root.pem"

_ALLOWED_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_BITS = (2048, 3072, 4096)


def csr_spiffe_id(csr: x509.CertificateSigningRequest) -> str | None:
    """The URI SAN a CSR asks for, None if it asks for none.

    A CSR that asks for anything but one URI (DNS names, IPs, several URIs)
    is refused: an SVID carries exactly one name.
    """
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or len(uris) != 1:
        shown = ", ".join(str(getattr(n, "value", n)) for n in names)
        raise CsrError(f"CSR asks for names [{shown}]; an SVID request names exactly one SPIFFE ID")
    return uris[0]


def _check_public_key(key: object) -> None:
    """Refuse keys Envoy cannot serve or that are too weak for the mesh."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_EC_CURVES):
            raise CsrError(f"CSR key uses curve {key.curve.name}; use EC P-256 (or P-384)")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size not in _RSA_BITS or key.public_numbers().e != 65537:
            raise CsrError(
                f"CSR key is RSA-{key.key_size} e={key.public_numbers().e}; "
                "use EC P-256, or RSA 2048/3072/4096 with e=65537"
            )
        return
    raise CsrError(f"CSR key type {type(key).__name__} is not supported; use EC P-256")


def load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR, check its self-signature and its key; raise CsrError otherwise."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as err:
        raise CsrError(f"CSR is not a PEM PKCS#10 request ({len(data)} bytes received): {err}") from err
    # The signature proves the requester holds the private key: without this
    # check anyone could get a certificate for someone else's public key.
    if not csr.is_signature_valid:
        raise CsrError("CSR signature does not verify with the key it carries")
    _check_public_key(csr.public_key())
    return csr


def verify_svid(
    cert: x509.Certificate,
    root: x509.Certificate,
    trust_domain: str,
    now: datetime | None = None,
) -> str:
    """Check that cert is an unexpired X509-SVID of trust_domain signed by root; return its SPIFFE ID.

    Raises SvidError naming the serial and the reason.
    """
    return verify_svid_chain([cert], [root], trust_domain, now)


def local_store(state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> AuthorityStore:
    """The local CA's authorities in <state>/ca/local: self-signed roots for trust_domain."""
    if trust_domain != trust_domain.lower() or not trust_domain:
        raise CaStateError(f"invalid trust domain '{trust_domain}': must be a non-empty lowercase name")

    def new_root(key: AuthorityKey) -> list[x509.Certificate]:
        return [self_signed_root(key, trust_domain)]

    return AuthorityStore(Path(state_dir) / "ca" / "local", new_root, f"local CA {trust_domain}")


def _root_trust_domain(root: x509.Certificate) -> str:
    try:
        san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0].removeprefix("spiffe://") if uris else ""


@dataclass(frozen=True)
class LocalCA:
    """The local CA of a state directory, as its active root. Load it with LocalCA.load_or_create."""

    trust_domain: str
    state_dir: Path
    authorities: AuthorityState

    @property
    def active(self) -> Authority:
        return self.authorities.active

    @property
    def root_cert(self) -> x509.Certificate:
        """The root that signs now."""
        return self.active.cert

    @property
    def root_key(self) -> AuthorityKey:
        assert self.active.key is not None  # AuthorityStore refuses an active authority without its key
        return self.active.key

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def bundle(self) -> list[x509.Certificate]:
        return self.authorities.bundle()

    @property
    def bundle_pem(self) -> str:
        return pem(self.bundle).decode()

    @property
    def bundle_path(self) -> Path:
        return self.ca_dir / BUNDLE_FILE

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> LocalCA:
        """Load the CA from state_dir/ca, creating its first root on first use.

        Writes the bundle file <state>/ca/root.pem only if there is none: the
        CA server owns it (it may serve another backend's bundle).
        """
        ca_dir = Path(state_dir) / "ca"
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = cls(trust_domain=trust_domain, state_dir=Path(state_dir), authorities=local_store(state_dir, trust_domain).load())
        for authority in ca.authorities.all():
            if _root_trust_domain(authority.cert) != trust_domain:
                raise CaStateError(
                    f"root {authority.id} in {ca_dir / 'local'} is for trust domain "
                    f"'{_root_trust_domain(authority.cert)}', not '{trust_domain}'"
                )
        if datetime.now(ca.root_cert.not_valid_after_utc.tzinfo) >= ca.root_cert.not_valid_after_utc:
            raise CaStateError(
                f"root certificate {ca.active.id} expired at {ca.root_cert.not_valid_after_utc.isoformat()}; "
                f"rotate the CA (`shopmesh ca rotate`) or move {ca_dir} away to create a new one"
            )
        if not ca.bundle_path.exists():
            write_public_file(ca.bundle_path, ca.bundle_pem.encode())
        return ca

    def root_trust_domain(self) -> str:
        return _root_trust_domain(self.root_cert)

    def check_csr(self, csr_pem: str | bytes, spiffe_id: str) -> x509.CertificateSigningRequest:
        """Validate spiffe_id and the CSR for it without issuing anything.

        Callers that spend a one-time resource (a join token) check first, so a
        bad request never burns the token.
        """
        parse_spiffe_id(spiffe_id, self.trust_domain)
        return check_csr_for(csr_pem, spiffe_id)

    def issue_svid(
        self,
        csr_pem: str | bytes,
        spiffe_id: str,
        ttl: timedelta,
        *,
        now: datetime | None = None,
    ) -> tuple[str, str]:
        """Issue an X509-SVID for spiffe_id to the key in csr_pem; return (cert_chain_pem, bundle_pem).

        now is for tests that need a certificate from the past (e.g. expired).
        """
        csr = self.check_csr(csr_pem, spiffe_id)
        if ttl <= timedelta(0):
            raise PkiError(f"invalid TTL {ttl}: must be positive")
        cert = self.active.sign_svid(csr.public_key(), spiffe_id, ttl, now)
        return pem([cert, *self.active.leaf_intermediates]).decode(), self.bundle_pem

    def issue_server_certificate(
        self,
        public_key: CertificateIssuerPublicKeyTypes,
        spiffe_id: str,
        dns_names: list[str],
        ttl: timedelta,
    ) -> x509.Certificate:
        """A TLS server certificate for the CA server itself: a URI SAN plus DNS names.

        Not an SVID (an SVID has exactly one name); the DNS name is what gRPC
        clients check via ssl_target_name_override.
        """
        parse_spiffe_id(spiffe_id, self.trust_domain)
        return self.active.sign_server_certificate(public_key, spiffe_id, dns_names, ttl)

    def verify_peer_svid(self, cert: x509.Certificate, now: datetime | None = None) -> str:
        """verify_svid_chain against this CA's bundle and trust domain."""
        return verify_svid_chain([cert], self.bundle, self.trust_domain, now, self.authorities.intermediates())


def check_csr_for(csr_pem: str | bytes, spiffe_id: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR; refuse one that names an identity other than spiffe_id."""
    csr = load_csr(csr_pem)
    asked = csr_spiffe_id(csr)
    if asked is not None and asked != spiffe_id:
        raise CsrError(f"CSR asks for '{asked}' but the request is for '{spiffe_id}'")
    return csr
