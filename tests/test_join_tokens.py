"""Join tokens through the real CA server over gRPC (ACCEPTANCE row 3): single use, expiry, identity binding."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pki import db
from pki.errors import InvalidSpiffeIdError, JoinTokenError
from pki.testing import CaServer, make_csr, run_ca_server, sync_ca_channel
from pki.tokens import JoinTokenStore
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc

Stub = ca_pb2_grpc.CertificateAuthorityStub

ORDERS = "spiffe://shopmesh.internal/ns/shop/sa/orders"
PAYMENTS = "spiffe://shopmesh.internal/ns/shop/sa/payments"
SEARCH = "spiffe://shopmesh.internal/ns/shop/sa/search"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    with run_ca_server(tmp_path_factory.mktemp("state"), ttl="1m") as server:
        yield server


@pytest.fixture(scope="module")
def tokens(ca: CaServer) -> JoinTokenStore:
    # A second process-independent handle on ca.db, as the runner has while the server runs.
    return JoinTokenStore(ca.state_dir)


@pytest.fixture
def stub(ca: CaServer) -> Iterator[Stub]:
    with sync_ca_channel(ca.join_address, ca.bundle_path.read_bytes()) as channel:
        yield ca_pb2_grpc.CertificateAuthorityStub(channel)


def join(
    stub: Stub, token: str, spiffe_id: str, csr: str | None = None, agent_csr: str | None = None
) -> ca_pb2.SvidResponse:
    key = ec.generate_private_key(ec.SECP256R1())
    agent_key = ec.generate_private_key(ec.SECP256R1())
    request = ca_pb2.JoinRequest(
        join_token=token,
        spiffe_id=spiffe_id,
        csr_pem=csr or make_csr(key, spiffe_id),
        agent_csr_pem=make_csr(agent_key, None) if agent_csr is None else agent_csr,
    )
    response: ca_pb2.SvidResponse = stub.Join(request, timeout=5)
    return response


def refused(stub: Stub, token: str, spiffe_id: str, csr: str | None = None, agent_csr: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        join(stub, token, spiffe_id, csr, agent_csr)
    return excinfo.value


def issued(ca: CaServer, spiffe_id: str) -> list[str]:
    return db.issued_serials(ca.state_dir, spiffe_id)


def test_a_valid_token_gets_an_svid_for_its_identity(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    before = issued(ca, ORDERS)
    response = join(stub, tokens.create_join_token(ORDERS), ORDERS)
    leaf = x509.load_pem_x509_certificate(response.cert_chain_pem.encode())
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [ORDERS]
    assert response.bundle_pem == ca.bundle_path.read_text()
    assert issued(ca, ORDERS) == [*before, response.serial]


def test_a_token_used_twice_is_refused_the_second_time(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    token = tokens.create_join_token(ORDERS)
    join(stub, token, ORDERS)
    count = len(issued(ca, ORDERS))

    err = refused(stub, token, ORDERS)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in err.details()
    assert token not in err.details(), "the token itself is never echoed"
    assert len(issued(ca, ORDERS)) == count, "nothing issued"


def test_an_expired_token_is_refused(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    before = issued(ca, ORDERS)
    token = tokens.create_join_token(ORDERS, ttl_s=60, now=time.time() - 120)
    err = refused(stub, token, ORDERS)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired at" in err.details()
    assert issued(ca, ORDERS) == before


def test_a_token_for_another_identity_is_refused_and_not_spent(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    token = tokens.create_join_token(ORDERS)
    err = refused(stub, token, PAYMENTS)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"was issued for '{ORDERS}', not for '{PAYMENTS}'" in err.details()
    assert issued(ca, PAYMENTS) == []
    # The rightful owner can still use it: a misdirected attempt does not burn it.
    join(stub, token, ORDERS)


def test_a_csr_for_another_identity_is_refused(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    token = tokens.create_join_token(ORDERS)
    other_csr = make_csr(ec.generate_private_key(ec.SECP256R1()), PAYMENTS)
    err = refused(stub, token, ORDERS, csr=other_csr)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CSR asks for" in err.details()
    assert issued(ca, PAYMENTS) == []
    # A rejected request did not spend the token.
    join(stub, token, ORDERS)


@pytest.mark.parametrize(
    ("token", "expected"),
    [("", "no join token given"), ("x" * 43, "unknown to this CA"), ("y" * 5000, "tokens are 43")],
    ids=["empty", "unknown", "huge"],
)
def test_unknown_tokens_are_refused(ca: CaServer, stub: Stub, token: str, expected: str) -> None:
    before = issued(ca, ORDERS)
    err = refused(stub, token, ORDERS)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expected in err.details()
    assert issued(ca, ORDERS) == before


def test_a_malformed_spiffe_id_is_refused_before_the_token_is_looked_at(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    bad = "spiffe://shopmesh.internal/ns/shop/sa/orders/"
    err = refused(stub, tokens.create_join_token(ORDERS), bad, csr=make_csr(ec.generate_private_key(ec.SECP256R1()), None))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"invalid SPIFFE ID '{bad}'")


@pytest.mark.parametrize(
    "reserved",
    ["spiffe://shopmesh.internal/shopmesh/ca-server", "spiffe://shopmesh.internal/shopmesh/agent/ns/shop/sa/orders"],
    ids=["ca-server", "agent"],
)
def test_control_plane_identities_cannot_be_joined(ca: CaServer, tokens: JoinTokenStore, stub: Stub, reserved: str) -> None:
    token = tokens.create_join_token(ORDERS)
    before = issued(ca, reserved)
    err = refused(stub, token, reserved)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved for the mesh's control plane" in err.details()
    assert issued(ca, reserved) == before
    join(stub, token, ORDERS)  # not spent


def test_join_hands_out_a_workload_svid_and_an_agent_svid(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    response = join(stub, tokens.create_join_token(SEARCH), SEARCH)
    agent_id = "spiffe://shopmesh.internal/shopmesh/agent/ns/shop/sa/search"
    assert response.agent_spiffe_id == agent_id
    workload = x509.load_pem_x509_certificate(response.cert_chain_pem.encode())
    agent = x509.load_pem_x509_certificate(response.agent_cert_chain_pem.encode())
    assert agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [agent_id]
    assert agent.public_key() != workload.public_key()
    # The agent SVID outlives the workload SVID (TTL 1m here): max(1h, 30 × TTL).
    agent_life = agent.not_valid_after_utc - agent.not_valid_before_utc
    assert agent_life >= timedelta(hours=1)
    assert issued(ca, agent_id)[-1] == response.agent_serial
    assert issued(ca, SEARCH)[-1] == response.serial


def test_join_without_an_agent_csr_is_refused_and_the_token_kept(ca: CaServer, tokens: JoinTokenStore, stub: Stub) -> None:
    token = tokens.create_join_token(ORDERS)
    err = refused(stub, token, ORDERS, agent_csr="")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Join needs agent_csr_pem" in err.details()
    key = ec.generate_private_key(ec.SECP256R1())
    err = refused(stub, token, ORDERS, csr=make_csr(key, ORDERS), agent_csr=make_csr(key, None))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "same key" in err.details()
    err = refused(stub, token, ORDERS, agent_csr=make_csr(key, PAYMENTS))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "CSR asks for" in err.details()
    join(stub, token, ORDERS)


def test_watch_bundle_starts_with_the_current_bundle(ca: CaServer, stub: Stub) -> None:
    stream = stub.WatchBundle(ca_pb2.GetBundleRequest(), timeout=5)
    first = next(stream)
    stream.cancel()
    current = stub.GetBundle(ca_pb2.GetBundleRequest(), timeout=5)
    assert first.bundle_pem == current.bundle_pem == ca.bundle_path.read_text()
    root = x509.load_pem_x509_certificate(first.bundle_pem.encode())
    assert first.signing_authority == root.fingerprint(hashes.SHA256()).hex()


def test_concurrent_redemptions_of_one_token_issue_once(ca: CaServer, tokens: JoinTokenStore) -> None:
    token = tokens.create_join_token(PAYMENTS)
    before = len(issued(ca, PAYMENTS))

    def attempt(_: int) -> grpc.StatusCode:
        with sync_ca_channel(ca.join_address, ca.bundle_path.read_bytes()) as channel:
            try:
                join(ca_pb2_grpc.CertificateAuthorityStub(channel), token, PAYMENTS)
            except grpc.RpcError as err:
                return err.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(attempt, range(8)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 7
    assert len(issued(ca, PAYMENTS)) == before + 1


def test_renew_is_refused_on_the_join_port(ca: CaServer, stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Renew(ca_pb2.RenewRequest(csr_pem=make_csr(ec.generate_private_key(ec.SECP256R1()), ORDERS)), timeout=5)
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "mutual TLS" in excinfo.value.details()


def test_get_bundle(ca: CaServer, stub: Stub) -> None:
    assert stub.GetBundle(ca_pb2.GetBundleRequest(), timeout=5).bundle_pem == ca.bundle_path.read_text()


def test_only_the_token_hash_is_stored(tmp_path: Path) -> None:
    store = JoinTokenStore(tmp_path)
    token = store.create_join_token(ORDERS)
    for path in (tmp_path / "ca").iterdir():
        assert token.encode() not in path.read_bytes(), f"{path.name} holds the token in clear"
    assert store.redeem(token, ORDERS) == ORDERS
    with pytest.raises(JoinTokenError, match="already used"):
        store.redeem(token, ORDERS)


def test_tokens_are_only_created_for_valid_ids_of_the_trust_domain(tmp_path: Path) -> None:
    store = JoinTokenStore(tmp_path)
    with pytest.raises(InvalidSpiffeIdError, match="not this CA's trust domain"):
        store.create_join_token("spiffe://evil.example/ns/shop/sa/orders")
    with pytest.raises(JoinTokenError, match="must be greater than zero"):
        store.create_join_token(ORDERS, ttl_s=0)
