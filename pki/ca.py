"""The local CA: a persisted EC P-256 root that issues X.509-SVIDs.

The root signs the leaves directly (pathLen 0): a short-lived mesh does not
need an intermediate to protect an offline root, and a one-level chain is what
Envoy, py-spiffe and every TLS stack verify without surprises.

State layout (created on first use, never under version control):
    <state>/ca/            0700
    <state>/ca/root.key    0600  PKCS#8 private key, created with O_EXCL, never overwritten
    <state>/ca/root.pem    0644  the trust bundle (public)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    "serial_hex",
    "verify_svid",
]

log = logging.getLogger("pki.ca")

ROOT_VALIDITY = timedelta(days=365)
# NotBefore is set this far in the past so that a peer whose clock runs a few
# seconds behind ours still accepts a certificate issued "now" (SPIRE's CA
# backdates by the same amount).
BACKDATE = timedelta(seconds=10)
# The CA server's own TLS certificate carries this DNS name; clients set
# grpc.ssl_target_name_override to it, so any IP or hostname reaches the CA.
CA_SERVER_DNS_NAME = "ca.shopmesh.internal"

_ALLOWED_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_BITS = (2048, 3072, 4096)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as Envoy's admin /certs prints it: big-endian bytes, lowercase hex.

    BoringSSL's BN_bn2hex drops leading zero *bytes* but keeps two digits per
    byte, so 0x0abc prints as "0abc", not "abc".
    """
    n = cert.serial_number
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big").hex()


def leaf_spiffe_id(cert: x509.Certificate) -> str:
    """The single URI SAN of an SVID; raises SvidError if there is not exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise SvidError(f"certificate serial {serial_hex(cert)} has no subjectAltName") from err
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidError(
            f"certificate serial {serial_hex(cert)} has {len(uris)} URI SANs, an SVID has exactly one"
        )
    return uris[0]


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
    when = now or _utcnow()
    serial = serial_hex(cert)
    if cert.issuer != root.subject:
        raise SvidError(f"certificate serial {serial} was issued by '{cert.issuer.rfc4514_string()}', not by this CA")
    root_key = root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise SvidError("the CA root key is not an EC key")
    sig_hash = cert.signature_hash_algorithm
    if sig_hash is None:
        raise SvidError(f"certificate serial {serial} has no signature hash algorithm")
    try:
        root_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(sig_hash))
    except InvalidSignature as err:
        raise SvidError(f"certificate serial {serial} is not signed by this CA") from err
    if when < cert.not_valid_before_utc:
        raise SvidError(f"certificate serial {serial} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if when >= cert.not_valid_after_utc:
        raise SvidError(f"certificate serial {serial} expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as err:
        raise SvidError(f"certificate serial {serial} has no basicConstraints") from err
    if bc.ca:
        raise SvidError(f"certificate serial {serial} is a CA certificate, not an SVID")
    spiffe_id = leaf_spiffe_id(cert)
    try:
        parse_spiffe_id(spiffe_id, trust_domain)
    except InvalidSpiffeIdError as err:
        raise SvidError(f"certificate serial {serial}: {err}") from err
    return spiffe_id


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # Serializes load_or_create between processes (the runner and the CA
    # server may both open the CA at start-up).
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_new_private_file(path: Path, data: bytes) -> None:
    """Write data to path, mode 0600 from the first byte, never replacing an existing file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if the target exists: a key is never overwritten.
        os.link(tmp, path)
    finally:
        tmp.unlink()


