"""Signing authorities, the trust bundle, and the X509-SVID profile.

An *authority* is a key and certificate that sign SVIDs, plus the chain from
it up to a trust anchor (a root in the bundle). The local CA's authorities
are self-signed roots; in ACM PCA upstream mode they are intermediates that
PCA signed. Authorities live in an AuthorityStore, one directory:

    <dir>/                   0700
    <dir>/authorities.json   0644  which authority is active, prepared, retiring
    <dir>/<id>/              0700  one per authority (<id>: first 16 hex digits of its fingerprint)
    <dir>/<id>/key.pem       0600  PKCS#8; deleted when the authority stops signing
    <dir>/<id>/cert.pem      0644  its certificate, then any chain up to and including the anchor

The roles follow SPIRE's CA manager and Istio's root rotation: a *prepared*
authority is already in the trust bundle but signs nothing, so every peer
trusts it before the first certificate it signs exists; *activating* it
switches issuance and destroys the old key; the old authority stays in the
bundle (*retiring*) until every peer holds a new certificate, then is
*retired* (removed from the bundle).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from pki.errors import CaStateError, InvalidSpiffeIdError, SvidError
from pki.spiffe_ids import parse_spiffe_id

log = logging.getLogger("pki.authority")

# NotBefore is set this far in the past so that a peer whose clock runs a few
# seconds behind ours still accepts a certificate issued "now" (SPIRE's CA
# backdates by the same amount).
BACKDATE = timedelta(seconds=10)
ROOT_VALIDITY = timedelta(days=365)
STATE_FILE = "authorities.json"

AuthorityKey = ec.EllipticCurvePrivateKey
# Creates the certificate (and chain up to the anchor) for a new authority key:
# self-signed for the local CA, signed by PCA in upstream mode.
AuthorityFactory = Callable[[AuthorityKey], list[x509.Certificate]]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: how status files and logs name a CA certificate."""
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as Envoy's admin /certs prints it: big-endian bytes, lowercase hex.

    BoringSSL's BN_bn2hex drops leading zero *bytes* but keeps two digits per
    byte, so 0x0abc prints as "0abc", not "abc".
    """
    n = cert.serial_number
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big").hex()


def pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def random_serial() -> int:
    # 128 random bits (RFC 5280 allows up to 20 octets; CA/B asks for >= 64
    # bits of entropy). Zero is not a valid serial.
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _signature_hash(key: object) -> hashes.SHA256:
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return hashes.SHA256()
    raise CaStateError(f"an authority key must be EC or RSA, not {type(key).__name__}")


LEAF_KEY_USAGE = x509.KeyUsage(
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

CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _key_identifiers(builder: x509.CertificateBuilder, public_key: CertificatePublicKeyTypes, issuer: x509.Certificate) -> x509.CertificateBuilder:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        issuer_key = issuer.public_key()
        assert isinstance(issuer_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
    return builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
    ).add_extension(aki, critical=False)


def self_signed_root(key: AuthorityKey, trust_domain: str, now: datetime | None = None) -> x509.Certificate:
    """A local CA root for trust_domain: pathLen 0 (it signs leaves, never another CA)."""
    when = now or _utcnow()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ShopMesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ShopMesh root CA {trust_domain} {when:%Y-%m-%dT%H:%M:%S}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(when - BACKDATE)
        .not_valid_after(when + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        # The SPIFFE spec recommends the trust domain's ID as the CA's URI SAN.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Authority:
    """A certificate that signs SVIDs, its key while it may sign, and its chain to the trust anchor."""

    cert: x509.Certificate
    key: AuthorityKey | None
    # Certificates above `cert`, ending with the trust anchor; empty when
    # `cert` is itself a root in the bundle.
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def id(self) -> str:
        return self.fingerprint[:16]

    @property
    def anchor(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.cert

    @property
    def leaf_intermediates(self) -> list[x509.Certificate]:
        """What a leaf's chain carries after the leaf: this authority and any CA between it and the anchor."""
        return [self.cert, *self.chain[:-1]] if self.chain else []

    def _signing_key(self) -> AuthorityKey:
        if self.key is None:
            raise CaStateError(f"authority {self.id} no longer signs (its key was destroyed at rotation)")
        return self.key

    def _validity(self, ttl: timedelta, now: datetime | None) -> tuple[datetime, datetime]:
        when = now or _utcnow()
        not_after = min(when + ttl, self.cert.not_valid_after_utc)
        if not_after <= when:
            raise CaStateError(f"authority {self.id} expired at {self.cert.not_valid_after_utc.isoformat()}: cannot issue")
        return when - BACKDATE, not_after

    def sign_svid(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, ttl: timedelta, now: datetime | None = None
    ) -> x509.Certificate:
        """An X509-SVID (ACCEPTANCE row 1) for public_key, never outliving this authority."""
        key = self._signing_key()
        not_before, not_after = self._validity(ttl, now)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            # Our subject (O=SPIFFE) is not empty, so RFC 5280 does not
            # require the SAN to be critical.
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        )
        return _key_identifiers(builder, public_key, self.cert).sign(key, _signature_hash(key))

    def sign_server_certificate(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, dns_names: list[str], ttl: timedelta
    ) -> x509.Certificate:
        """A TLS server certificate (URI SAN plus DNS names) for the CA server itself. Not an SVID."""
        key = self._signing_key()
        not_before, not_after = self._validity(ttl, None)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe_id), *(x509.DNSName(d) for d in dns_names)]
                ),
                critical=False,
            )
        )
        return _key_identifiers(builder, public_key, self.cert).sign(key, _signature_hash(key))


