"""The local CA as a library: SVID conformance (ACCEPTANCE rows 1, 2, 5, 25, 26), key storage, rotation, reload."""

from __future__ import annotations

import os
import re
import stat
import subprocess
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

from pki.authority import ca_profile_problems, fingerprint, svid_profile_problems, verify_svid_chain
from pki.ca import BACKDATE, LocalCA, local_store, serial_hex
from pki.durations import parse_duration
from pki.errors import CaStateError, CsrError, DurationError, InvalidSpiffeIdError, SvidError
from pki.spiffe_ids import agent_id_for, workload_id_for_agent
from pki.testing import key_pem, make_csr
from pki.tokens import JoinTokenStore
from shopmesh.cli import DEFAULT_STATE_DIR

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


def _key_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "ca" / "local").glob("*/key.pem"))


def test_root_key_is_private_and_reload_gives_the_same_root(tmp_path: Path) -> None:
    first = LocalCA.load_or_create(tmp_path)
    [key_path] = _key_files(tmp_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ca" / "local").stat().st_mode) == 0o700
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
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
    [key_path] = _key_files(tmp_path)
    os.chmod(key_path, 0o644)
    with pytest.raises(CaStateError, match="mode 0644"):
        LocalCA.load_or_create(tmp_path)


def test_a_root_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path)
    [key_path] = _key_files(tmp_path)
    key_path.unlink()
    with pytest.raises(CaStateError, match="has no key"):
        LocalCA.load_or_create(tmp_path)


# --- row 1 for what we sign, and the CA certificates ------------------------------------


def test_issued_svids_pass_the_profile_check_and_py_spiffe(ca: LocalCA, key: ec.EllipticCurvePrivateKey) -> None:
    chain_pem, _ = ca.issue_svid(make_csr(key, ORDERS), ORDERS, TTL)
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    assert svid_profile_problems(leaf) == []
    assert ca_profile_problems(ca.root_cert) == []
    svid = X509Svid.parse(chain_pem.encode(), key_pem(key))
    assert str(svid.spiffe_id) == ORDERS


def test_the_profile_check_names_each_defect(ca: LocalCA) -> None:
    """A certificate that is a CA, lacks key usage and has two names fails, saying why."""
    assert "is a CA certificate (basicConstraints cA=true)" in svid_profile_problems(ca.root_cert)
    k = ec.generate_private_key(ec.SECP256R1())
    no_usage = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_cert.subject)
        .public_key(k.public_key())
        .serial_number(7)
        .not_valid_before(datetime.now(timezone.utc))
        .not_valid_after(datetime.now(timezone.utc) + TTL)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ORDERS), x509.DNSName("orders")]), critical=True
        )
        .sign(ca.root_key, hashes.SHA256())
    )
    problems = svid_profile_problems(no_usage)
    assert "has 1 URI SAN(s) among 2 name(s); an SVID has exactly one, a URI" in problems
    assert "has no basicConstraints" in problems and "has no keyUsage" in problems
    assert "has no extendedKeyUsage" in problems
    assert ca_profile_problems(no_usage) == ["has no basicConstraints", "has no keyUsage"]


# --- CA rotation, as a library (row 26) ----------------------------------------------


