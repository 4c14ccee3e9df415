"""The walking skeleton, end to end, with the real Envoy binary.

One mesh for the module (conftest `mesh`, certificate TTL 10 s): the demo
order crosses ingress → orders → search and → payments over mutual TLS; the
inbound ports refuse plaintext and certificate-less clients; apps are
unreachable outside their pod; RBAC denies search calling payments Charge;
and a minute of continuous orders survives many rotations with zero failures.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki.ca import LocalCA
from shopmesh import topology
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.probe import ProbeError, grpc_unary

pytestmark = pytest.mark.mesh

MESH_PODS = ("orders", "payments", "search")
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


def mint_svid(state_dir, workload: str) -> tuple[bytes, bytes]:
    """A certificate and key for `workload`, signed by the mesh's CA: what a
    compromised or misconfigured pod holding that identity would present."""
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe_id = topology.spiffe_id_for(workload)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    chain, _bundle = LocalCA.load_or_create(state_dir).issue_svid(
        csr.public_bytes(serialization.Encoding.PEM), spiffe_id, timedelta(minutes=5)
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return chain.encode(), key_pem


def inbound_counter(stats: dict[str, int], pod_ip: str, name: str) -> int:
    key = f"listener.{pod_ip}_{topology.INBOUND_PORT}.{name}"
    assert key in stats, f"Envoy has no counter {key}"
    return stats[key]


def test_status_lists_every_workload_ready(mesh) -> None:
    status = mesh.status()
    assert sorted(status) == sorted(topology.WORKLOADS)
    for name, entry in status.items():
        assert entry["ready"] is True, entry
        assert entry["spiffe_id"] == topology.spiffe_id_for(name)
        assert re.fullmatch(r"[0-9a-f]+", entry["serial"]), entry
        assert 0 < entry["expires_in_s"] <= 10 + 1, entry
    assert status["ingress"]["inbound"] is None
    assert re.fullmatch(r"127\.0\.0\.1:\d+", status["ingress"]["external"])
    for pod in MESH_PODS:
        host, port = status[pod]["inbound"].rsplit(":", 1)
        assert int(port) == topology.INBOUND_PORT and host != "127.0.0.1"


def test_demo_order_flows_through_every_sidecar_over_mtls(mesh) -> None:
    handshakes_before = {p: inbound_counter(mesh.stats(p), mesh.record.pods[p].host, "ssl.handshake") for p in MESH_PODS}
    out = mesh.cli("demo", "--json")
    result = json.loads(out.stdout)
    assert result["state"] == "paid", result
    assert re.fullmatch(r"ord_[0-9a-f]{24}", result["order_id"])
    assert re.fullmatch(r"[0-9a-f]{32}", result["trace_id"])
    assert "4242" in result["card"] and "4242424242424242" not in out.stdout

    ids = {w: re.escape(topology.spiffe_id_for(w)) for w in topology.WORKLOADS}
    # Each sidecar's access log shows the call with the TLS peer it authenticated.
    expected = {
        "orders": [
            rf"peer={ids['ingress']} POST /shopmesh.orders.v1.Orders/PlaceOrder http=200 grpc=0",
            rf"/shopmesh.search.v1.Search/GetProducts .*upstream_peer={ids['search']}",
            rf"/shopmesh.payments.v1.Payments/Charge .*upstream_peer={ids['payments']}",
        ],
        "search": [rf"peer={ids['orders']} POST /shopmesh.search.v1.Search/GetProducts http=200 grpc=0"],
        "payments": [
            rf"peer={ids['orders']} POST /shopmesh.payments.v1.Payments/Charge http=200 grpc=0",
            rf"peer={ids['ingress']} POST /shopmesh.payments.v1.Payments/Tokenize http=200 grpc=0",
        ],
    }
    for pod, patterns in expected.items():
        for pattern in patterns:
            mesh.wait_for_log(f"{pod}.envoy", pattern)
    for pod in MESH_PODS:
        after = inbound_counter(mesh.stats(pod), mesh.record.pods[pod].host, "ssl.handshake")
        assert after >= handshakes_before[pod], pod
    # The order is stored: it can be read back through the ingress.
    with grpc.insecure_channel(mesh.record.external) as ch:
        order = orders_pb2_grpc.OrdersStub(ch).GetOrder(orders_pb2.GetOrderRequest(order_id=result["order_id"]), timeout=10)
    assert order.state == orders_pb2.ORDER_STATE_PAID and order.charge_id


@pytest.mark.parametrize("pod", MESH_PODS)
def test_plaintext_to_inbound_is_refused_before_the_app(mesh, pod) -> None:
    record = mesh.record
    requests_before = mesh.stats(pod).get("http.inbound.downstream_rq_total", 0)
    with pytest.raises(ProbeError):
        grpc_unary(record.pods[pod].inbound, f"/{topology.GRPC_SERVICES[pod]}/Anything", tls=False)
    stats = mesh.stats(pod)
    assert stats.get("http.inbound.downstream_rq_total", 0) == requests_before
    assert inbound_counter(stats, record.pods[pod].host, "ssl.connection_error") >= 1


@pytest.mark.parametrize("pod", MESH_PODS)
def test_tls_without_client_certificate_is_refused(mesh, pod) -> None:
    record = mesh.record
    before = inbound_counter(mesh.stats(pod), record.pods[pod].host, "ssl.fail_verify_no_cert")
    with pytest.raises(ProbeError):
        grpc_unary(record.pods[pod].inbound, f"/{topology.GRPC_SERVICES[pod]}/Anything")
    after = inbound_counter(mesh.stats(pod), record.pods[pod].host, "ssl.fail_verify_no_cert")
    assert after == before + 1


@pytest.mark.parametrize("pod", MESH_PODS)
def test_app_port_is_unreachable_from_the_host_and_other_pods(mesh, pod) -> None:
    record = mesh.record
    target = (record.pods[pod].host, topology.APP_PORT)
    with pytest.raises(OSError):
        socket.create_connection(target, timeout=3).close()
    other = next(p for p in MESH_PODS if p != pod)
    probe = subprocess.run(
        [*record.exec_prefix(other), sys.executable, "-c",
         f"import socket; socket.create_connection({target!r}, timeout=3)"],
        capture_output=True, text=True, timeout=30,
    )
    assert probe.returncode != 0 and "ConnectionRefusedError" in probe.stderr, probe.stderr
    # ...while the inbound sidecar port of that pod is reachable from there.
    probe = subprocess.run(
        [*record.exec_prefix(other), sys.executable, "-c",
         f"import socket; socket.create_connection({(record.pods[pod].host, topology.INBOUND_PORT)!r}, timeout=3)"],
        capture_output=True, text=True, timeout=30,
    )
    assert probe.returncode == 0, probe.stderr


def test_search_identity_calling_payments_charge_is_denied(mesh) -> None:
    record = mesh.record
    ca_pem = (mesh.state_dir / "ca" / "root.pem").read_bytes()
    charge = payments_pb2.ChargeRequest(token="tok_" + "0" * 32, amount_minor=100, currency="EUR", idempotency_key="probe").SerializeToString()
    path = "/shopmesh.payments.v1.Payments/Charge"
    denied_before = mesh.stats("payments").get("http.inbound.rbac.denied", 0)

    cert, key = mint_svid(mesh.state_dir, "search")
    result = grpc_unary(record.pods["payments"].inbound, path, charge, cert_pem=cert, key_pem=key, ca_pem=ca_pem)
    assert result.grpc_status == PERMISSION_DENIED, result
    assert mesh.stats("payments")["http.inbound.rbac.denied"] == denied_before + 1

    # The same request with the orders identity passes RBAC and reaches the
    # app (which answers NOT_FOUND for the made-up token): the denial above
    # was about who called, not what was sent.
    cert, key = mint_svid(mesh.state_dir, "orders")
    result = grpc_unary(record.pods["payments"].inbound, path, charge, cert_pem=cert, key_pem=key, ca_pem=ca_pem)
    assert result.grpc_status == grpc.StatusCode.NOT_FOUND.value[0], result


def test_forged_client_identity_header_is_ignored(mesh) -> None:
    """A caller may not claim another identity with x-forwarded-client-cert."""
    record = mesh.record
    ca_pem = (mesh.state_dir / "ca" / "root.pem").read_bytes()
    cert, key = mint_svid(mesh.state_dir, "search")
    forged = (("x-forwarded-client-cert", f"URI={topology.spiffe_id_for('orders')}"),)
    charge = payments_pb2.ChargeRequest(token="tok_" + "0" * 32, amount_minor=100, currency="EUR", idempotency_key="probe").SerializeToString()
    result = grpc_unary(record.pods["payments"].inbound, "/shopmesh.payments.v1.Payments/Charge", charge,
                        cert_pem=cert, key_pem=key, ca_pem=ca_pem, metadata=forged)
    assert result.grpc_status == PERMISSION_DENIED, result


def test_rotation_under_a_minute_of_continuous_orders(mesh) -> None:
    """TTL 10 s: every workload rotates several times while orders flow, and
    not one RPC fails."""
    record = mesh.record
    serials: dict[str, set[str]] = {name: set() for name in topology.WORKLOADS}
    failures: list[str] = []
    placed = 0
    with grpc.insecure_channel(record.external) as ch:
        payments = payments_pb2_grpc.PaymentsStub(ch)
        orders = orders_pb2_grpc.OrdersStub(ch)
        token = payments.Tokenize(payments_pb2.TokenizeRequest(card_number="4242424242424242", exp_month=12, exp_year=datetime.now(timezone.utc).year + 3, cvv="123"), timeout=10).token
        deadline = time.monotonic() + 60
        next_sample = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_sample:
                for name, entry in mesh.status().items():
                    if entry["serial"]:
                        serials[name].add(entry["serial"])
                next_sample = time.monotonic() + 1.0
            try:
                order = orders.PlaceOrder(
                    orders_pb2.PlaceOrderRequest(
                        items=[orders_pb2.LineItem(product_id="sku-0001", quantity=1)],
                        payment_token=token, idempotency_key=f"rotation-{placed}",
                    ),
                    timeout=10,
                )
                if order.state != orders_pb2.ORDER_STATE_PAID:
                    failures.append(f"order {order.order_id} ended {orders_pb2.OrderState.Name(order.state)}")
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
            placed += 1
    assert placed > 60, f"only {placed} orders in a minute"
    assert failures == [], f"{len(failures)} of {placed} orders failed: {failures[:5]}"
    for name, seen in serials.items():
        assert len(seen) >= 5, f"{name} served only {len(seen)} certificates in 60 s with a 10 s TTL: {seen}"