# --- the X509-SVID profile and chain verification ---------------------------------


def svid_profile_problems(cert: x509.Certificate) -> list[str]:
    """How cert departs from the X509-SVID leaf profile (ACCEPTANCE row 1); empty if it conforms.

    Checked on everything we sign in tests, and by the CA server on every leaf
    ACM PCA returns, so a template that drops an extension is caught before
    the certificate reaches an agent.
    """
    problems = []
    ext = cert.extensions
    try:
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or len(names) != 1:
            problems.append(f"has {len(uris)} URI SAN(s) among {len(names)} name(s); an SVID has exactly one, a URI")
    except x509.ExtensionNotFound:
        problems.append("has no subjectAltName")
    try:
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        if bc.value.ca:
            problems.append("is a CA certificate (basicConstraints cA=true)")
        if not bc.critical:
            problems.append("basicConstraints is not critical")
    except x509.ExtensionNotFound:
        problems.append("has no basicConstraints")
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage)
        if not ku.critical:
            problems.append("keyUsage is not critical")
        if not ku.value.digital_signature:
            problems.append("keyUsage lacks digitalSignature")
        if ku.value.key_cert_sign or ku.value.crl_sign:
            problems.append("keyUsage allows keyCertSign or cRLSign")
    except x509.ExtensionNotFound:
        problems.append("has no keyUsage")
    try:
        eku = set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
        missing = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - eku
        if missing:
            problems.append("extendedKeyUsage lacks " + " and ".join(sorted(o._name for o in missing)))
    except x509.ExtensionNotFound:
        problems.append("has no extendedKeyUsage")
    return problems


def ca_profile_problems(cert: x509.Certificate) -> list[str]:
    """How cert departs from an X509-SVID signing certificate (a CA: cA=true, keyCertSign)."""
    problems = []
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        if not bc.value.ca:
            problems.append("basicConstraints cA is false")
        if not bc.critical:
            problems.append("basicConstraints is not critical")
    except x509.ExtensionNotFound:
        problems.append("has no basicConstraints")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        if not ku.value.key_cert_sign:
            problems.append("keyUsage lacks keyCertSign")
        if not ku.critical:
            problems.append("keyUsage is not critical")
    except x509.ExtensionNotFound:
        problems.append("has no keyUsage")
    return problems


