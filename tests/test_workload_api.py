"""The SPIFFE Workload API on the agent's socket, driven by py-spiffe itself (no Envoy).

py-spiffe's WorkloadApiClient and X509Source are the client a Python
workload would use: if they work unchanged against our agent, so does any
SPIFFE library, and a SPIRE agent can replace ours (or ours SPIRE's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from spiffe import SpiffeId, TrustDomain, WorkloadApiClient, X509Source

# The Workload API's generated code, as py-spiffe ships it: a raw client
# that can leave out the security header the library always sends.
from spiffe._proto import workload_pb2, workload_pb2_grpc

from pki import db
from pki.authority import serial_hex
from pki.testing import AgentProcess, CaServer, run_ca_server, start_agent, wait_for
from pki.tokens import create_join_token, write_token_file

ORDERS = "spiffe://shopmesh.internal/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, CaServer, str]]:
    """A CA issuing 4-second SVIDs (a rotation every ~2 s) and one agent; yields the agent's socket address."""
    base = tmp_path_factory.mktemp("workload-api")
    with run_ca_server(base / "state", ttl="4s") as ca:
        pod = base / "orders"
        pod.mkdir()
        write_token_file(pod / "join-token", create_join_token(ca.state_dir, ORDERS))
        proc = start_agent(ORDERS, ca, pod)
        try:
            status = proc.status_where(lambda s: s["ready"], "the first SVID")
            yield proc, ca, f"unix://{status['workload_api_socket']}"
        finally:
            proc.process.stop()


def test_status_names_the_socket(agent: tuple[AgentProcess, CaServer, str]) -> None:
    proc, _, address = agent
    status = proc.status()
    assert status is not None
    assert Path(status["workload_api_socket"]) == proc.sds_socket.resolve()
    assert address == f"unix://{proc.sds_socket.resolve()}"


def test_py_spiffe_fetches_the_workload_svid_and_bundle(agent: tuple[AgentProcess, CaServer, str]) -> None:
    _, ca, address = agent
    with WorkloadApiClient(socket_path=address, default_timeout=5) as client:
        svid = client.fetch_x509_svid()
        context = client.fetch_x509_context()
        bundles = client.fetch_x509_bundles()
    assert svid.spiffe_id == SpiffeId(ORDERS)
    # Its private key belongs to its certificate.
    assert svid.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == svid.leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # Only the workload identity: the agent SVID never leaves the agent.
    assert [str(s.spiffe_id) for s in context.x509_svids] == [ORDERS]
    root = x509.load_pem_x509_certificate(ca.bundle_path.read_bytes())
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain("shopmesh.internal"))
    assert bundle is not None
    assert [c.fingerprint(hashes.SHA256()) for c in bundle.x509_authorities] == [root.fingerprint(hashes.SHA256())]
    # A certificate this CA issued to orders (the ledger records every one).
    assert serial_hex(svid.leaf) in db.issued_serials(ca.state_dir, ORDERS)


def test_x509_source_follows_rotations(agent: tuple[AgentProcess, CaServer, str]) -> None:
    _, _, address = agent
    source = X509Source(socket_path=address, timeout_in_seconds=10)
    try:
        first = serial_hex(source.get_x509_context().default_svid.leaf)
        assert str(source.get_x509_context().default_svid.spiffe_id) == ORDERS

        def current() -> str | None:
            serial = serial_hex(source.get_x509_context().default_svid.leaf)
            return serial if serial != first else None

        rotated = wait_for(current, "X509Source to receive a rotated SVID", timeout=15)
        assert rotated != first
        assert source.get_bundle_for_trust_domain(TrustDomain("shopmesh.internal")) is not None
    finally:
        source.close()


def _raw_stub(address: str) -> tuple[grpc.Channel, workload_pb2_grpc.SpiffeWorkloadAPIStub]:
    channel = grpc.insecure_channel(address.replace("unix://", "unix:"))
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def test_a_call_without_the_security_header_is_invalid_argument(agent: tuple[AgentProcess, CaServer, str]) -> None:
    """The SPIFFE Workload API standard (and SPIRE): no `workload.spiffe.io: true`, no answer."""
    _, _, address = agent
    channel, stub = _raw_stub(address)
    with channel:
        for call in (
            lambda md: next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5, metadata=md)),
            lambda md: next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), timeout=5, metadata=md)),
        ):
            for metadata in ((), (("workload.spiffe.io", "false"),)):
                with pytest.raises(grpc.RpcError) as excinfo:
                    call(metadata)
                assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "security header missing from request" in excinfo.value.details()
        # With the header, the same raw call is answered.
        reply = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5, metadata=(("workload.spiffe.io", "true"),)))
        assert reply.svids[0].spiffe_id == ORDERS


def test_jwt_svids_are_not_offered(agent: tuple[AgentProcess, CaServer, str]) -> None:
    _, _, address = agent
    channel, stub = _raw_stub(address)
    with channel, pytest.raises(grpc.RpcError) as excinfo:
        stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["orders"]), timeout=5, metadata=(("workload.spiffe.io", "true"),)
        )
    assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "X509-SVIDs only" in excinfo.value.details()
