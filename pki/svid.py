"""An agent's X509-SVIDs: key, certificate chain; checked on receipt and persisted privately.

On disk, in the agent's pod-private data directory (0700):
    svid.pem        0600  the workload SVID: PKCS#8 private key followed by the certificate chain.
                          One file, replaced with one rename, so a crash can never pair a
                          new key with an old certificate.
    agent-svid.pem  0600  the agent SVID, the same way. Used only as the client certificate
                          of renewals; never served over SDS or the Workload API.
    bundle.pem      0644  the trust bundle the CA last sent (public).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki.authority import fingerprint, leaf_spiffe_id, load_bundle, serial_hex, verify_svid_chain
from pki.errors import SvidError

__all__ = [
    "AGENT_SVID_FILE",
    "BUNDLE_FILE",
    "SVID_FILE",
    "Svid",
    "load_bundle",
    "load_persisted_svid",
    "new_key_and_csr",
    "save_bundle",
    "save_svid",
]

SVID_FILE = "svid.pem"
AGENT_SVID_FILE = "agent-svid.pem"
BUNDLE_FILE = "bundle.pem"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.DOTALL)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def new_key_and_csr(spiffe_id: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh EC P-256 key (generated here, it never leaves the pod) and a CSR naming spiffe_id."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Svid:
    """A verified SVID with its private key."""

    spiffe_id: str
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]
    # Fingerprint of the CA certificate that signed the leaf: after a CA
    # rotation, an agent renews every SVID not signed by the new authority.
    authority: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return serial_hex(self.leaf)

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @property
    def key_der(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    @property
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def chain_der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def is_valid(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) < self.not_after

    @classmethod
    def build(
        cls,
        expected_spiffe_id: str,
        key: ec.EllipticCurvePrivateKey,
        chain_pem: bytes,
        bundle_pem: bytes,
        source: str,
        *,
        check_expiry: bool = True,
    ) -> Svid:
        """Check that chain_pem is an SVID for expected_spiffe_id, for key, verifying to bundle_pem.

        The agent checks what the CA sends instead of trusting it: a CA bug
        that issued the wrong name or the wrong key must not reach Envoy.
        """
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as err:
            raise SvidError(f"{source}: certificate chain is not PEM: {err}") from err
        leaf = chain[0]
        got_id = leaf_spiffe_id(leaf)
        if got_id != expected_spiffe_id:
            raise SvidError(f"{source}: certificate is for '{got_id}', expected '{expected_spiffe_id}'")
        if leaf.public_key() != key.public_key():
            raise SvidError(f"{source}: certificate serial {serial_hex(leaf)} does not match our private key")
        roots = load_bundle(bundle_pem, f"{source} bundle")
        if len(chain) > 1:
            issuer: x509.Certificate | None = chain[1]
        else:
            issuer = next((r for r in roots if r.subject == leaf.issuer), None)
            if issuer is None:
                raise SvidError(f"{source}: no root in the bundle issued certificate serial {serial_hex(leaf)}")
        trust_domain = expected_spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        when = datetime.now(timezone.utc)
        if not check_expiry and when >= leaf.not_valid_after_utc:
            # An expired SVID is still loaded from disk, to report it and to
            # keep trying: check everything but the expiry.
            when = leaf.not_valid_before_utc
        try:
            verify_svid_chain(chain, roots, trust_domain, when)
        except SvidError as err:
            raise SvidError(f"{source}: {err}") from err
        assert issuer is not None
        return cls(spiffe_id=got_id, key=key, chain=chain, authority=fingerprint(issuer))


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_svid(data_dir: Path, svid: Svid, name: str = SVID_FILE) -> None:
    """Persist key + chain (0600), replaced atomically."""
    _atomic_write(data_dir / name, svid.key_pem + svid.chain_pem, 0o600)


def save_bundle(data_dir: Path, bundle_pem: bytes) -> None:
    _atomic_write(data_dir / BUNDLE_FILE, bundle_pem, 0o644)


def load_persisted_svid(data_dir: Path, spiffe_id: str, name: str = SVID_FILE) -> Svid | None:
    """The SVID a previous run left in data_dir/name, even if expired; None if there is none.

    Raises SvidError if the files exist but do not hold a usable SVID for spiffe_id.
    """
    path = data_dir / name
    if not path.exists():
        return None
    data = path.read_bytes()
    key_blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) == b"PRIVATE KEY"]
    cert_blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) == b"CERTIFICATE"]
    if len(key_blocks) != 1 or not cert_blocks:
        raise SvidError(f"{path} must hold one PRIVATE KEY and at least one CERTIFICATE block")
    try:
        key = serialization.load_pem_private_key(key_blocks[0], password=None)
    except ValueError as err:
        raise SvidError(f"{path}: private key does not parse: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SvidError(f"{path}: private key is {type(key).__name__}, expected EC")
    bundle_path = data_dir / BUNDLE_FILE
    if not bundle_path.exists():
        raise SvidError(f"{path} exists but {bundle_path} does not")
    return Svid.build(spiffe_id, key, b"".join(cert_blocks), bundle_path.read_bytes(), str(path), check_expiry=False)