def test_rotation_prepares_then_switches_then_retires(tmp_path: Path) -> None:
    store = local_store(tmp_path)
    old = store.load()
    key = ec.generate_private_key(ec.SECP256R1())
    old_leaf = old.active.sign_svid(key.public_key(), ORDERS, TTL)

    prepared = store.prepare()
    assert prepared.active.fingerprint == old.active.fingerprint, "prepare does not switch issuance"
    assert prepared.prepared is not None
    assert [fingerprint(c) for c in prepared.bundle()] == [old.active.fingerprint, prepared.prepared.fingerprint]
    again = store.prepare()
    assert again.prepared is not None and again.prepared.fingerprint == prepared.prepared.fingerprint, "prepare is idempotent"

    activated = store.activate()
    assert activated.active.fingerprint == prepared.prepared.fingerprint
    assert [a.fingerprint for a in activated.retiring] == [old.active.fingerprint]
    assert not (tmp_path / "ca" / "local" / old.active.id / "key.pem").exists(), "the old key is destroyed"
    new_leaf = activated.active.sign_svid(key.public_key(), ORDERS, TTL)
    # Overlap: leaves of both CAs verify against the bundle.
    for leaf in (old_leaf, new_leaf):
        assert verify_svid_chain([leaf], activated.bundle(), "shopmesh.internal") == ORDERS
    with pytest.raises(CaStateError, match="no longer signs"):
        activated.retiring[0].sign_svid(key.public_key(), ORDERS, TTL)

    retired = store.retire()
    assert [fingerprint(c) for c in retired.bundle()] == [activated.active.fingerprint]
    assert verify_svid_chain([new_leaf], retired.bundle(), "shopmesh.internal") == ORDERS
    with pytest.raises(SvidError, match="does not chain to the trust bundle"):
        verify_svid_chain([old_leaf], retired.bundle(), "shopmesh.internal")
    # LocalCA (what tests use to mint certificates) follows the active root.
    assert LocalCA.load_or_create(tmp_path).root_cert == retired.active.cert


def test_rotation_steps_out_of_order_are_refused(tmp_path: Path) -> None:
    store = local_store(tmp_path)
    store.load()
    with pytest.raises(CaStateError, match="no prepared authority to activate"):
        store.activate()
    with pytest.raises(CaStateError, match="no retiring authority"):
        store.retire()


# --- agent identities -----------------------------------------------------------------


def test_agent_ids_map_to_exactly_one_workload() -> None:
    agent = agent_id_for(ORDERS)
    assert agent == "spiffe://shopmesh.internal/shopmesh/agent/ns/shop/sa/orders"
    assert workload_id_for_agent(agent) == ORDERS
    assert workload_id_for_agent(ORDERS) is None, "a workload SVID is not an agent SVID"
    assert workload_id_for_agent("spiffe://shopmesh.internal/shopmesh/ca-server") is None
    assert workload_id_for_agent("spiffe://shopmesh.internal/shopmesh/agent/shopmesh/agent/x") is None


@pytest.mark.parametrize(
    "spiffe_id",
    ["spiffe://shopmesh.internal/shopmesh/agent/ns/shop/sa/orders", "spiffe://shopmesh.internal/shopmesh/ca-server"],
)
def test_control_plane_ids_are_reserved(tmp_path: Path, spiffe_id: str) -> None:
    with pytest.raises(InvalidSpiffeIdError, match="reserved for the mesh's control plane"):
        JoinTokenStore(tmp_path).create_join_token(spiffe_id)


# --- row 5: keys never under version control -------------------------------------------


REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)


def test_no_private_key_is_under_version_control() -> None:
    listed = _git("ls-files", "-z")
    if listed.returncode != 0:
        pytest.fail(f"row 5 is checked against git, which cannot list this tree: {listed.stderr.strip()} "
                    "(run the tests from a `git clone` of the project, with git installed)")
    offenders = []
    for name in filter(None, listed.stdout.split("\0")):
        path = REPO / name
        if path.is_file() and b"PRIVATE KEY-----" in path.read_bytes():
            offenders.append(name)
    # This file and the modules that write keys name the marker in code, not as a key.
    assert [o for o in offenders if not o.endswith(".py") and not o.endswith(".md")] == []
    for name in offenders:
        assert re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\s*\n[A-Za-z0-9+/=]{40,}", (REPO / name).read_bytes()) is None, name


def test_the_state_directory_is_ignored_by_git() -> None:
    inside = _git("rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0:
        pytest.fail(f"row 5 is checked against git, which cannot read this tree: {inside.stderr.strip()} "
                    "(run the tests from a `git clone` of the project, with git installed)")
    assert DEFAULT_STATE_DIR.name == ".state"
    for path in (".state/ca/local/0123456789abcdef/key.pem", ".state/pods/orders/agent/svid.pem", ".state/ca/ca.db"):
        assert _git("check-ignore", "-q", path).returncode == 0, f"{path} would not be ignored by git"


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