def _write_public_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class LocalCA:
    """A CA whose root key lives in <state>/ca. Load it with LocalCA.load_or_create."""

    trust_domain: str
    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    state_dir: Path

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def bundle_pem(self) -> str:
        return self.root_cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def bundle_path(self) -> Path:
        return self.ca_dir / "root.pem"

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> LocalCA:
        """Load the CA from state_dir/ca, creating the root key and certificate on first use."""
        if trust_domain != trust_domain.lower() or not trust_domain:
            raise CaStateError(f"invalid trust domain '{trust_domain}': must be a non-empty lowercase name")
        ca_dir = Path(state_dir) / "ca"
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(ca_dir, 0o700)
        key_path, cert_path = ca_dir / "root.key", ca_dir / "root.pem"
        with _locked(ca_dir / ".lock"):
            if key_path.exists():
                mode = key_path.stat().st_mode & 0o777
                if mode & 0o077:
                    raise CaStateError(
                        f"{key_path} has mode {mode:04o}: a CA key must be readable by its owner only (chmod 600)"
                    )
                try:
                    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                except ValueError as err:
                    raise CaStateError(f"{key_path} is not a PEM private key: {err}") from err
                if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                    raise CaStateError(f"{key_path} holds a {type(loaded).__name__}, expected an EC key")
                key = loaded
                created = False
            else:
                if cert_path.exists():
                    raise CaStateError(
                        f"{cert_path} exists but its key {key_path} does not; "
                        f"restore the key or move {ca_dir} away to create a new CA"
                    )
                key = ec.generate_private_key(ec.SECP256R1())
                _write_new_private_file(
                    key_path,
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                )
                created = True
            if cert_path.exists():
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if cert.public_key() != key.public_key():
                    raise CaStateError(f"{cert_path} does not belong to the key in {key_path}")
            else:
                cert = _self_signed_root(key, trust_domain)
                _write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(trust_domain=trust_domain, root_key=key, root_cert=cert, state_dir=Path(state_dir))
        if ca.root_trust_domain() != trust_domain:
            raise CaStateError(
                f"{cert_path} is the root of trust domain '{ca.root_trust_domain()}', not '{trust_domain}'"
            )
        if _utcnow() >= cert.not_valid_after_utc:
            raise CaStateError(
                f"root certificate {cert_path} expired at {cert.not_valid_after_utc.isoformat()}; "
                f"move {ca_dir} away to create a new CA"
            )
        log.info(
            "%s CA for %s: root serial %s, valid until %s",
            "created" if created else "loaded",
            trust_domain,
            serial_hex(cert),
            cert.not_valid_after_utc.isoformat(),
        )
        return ca

    def root_trust_domain(self) -> str:
        san = self.root_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        return uris[0].removeprefix("spiffe://") if uris else ""

    def check_csr(self, csr_pem: str | bytes, spiffe_id: str) -> x509.CertificateSigningRequest:
        """Validate spiffe_id and the CSR for it without issuing anything.

        Callers that spend a one-time resource (a join token) check first, so a
        bad request never burns the token.
        """
        parse_spiffe_id(spiffe_id, self.trust_domain)
        csr = load_csr(csr_pem)
        asked = csr_spiffe_id(csr)
        if asked is not None and asked != spiffe_id:
            raise CsrError(f"CSR asks for '{asked}' but the request is for '{spiffe_id}'")
        return csr

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
        when = now or _utcnow()
        not_after = min(when + ttl, self.root_cert.not_valid_after_utc)
        if not_after <= when:
            raise CaStateError(f"root certificate expires at {not_after.isoformat()}: cannot issue")
        public_key = csr.public_key()
        assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))  # load_csr checked
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(self.root_cert.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(when - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                # Empty subject: RFC 5280 requires the SAN to be critical then;
                # our subject has O=SPIFFE, so it need not be.
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.root_cert), critical=False)
        )
        cert = builder.sign(self.root_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode(), self.bundle_pem

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
        when = _utcnow()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
            .issuer_name(self.root_cert.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(when - BACKDATE)
            .not_valid_after(min(when + ttl, self.root_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe_id), *(x509.DNSName(d) for d in dns_names)]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.root_cert), critical=False)
        )
        return builder.sign(self.root_key, hashes.SHA256())

    def verify_peer_svid(self, cert: x509.Certificate, now: datetime | None = None) -> str:
        """verify_svid against this CA's root and trust domain."""
        return verify_svid(cert, self.root_cert, self.trust_domain, now)


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _random_serial() -> int:
    # 128 random bits (RFC 5280 allows up to 20 octets; CA/B asks for >= 64
    # bits of entropy). Zero is not a valid serial.
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _authority_key_id(root: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _self_signed_root(key: ec.EllipticCurvePrivateKey, trust_domain: str) -> x509.Certificate:
    now = _utcnow()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ShopMesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ShopMesh root CA {trust_domain}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_VALIDITY)
        # pathLen 0: the root signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # The SPIFFE spec recommends the trust domain's ID as the CA's URI SAN.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
