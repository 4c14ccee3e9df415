"""Authorization rows 13–15 of ACCEPTANCE.md against the live mesh: every
(caller, method) pair of mesh/policy.yaml, allowed and denied, and a forged
identity header."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from shopmesh import policy, topology
from shopmesh.payments.v1 import payments_pb2
from shopmesh.search.v1 import search_pb2

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


@pytest.mark.parametrize("mesh", [{"own_policy": True}], indirect=True)
def test_a_policy_change_applies_without_dropping_allowed_traffic(mesh) -> None:  # row 16
    """Orders keep flowing while the policy changes twice: once picked up by
    the agents on their own when the file changes, once by `shopmesh policy
    reload`. Each change takes effect for the calls it is about."""
    original = mesh.policy_file.read_text()
    tightened = original.replace('search:\n  ingress: ["*"]', 'search:\n  ingress: [GetProducts]')
    assert tightened != original, "the test's edit no longer matches mesh/policy.yaml"
    query = search_pb2.SearchProductsRequest(query="coffee").SerializeToString()
    ingress = mesh.mint_svid("ingress")
    assert mesh.call("search", "SearchProducts", query, identity=ingress).grpc_status == 0
    version = mesh.agent_status("search")["policy_version"]

    with mesh.traffic(rate=5, kind="orders") as report:
        mesh.policy_file.write_text(tightened)  # noticed by the agents within a second
        mesh.wait_until(lambda: mesh.agent_status("search")["policy_acked"] not in (None, version), 15,
                        "search's sidecar to apply the new policy")
        denied = mesh.call("search", "SearchProducts", query, identity=ingress)
        assert denied.grpc_status == PERMISSION_DENIED, denied
        mesh.policy_file.write_text(original)
        mesh.cli("policy", "reload")
        allowed = mesh.call("search", "SearchProducts", query, identity=ingress)
        assert allowed.grpc_status == 0, allowed
    assert report.total > 0 and report.failures == {}, f"{report.summary()} {report.failure_samples}"


@pytest.mark.parametrize("mesh", [{"own_policy": True}], indirect=True)
def test_a_broken_policy_is_refused_and_the_last_good_one_stays(mesh) -> None:
    original = mesh.policy_file.read_text()
    mesh.policy_file.write_text(original.replace("Tokenize", "Tokenise"))
    try:
        reload = mesh.cli("policy", "reload", check=False)
        assert reload.returncode == 2 and "has no method 'Tokenise'" in reload.stderr, reload.stderr
        # Nothing changed for callers: the ingress may still tokenize.
        tokenize = payments_pb2.TokenizeRequest(card_number="5555555555554444", exp_month=12,
                                                exp_year=datetime.now(timezone.utc).year + 3, cvv="123")
        result = mesh.call("payments", "Tokenize", tokenize.SerializeToString(), identity=mesh.mint_svid("ingress"))
        assert result.grpc_status == 0, result
    finally:
        mesh.policy_file.write_text(original)
