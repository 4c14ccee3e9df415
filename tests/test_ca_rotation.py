"""CA rotation without downtime (ACCEPTANCE row 26) and the Workload API, on the real mesh.

`shopmesh ca rotate` prepares the next root (trusted, not signing), activates
it (agents renew everything from it), then retires the old one, while orders
flow through the ingress the whole time. A certificate minted by the old CA
is accepted during the overlap and refused once it is retired.
"""

from __future__ import annotations

import json

import grpc
import pytest
from spiffe import SpiffeId, WorkloadApiClient

from shopmesh import topology
from shopmesh.payments.v1 import payments_pb2
from shopmesh.probe import ProbeError

pytestmark = pytest.mark.mesh

NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
CHARGE = payments_pb2.ChargeRequest(
    token="tok_" + "0" * 32, amount_minor=100, currency="EUR", idempotency_key="ca-rotation-probe"
).SerializeToString()


def reaches_payments(mesh, identity) -> bool:  # type: ignore[no-untyped-def]
    """orders → payments Charge with `identity`: True if it passed mTLS and RBAC and reached the app
    (which answers NOT_FOUND for the made-up token); False if the handshake was refused."""
    try:
        result = mesh.call("payments", "Charge", CHARGE, identity=identity)
    except ProbeError:
        return False
    assert result.grpc_status == NOT_FOUND, result
    return True


def test_status_gives_each_workload_api_socket_and_py_spiffe_reads_it(mesh) -> None:  # type: ignore[no-untyped-def]
    status = mesh.status()
    for name in topology.WORKLOADS:
        socket = status[name]["workload_api_socket"]
        assert socket == f"{mesh.state_dir}/pods/{name}/agent.sock"
    with WorkloadApiClient(socket_path=f"unix://{status['orders']['workload_api_socket']}", default_timeout=5) as client:
        svid = client.fetch_x509_svid()
    assert svid.spiffe_id == SpiffeId(topology.spiffe_id_for("orders"))


def test_ca_rotation_keeps_orders_flowing_and_retires_the_old_root(mesh) -> None:  # type: ignore[no-untyped-def]
    old_identity = mesh.mint_svid("orders", ttl_s=600)  # signed by the CA before rotation
    assert reaches_payments(mesh, old_identity)

    with mesh.traffic(rate=10) as report:
        mesh.wait_until(lambda: report.total >= 10, 30, "traffic to flow")
        prepared = mesh.cli("ca", "rotate", "--step", "prepare")
        assert "every agent and Envoy trusts the new root" in prepared.stdout

        mesh.cli("ca", "rotate", "--step", "activate")
        # Overlap: certificates of both CAs are accepted.
        new_identity = mesh.mint_svid("orders", ttl_s=600)
        assert new_identity.cert_pem != old_identity.cert_pem
        assert reaches_payments(mesh, old_identity), "the old CA's leaf still verifies during the overlap"
        assert reaches_payments(mesh, new_identity)

        at_retire = report.total
        retired = mesh.cli("ca", "rotate", "--step", "retire")
        assert "certificates of the old CA are refused" in retired.stdout
        mesh.wait_until(lambda: report.total >= at_retire + 20, 30, "traffic after the retirement")

    assert report.failures == {}, f"{report.summary()}: {report.failure_samples}"
    assert report.successes >= 30, report.summary()
    assert not reaches_payments(mesh, old_identity), "a leaf of the retired CA is refused at the handshake"
    assert reaches_payments(mesh, new_identity)
    bundle = (mesh.state_dir / "ca" / "root.pem").read_text()
    assert bundle.count("BEGIN CERTIFICATE") == 1

    # Every workload serves a certificate of the new CA, and nothing is waiting.
    doc = json.loads(mesh.cli("ca", "status", "--json").stdout)
    assert [a["role"] for a in doc["authorities"]] == ["active"]
    for name, agent in doc["agents"].items():
        assert agent["svid_authority"] == doc["signing_authority"], name
        assert agent["bundle_fingerprints"] == doc["bundle_fingerprints"], name


def test_a_rotation_step_out_of_order_is_refused(mesh) -> None:  # type: ignore[no-untyped-def]
    result = mesh.cli("ca", "rotate", "--step", "retire", check=False)
    assert result.returncode == 1
    assert "nothing to retire: run `shopmesh ca rotate --step activate` first" in result.stderr
    result = mesh.cli("ca", "rotate", "--step", "activate", check=False)
    assert result.returncode == 1
    assert "nothing to activate" in result.stderr