def leaf_spiffe_id(cert: x509.Certificate) -> str:
    """The single URI SAN of an SVID; raises SvidError if there is not exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise SvidError(f"certificate serial {serial_hex(cert)} has no subjectAltName") from err
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidError(f"certificate serial {serial_hex(cert)} has {len(uris)} URI SANs, an SVID has exactly one")
    return uris[0]


def verify_svid_chain(
    chain: list[x509.Certificate],
    bundle: list[x509.Certificate],
    trust_domain: str,
    now: datetime | None = None,
    intermediates: list[x509.Certificate] | None = None,
) -> str:
    """Check that chain[0] is an unexpired X509-SVID of trust_domain that chains to a root of bundle.

    chain[1:] and intermediates may supply the CA certificates between the
    leaf and the bundle. Returns the SPIFFE ID; raises SvidError naming the
    serial and the reason.
    """
    if not chain:
        raise SvidError("empty certificate chain")
    leaf = chain[0]
    when = now or _utcnow()
    serial = serial_hex(leaf)
    if not bundle:
        raise SvidError("the trust bundle is empty")
    if when < leaf.not_valid_before_utc:
        raise SvidError(f"certificate serial {serial} is not valid before {leaf.not_valid_before_utc.isoformat()}")
    if when >= leaf.not_valid_after_utc:
        raise SvidError(f"certificate serial {serial} expired at {leaf.not_valid_after_utc.isoformat()}")
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as err:
        raise SvidError(f"certificate serial {serial} has no basicConstraints") from err
    if bc.ca:
        raise SvidError(f"certificate serial {serial} is a CA certificate, not an SVID")
    spiffe_id = leaf_spiffe_id(leaf)
    try:
        parse_spiffe_id(spiffe_id, trust_domain)
    except InvalidSpiffeIdError as err:
        raise SvidError(f"certificate serial {serial}: {err}") from err
    verifier = PolicyBuilder().store(Store(bundle)).time(when).build_client_verifier()
    try:
        verifier.verify(leaf, [*chain[1:], *(intermediates or [])])
    except VerificationError as err:
        raise SvidError(
            f"certificate serial {serial} (issuer '{leaf.issuer.rfc4514_string()}') "
            f"does not chain to the trust bundle: {err}"
        ) from err
    return spiffe_id


def load_bundle(pem_bytes: bytes, source: str) -> list[x509.Certificate]:
    """Parse a PEM trust bundle; raise SvidError naming source unless it holds only CA certificates."""
    try:
        roots = x509.load_pem_x509_certificates(pem_bytes)
    except ValueError as err:
        raise SvidError(f"{source} is not a PEM certificate bundle: {err}") from err
    for root in roots:
        try:
            is_ca = root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise SvidError(f"{source} holds certificate serial {serial_hex(root)}, which is not a CA")
    return roots


def bundle_fingerprints(pem_bytes: bytes) -> list[str]:
    """The fingerprints of a PEM bundle's certificates, sorted (what status files report)."""
    try:
        return sorted(fingerprint(c) for c in x509.load_pem_x509_certificates(pem_bytes))
    except ValueError:
        return []


# --- persistence --------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write data to path atomically, with mode from the first byte. exclusive: never replace a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if exclusive:
            # link() fails if the target exists: a key is never overwritten.
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_public_file(path: Path, data: bytes) -> None:
    _write_file(path, data, 0o644)


