"""Transport rows 6–12 of ACCEPTANCE.md against the live mesh: who can even
open a connection to a pod, and which upstreams a sidecar accepts."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from shopmesh import topology
from shopmesh.payments.v1 import payments_pb2
from shopmesh.probe import ProbeError

pytestmark = pytest.mark.mesh

MESH_PODS = ("orders", "payments", "search")


def inbound_counter(mesh, pod: str, name: str) -> int:
    key = f"listener.{mesh.record.pods[pod].host}_{topology.INBOUND_PORT}.{name}"
    stats = mesh.stats(pod)
    assert key in stats, f"{pod}'s Envoy has no counter {key}"
    return stats[key]


def app_requests(mesh, pod: str) -> int:
    """Requests the sidecar forwarded to its app."""
    return mesh.stats(pod).get("cluster.local-app.upstream_rq_total", 0)


@pytest.mark.parametrize("pod", MESH_PODS)
def test_plaintext_to_inbound_is_refused_before_the_app(mesh, pod) -> None:  # row 6
    before = app_requests(mesh, pod), inbound_counter(mesh, pod, "ssl.connection_error")
    with pytest.raises(ProbeError):
        mesh.call(pod, "Anything", tls=False)
    assert app_requests(mesh, pod) == before[0]
    assert inbound_counter(mesh, pod, "ssl.connection_error") == before[1] + 1


@pytest.mark.parametrize("pod", MESH_PODS)
def test_tls_without_client_certificate_is_refused(mesh, pod) -> None:  # row 7
    before = inbound_counter(mesh, pod, "ssl.fail_verify_no_cert")
    with pytest.raises(ProbeError):
        mesh.call(pod, "Anything")
    assert inbound_counter(mesh, pod, "ssl.fail_verify_no_cert") == before + 1


def test_client_certificate_from_a_foreign_ca_is_refused(mesh) -> None:  # row 8
    before = inbound_counter(mesh, "payments", "ssl.fail_verify_error")
    with pytest.raises(ProbeError):
        mesh.call("payments", "Charge", identity=mesh.foreign_svid("orders"))
    assert inbound_counter(mesh, "payments", "ssl.fail_verify_error") == before + 1


def test_expired_client_certificate_is_refused(mesh) -> None:  # row 9
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    expired = mesh.mint_svid("orders", ttl_s=60, now=an_hour_ago)
    before = inbound_counter(mesh, "payments", "ssl.fail_verify_error")
    with pytest.raises(ProbeError):
        mesh.call("payments", "Charge", identity=expired)
    assert inbound_counter(mesh, "payments", "ssl.fail_verify_error") == before + 1


def test_identity_not_allowed_never_reaches_the_app(mesh) -> None:  # row 10
    charge = payments_pb2.ChargeRequest(token="tok_" + "0" * 32, amount_minor=100, currency="EUR",
                                        idempotency_key="probe").SerializeToString()
    before = app_requests(mesh, "payments")
    result = mesh.call("payments", "Charge", charge, identity=mesh.mint_svid("search"))
    assert result.grpc_status == 7, result  # PERMISSION_DENIED
    assert app_requests(mesh, "payments") == before


@pytest.mark.parametrize("pod", MESH_PODS)
def test_app_port_is_unreachable_from_the_host_and_other_pods(mesh, pod) -> None:  # row 12
    record = mesh.record
    target = (record.pods[pod].host, topology.APP_PORT)
    with pytest.raises(OSError):
        socket.create_connection(target, timeout=3).close()
    other = next(p for p in MESH_PODS if p != pod)

    def connect_from(source: str, address: tuple[str, int]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*record.exec_prefix(source), sys.executable, "-c",
             f"import socket; socket.create_connection({address!r}, timeout=3)"],
            capture_output=True, text=True, timeout=30,
        )

    probe = connect_from(other, target)
    assert probe.returncode != 0 and "ConnectionRefusedError" in probe.stderr, probe.stderr
    # ...while the same pod's sidecar port answers from there.
    probe = connect_from(other, (record.pods[pod].host, topology.INBOUND_PORT))
    assert probe.returncode == 0, probe.stderr


IMPOSTOR = r"""
import socket, ssl, sys
host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])
server = socket.create_server((host, port))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
        data = tls.recv(65536)
        print("request bytes", len(data), flush=True)
    except (ssl.SSLError, OSError) as exc:
        print("handshake failed:", exc, flush=True)
    finally:
        conn.close()
"""


def test_client_sidecar_refuses_an_impostor_upstream(mesh, tmp_path) -> None:  # row 11
    """Something at search's address presents a valid certificate of our CA,
    but for another identity (payments). The ingress's sidecar must refuse it:
    the call fails, and the impostor never sees a request."""
    import os
    import signal

    import grpc

    from shopmesh.search.v1 import search_pb2, search_pb2_grpc

    record = mesh.record
    search = record.pods["search"]
    impostor_id = mesh.mint_svid("payments")
    (tmp_path / "cert.pem").write_bytes(impostor_id.cert_pem)
    (tmp_path / "key.pem").write_bytes(impostor_id.key_pem)
    envoy_pid = mesh.agent_status("search")["envoy_pid"]
    san_failures = mesh.stats("ingress").get("cluster.search.ssl.fail_verify_san", 0)

    # Take search's sidecar away: freeze its agent so it does not restart
    # Envoy at once, then kill Envoy and put the impostor on its port.
    mesh.freeze_agent("search")  # the plugin unfreezes it after the test
    os.kill(envoy_pid, signal.SIGKILL)
    log = tmp_path / "impostor.log"
    with open(log, "wb") as out:
        impostor = subprocess.Popen(
            [*record.exec_prefix("search"), sys.executable, "-c", IMPOSTOR, search.host, str(topology.INBOUND_PORT),
             str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        mesh.wait_until(lambda: "listening" in log.read_text(), 20, "the impostor to listen")
        with grpc.insecure_channel(record.external) as channel:
            with pytest.raises(grpc.RpcError) as failure:
                search_pb2_grpc.SearchStub(channel).SearchProducts(
                    search_pb2.SearchProductsRequest(query="coffee"), timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
        assert mesh.stats("ingress")["cluster.search.ssl.fail_verify_san"] > san_failures
        assert "handshake failed" in log.read_text()
        assert "request bytes" not in log.read_text()
    finally:
        impostor.kill()
        impostor.wait()
