"""The local CA as a library: SVID conformance (ACCEPTANCE rows 1, 2, 5, 25), key storage, reload."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import X509Svid

from pki.ca import BACKDATE, LocalCA, serial_hex
from pki.durations import parse_duration
from pki.errors import CaStateError, CsrError, DurationError, InvalidSpiffeIdError, SvidError
from pki.testing import key_pem, make_csr

ORDERS = "spiffe://shopmesh.internal/ns/shop/sa/orders"
TTL = timedelta(minutes=5)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue(ca: LocalCA, key: ec.EllipticCurvePrivateKey, spiffe_id: str = ORDERS) -> x509.Certificate:
    chain_pem, _ = ca.issue_svid(make_csr(key, spiffe_id), spiffe_id, TTL)
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    assert len(chain) == 1, "the root signs leaves directly: the chain is the leaf alone"
    return chain[0]


def test_issued_svid_conforms_to_x509_svid(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    leaf = issue(ca, key)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [ORDERS]
    assert list(san.value) == [x509.UniformResourceIdentifier(ORDERS)], "exactly one name, a URI"

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False

    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.public_key() == key.public_key()
    assert 0 < leaf.serial_number < 2**128


def test_chain_verifies_to_the_bundle(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    chain_pem, bundle_pem = ca.issue_svid(make_csr(key, ORDERS), ORDERS, TTL)
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    roots = x509.load_pem_x509_certificates(bundle_pem.encode())

    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(ORDERS)]

    # py-spiffe's own X509-SVID checks accept it too.
    svid = X509Svid.parse(chain_pem.encode(), key_pem(key))
    assert str(svid.spiffe_id) == ORDERS

    # ...and a different root does not verify it.
    other = LocalCA.load_or_create(ca.state_dir / "other")
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(Store([other.root_cert])).build_client_verifier().verify(leaf, [])


def test_root_is_a_spiffe_ca(ca: LocalCA) -> None:
    root = ca.root_cert
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://shopmesh.internal"]
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"


def test_serials_are_unique(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    serials = {issue(ca, key).serial_number for _ in range(50)}
    assert len(serials) == 50


def test_not_before_is_backdated_and_not_after_is_now_plus_ttl(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    leaf = issue(ca, key)
    after = datetime.now(timezone.utc)
    # A peer whose clock is a few seconds behind still accepts it (row 25).
    assert leaf.not_valid_before_utc <= before - BACKDATE + timedelta(seconds=1)
    assert leaf.not_valid_before_utc < before - timedelta(seconds=5)
    assert before + TTL - timedelta(seconds=1) <= leaf.not_valid_after_utc <= after + TTL


def test_not_after_never_beyond_the_root(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    chain_pem, _ = ca.issue_svid(make_csr(key, ORDERS), ORDERS, timedelta(days=3650))
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    assert leaf.not_valid_after_utc == ca.root_cert.not_valid_after_utc


MALFORMED = {
    "uppercase trust domain": "spiffe://ShopMesh.internal/ns/shop/sa/orders",
    "uppercase scheme": "SPIFFE://shopmesh.internal/ns/shop/sa/orders",
    "port": "spiffe://shopmesh.internal:8443/ns/shop/sa/orders",
    "user info": "spiffe://admin@shopmesh.internal/ns/shop/sa/orders",
    "percent-encoding": "spiffe://shopmesh.internal/ns/shop/sa/ord%65rs",
    "dot-dot segment": "spiffe://shopmesh.internal/ns/shop/../sa/orders",
    "dot segment": "spiffe://shopmesh.internal/ns/./sa/orders",
    "empty segment": "spiffe://shopmesh.internal/ns//sa/orders",
    "trailing slash": "spiffe://shopmesh.internal/ns/shop/sa/orders/",
    "query": "spiffe://shopmesh.internal/ns/shop/sa/orders?admin=1",
    "fragment": "spiffe://shopmesh.internal/ns/shop/sa/orders#x",
    "other scheme": "https://shopmesh.internal/ns/shop/sa/orders",
    "no path": "spiffe://shopmesh.internal",
    "empty": "",
    "over 2048 bytes": "spiffe://shopmesh.internal/" + "a" * 2030,
    "other trust domain": "spiffe://evil.example/ns/shop/sa/orders",
}


@pytest.mark.parametrize("spiffe_id", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_spiffe_ids_are_refused_naming_the_input(
    ca: LocalCA, key: ec.EllipticCurvePrivateKey, spiffe_id: str
) -> None:
    with pytest.raises(InvalidSpiffeIdError) as excinfo:
        ca.issue_svid(make_csr(key, None), spiffe_id, TTL)
    message = str(excinfo.value)
    assert message.startswith(f"invalid SPIFFE ID '{spiffe_id[:60]}")
    assert len(message) < 400, "an over-long input is not repeated in full"


def test_the_2048_byte_limit_is_inclusive(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    prefix = "spiffe://shopmesh.internal/"
    longest = prefix + "a" * (2048 - len(prefix))
    assert len(longest.encode()) == 2048
    assert issue(ca, key, longest).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(InvalidSpiffeIdError, match="2049 bytes long"):
        ca.issue_svid(make_csr(key, None), longest + "a", TTL)


def test_csr_for_another_identity_is_refused(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    payments = "spiffe://shopmesh.internal/ns/shop/sa/payments"
    with pytest.raises(CsrError, match=f"CSR asks for '{payments}' but the request is for '{ORDERS}'"):
        ca.issue_svid(make_csr(key, payments), ORDERS, TTL)


def test_csr_with_extra_names_is_refused(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ORDERS), x509.DNSName("orders.example")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrError, match="orders.example"):
        ca.issue_svid(csr, ORDERS, TTL)


def test_csr_with_a_bad_signature_is_refused(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    good = x509.load_pem_x509_csr(make_csr(key, ORDERS).encode()).public_bytes(serialization.Encoding.DER)
    # Flip a bit in the last byte: the signature value.
    tampered = x509.load_der_x509_csr(good[:-1] + bytes([good[-1] ^ 0x01]))
    with pytest.raises(CsrError, match="signature does not verify"):
        ca.issue_svid(tampered.public_bytes(serialization.Encoding.PEM), ORDERS, TTL)


def test_garbage_csr_is_refused(ca: LocalCA) -> None:
    with pytest.raises(CsrError, match="not a PEM PKCS#10 request"):
        ca.issue_svid("hello", ORDERS, TTL)


@pytest.mark.parametrize(
    "weak_key",
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa-1024"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), id="secp256k1"),
        pytest.param(lambda: ed25519.Ed25519PrivateKey.generate(), id="ed25519"),
    ],
)
def test_weak_or_unsupported_keys_are_refused(ca: LocalCA, weak_key: Callable[[], Any]) -> None:
    k = weak_key()
    algorithm = None if isinstance(k, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(k, algorithm)
    with pytest.raises(CsrError, match="CSR key"):
        ca.issue_svid(csr.public_bytes(serialization.Encoding.PEM), ORDERS, TTL)


def test_root_key_is_private_and_reload_gives_the_same_root(tmp_path: Path) -> None:
    first = LocalCA.load_or_create(tmp_path)
    key_path = tmp_path / "ca" / "root.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert b"PRIVATE KEY" not in (tmp_path / "ca" / "root.pem").read_bytes()

    second = LocalCA.load_or_create(tmp_path)
    assert second.root_cert == first.root_cert
    assert serial_hex(second.root_cert) == serial_hex(first.root_cert)
    # A leaf from the reloaded CA verifies against the first bundle.
    k = ec.generate_private_key(ec.SECP256R1())
    leaf = issue(second, k)
    PolicyBuilder().store(Store([first.root_cert])).build_client_verifier().verify(leaf, [])


def test_a_readable_root_key_is_refused(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path)
    key_path = tmp_path / "ca" / "root.key"
    os.chmod(key_path, 0o644)
    with pytest.raises(CaStateError, match="mode 0644"):
        LocalCA.load_or_create(tmp_path)


def test_a_root_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path)
    (tmp_path / "ca" / "root.key").unlink()
    with pytest.raises(CaStateError, match="root.key does not"):
        LocalCA.load_or_create(tmp_path)


def test_an_expired_svid_is_refused_by_verify(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    chain_pem, _ = ca.issue_svid(make_csr(key, ORDERS), ORDERS, timedelta(seconds=30), now=an_hour_ago)
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    with pytest.raises(SvidError, match="expired at"):
        ca.verify_peer_svid(leaf)
    assert ca.verify_peer_svid(issue(ca, key)) == ORDERS


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5m", 300), ("1h", 3600), ("90", 90), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "0", "-5s", "10x", "s", "5 m", "1h-1m", "0s"])
def test_parse_duration_refuses_naming_the_input(text: str) -> None:
    with pytest.raises(DurationError, match=f"invalid duration '{text}'"):
        parse_duration(text)