def _private_key_pem(key: AuthorityKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_private_key(path: Path) -> AuthorityKey:
    """Load an authority key; refuse one that others can read (ACCEPTANCE row 5)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CaStateError(f"{path} has mode {mode:04o}: a CA key must be readable by its owner only (chmod 600)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as err:
        raise CaStateError(f"{path} is not a PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaStateError(f"{path} holds a {type(key).__name__}, expected an EC key")
    return key


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialize changes to a store between processes (the CA server, the CLI, tests)."""
    fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class AuthorityState:
    """The authorities of a store: one active, at most one prepared, any number retiring."""

    active: Authority
    prepared: Authority | None = None
    retiring: tuple[Authority, ...] = ()

    def all(self) -> list[Authority]:
        return [self.active, *([self.prepared] if self.prepared else []), *self.retiring]

    def bundle(self) -> list[x509.Certificate]:
        """Every trust anchor peers must accept now, active first, without duplicates."""
        seen: dict[str, x509.Certificate] = {}
        for authority in self.all():
            seen.setdefault(fingerprint(authority.anchor), authority.anchor)
        return list(seen.values())

    def intermediates(self) -> list[x509.Certificate]:
        return [c for a in self.all() for c in a.leaf_intermediates]


@dataclass
class AuthorityStore:
    """Authorities persisted in one directory; every change is made under a file lock."""

    directory: Path
    factory: AuthorityFactory
    description: str = "CA"
    _cache: dict[str, Authority] = field(default_factory=dict)

    def _read_state_file(self) -> dict[str, object] | None:
        try:
            doc = json.loads((self.directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as err:
            raise CaStateError(f"{self.directory / STATE_FILE} is not JSON: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("active"), str):
            raise CaStateError(f"{self.directory / STATE_FILE} names no active authority")
        return doc

    def _write_state(self, state: AuthorityState) -> None:
        doc = {
            "active": state.active.id,
            "prepared": state.prepared.id if state.prepared else None,
            "retiring": [a.id for a in state.retiring],
        }
        write_public_file(self.directory / STATE_FILE, json.dumps(doc, indent=2).encode() + b"\n")

    def _load_authority(self, ident: str, role: str) -> Authority:
        adir = self.directory / ident
        try:
            certs = x509.load_pem_x509_certificates((adir / "cert.pem").read_bytes())
        except (FileNotFoundError, ValueError) as err:
            raise CaStateError(f"authority {ident}: {adir / 'cert.pem'} is missing or not PEM: {err}") from err
        key: AuthorityKey | None = None
        key_path = adir / "key.pem"
        if key_path.exists():
            key = load_private_key(key_path)
            if key.public_key() != certs[0].public_key():
                raise CaStateError(f"{adir / 'cert.pem'} does not belong to the key in {key_path}")
        elif role in ("active", "prepared"):
            raise CaStateError(
                f"the {role} authority {ident} has no key ({key_path}); restore it, "
                f"or move {self.directory} away to start a new CA"
            )
        return Authority(cert=certs[0], key=key, chain=tuple(certs[1:]))

    def _new_authority(self) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        certs = self.factory(key)
        authority = Authority(cert=certs[0], key=key, chain=tuple(certs[1:]))
        adir = self.directory / authority.id
        adir.mkdir(mode=0o700)
        _write_file(adir / "key.pem", _private_key_pem(key), 0o600, exclusive=True)
        write_public_file(adir / "cert.pem", pem(certs))
        log.info(
            "%s: new authority %s (%s), valid until %s",
            self.description,
            authority.id,
            authority.cert.subject.rfc4514_string(),
            authority.cert.not_valid_after_utc.isoformat(),
        )
        return authority

    def _read(self) -> AuthorityState | None:
        doc = self._read_state_file()
        if doc is None:
            return None
        prepared = doc.get("prepared")
        retiring = doc.get("retiring") or []
        assert isinstance(retiring, list)
        return AuthorityState(
            active=self._load_authority(str(doc["active"]), "active"),
            prepared=self._load_authority(str(prepared), "prepared") if prepared else None,
            retiring=tuple(self._load_authority(str(r), "retiring") for r in retiring),
        )

    def _prepare_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)

    def load(self, *, create: bool = True) -> AuthorityState:
        """The current state; with create, make a first active authority if there is none."""
        self._prepare_dir()
        with locked(self.directory):
            state = self._read()
            if state is None:
                if not create:
                    raise CaStateError(f"no CA in {self.directory}")
                state = AuthorityState(active=self._new_authority())
                self._write_state(state)
        return state

    def prepare(self) -> AuthorityState:
        """Create the next authority (in the bundle, not signing); idempotent while one is prepared."""
        self._prepare_dir()
        with locked(self.directory):
            state = self._require()
            if state.prepared is None:
                state = AuthorityState(state.active, self._new_authority(), state.retiring)
                self._write_state(state)
        return state

    def activate(self) -> AuthorityState:
        """Switch issuance to the prepared authority; destroy the old key; keep the old root trusted."""
        with locked(self.directory):
            state = self._require()
            if state.prepared is None:
                raise CaStateError(f"{self.description}: no prepared authority to activate; prepare one first")
            old = state.active
            state = AuthorityState(
                active=state.prepared,
                prepared=None,
                retiring=(*state.retiring, Authority(cert=old.cert, key=None, chain=old.chain)),
            )
            self._write_state(state)
            # The old authority must never sign again: without its key it cannot.
            (self.directory / old.id / "key.pem").unlink(missing_ok=True)
            log.info("%s: authority %s now signs; %s retiring (key destroyed)", self.description, state.active.id, old.id)
        return state

    def retire(self) -> AuthorityState:
        """Drop every retiring authority from the bundle (their leaves stop verifying)."""
        with locked(self.directory):
            state = self._require()
            if not state.retiring:
                raise CaStateError(f"{self.description}: no retiring authority; activate a prepared one first")
            for old in state.retiring:
                log.info("%s: authority %s retired, removed from the trust bundle", self.description, old.id)
            state = AuthorityState(state.active, state.prepared, ())
            self._write_state(state)
        return state

    def _require(self) -> AuthorityState:
        state = self._read()
        if state is None:
            raise CaStateError(f"no CA in {self.directory}")
        return state
