"""Authorization rows 13–15 of ACCEPTANCE.md against the live mesh: every
(caller, method) pair of mesh/policy.yaml, allowed and denied, and a forged
identity header."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from shopmesh import policy, topology
from shopmesh.payments.v1 import payments_pb2

pytestmark = pytest.mark.mesh

PERMISSION_DENIED = 7
SERVERS = ("orders", "payments", "search")


def test_every_pair_of_the_policy_per_method(mesh) -> None:  # rows 14, 15
    """Each workload identity calls each method of each service straight at
    the callee's sidecar. Allowed pairs reach the app (which answers the empty
    request with its own status, never PERMISSION_DENIED); every other pair
    ends at the sidecar with PERMISSION_DENIED, counted by RBAC."""
    rules = policy.load_policy()
    identities = {w: mesh.mint_svid(w) for w in topology.WORKLOADS}
    outcomes = []
    for server in SERVERS:
        denied_before = mesh.stats(server).get("http.inbound.rbac.denied", 0)
        expected_denials = 0
        for method in policy.service_methods(server):
            for caller, identity in identities.items():
                allowed = policy.is_allowed(rules, caller, server, method)
                result = mesh.call(server, method, identity=identity)
                denied = result.grpc_status == PERMISSION_DENIED
                if denied == allowed:
                    outcomes.append(f"{caller} → {server}.{method}: expected {'allowed' if allowed else 'denied'}, "
                                    f"got grpc-status {result.grpc_status} {result.grpc_message!r}")
                expected_denials += not allowed
        assert mesh.stats(server)["http.inbound.rbac.denied"] == denied_before + expected_denials, server
    assert outcomes == [], "\n".join(outcomes)


def test_the_callee_sees_the_tls_identity_not_a_forged_header(mesh) -> None:  # row 13
    """The ingress may tokenize; it claims to be orders in x-forwarded-client-cert.
    Payments records the caller its own sidecar authenticated: the ingress."""
    forged = (("x-forwarded-client-cert", f"By=x;URI={topology.spiffe_id_for('orders')}"),)
    request = payments_pb2.TokenizeRequest(card_number="5555555555554444", exp_month=12, exp_year=datetime.now(timezone.utc).year + 3, cvv="123")
    result = mesh.call("payments", "Tokenize", request.SerializeToString(),
                       identity=mesh.mint_svid("ingress"), metadata=forged)
    assert result.grpc_status == 0, result
    token = payments_pb2.TokenizeResponse.FromString(result.body).token
    line = mesh.wait_for_log("payments.app", re.escape(token))
    assert topology.spiffe_id_for("ingress") in line, line
    assert topology.spiffe_id_for("orders") not in line, line


def test_a_forged_header_does_not_let_a_denied_caller_in(mesh) -> None:  # rows 13, 15
    forged = (("x-forwarded-client-cert", f"URI={topology.spiffe_id_for('orders')}"),)
    result = mesh.call("payments", "Charge", identity=mesh.mint_svid("search"), metadata=forged)
    assert result.grpc_status == PERMISSION_DENIED, result
