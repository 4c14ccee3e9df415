"""The walking skeleton, end to end, with the real Envoy binary: status,
the demo order's path through every sidecar, and rotation under traffic.
(Transport and authorization rows: test_transport.py, test_authz.py.)

The `mesh` fixture comes from the project's own pytest plugin
(shopmesh.testing), as users get it; pyproject.toml sets a 10-second TTL and
one network namespace per pod.
"""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest

from shopmesh import topology
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc

pytestmark = pytest.mark.mesh

MESH_PODS = ("orders", "payments", "search")


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


def test_rotation_under_a_minute_of_continuous_orders(mesh) -> None:
    """TTL 10 s: every workload rotates several times while orders flow, and
    not one RPC fails."""
    serials: dict[str, set[str]] = {name: set() for name in topology.WORKLOADS}
    with mesh.traffic(rate=5, kind="orders") as report:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for name, entry in mesh.status().items():
                if entry["serial"]:
                    serials[name].add(entry["serial"])
            mesh.wait(1.0)
    print(report.summary())
    assert report.total > 100, report.summary()
    assert report.failures == {}, f"{report.summary()}: {report.failure_samples}"
    for name, seen in serials.items():
        assert len(seen) >= 5, f"{name} served only {len(seen)} certificates in 60 s with a 10 s TTL: {seen}"
