"""The policy and the rendered Envoy configurations, checked without a mesh."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shopmesh import envoyconfig, policy, topology

ROOT = Path(__file__).resolve().parent.parent
ENVOY = Path(sys.executable).parent / "envoy"


def _pods() -> dict[str, envoyconfig.PodAddresses]:
    return {
        name: envoyconfig.PodAddresses(
            name=name, host=f"10.89.1.{10 + i}", inbound_bind=f"10.89.1.{10 + i}",
            inbound_port=topology.INBOUND_PORT, app_port=topology.APP_PORT,
            admin_port=topology.ADMIN_PORT, outbound_ports=dict(topology.OUTBOUND_PORTS),
        )
        for i, name in enumerate(topology.WORKLOADS)
    }


def test_policy_allows_exactly_the_design_table() -> None:
    rules = policy.load_policy()
    allowed = {
        ("ingress", "orders", m) for m in ("PlaceOrder", "GetOrder", "ListOrders")
    } | {
        ("ingress", "search", m) for m in ("SearchProducts", "GetProducts")
    } | {
        ("ingress", "payments", "Tokenize"), ("orders", "search", "GetProducts"),
        ("orders", "payments", "Charge"), ("orders", "payments", "Refund"),
    }
    for caller in topology.WORKLOADS:
        for server in topology.GRPC_SERVICES:
            for method in policy.service_methods(server):
                expected = (caller, server, method) in allowed
                assert policy.is_allowed(rules, caller, server, method) is expected, (caller, server, method)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("payments:\n  ingress: [Tokenise]\n", "has no method 'Tokenise'"),
        ("payment:\n  ingress: [Tokenize]\n", "'payment' is not a workload"),
        ("payments:\n  billing: [Tokenize]\n", "caller 'billing'"),
        ("payments:\n  ingress: []\n", "non-empty list"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_policy_mistakes_are_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(policy.PolicyError, match=message):
        policy.load_policy(path)


@pytest.mark.parametrize("name", list(topology.WORKLOADS))
def test_rendered_config_is_accepted_by_envoy(tmp_path: Path, name: str) -> None:
    pods = _pods()
    text = envoyconfig.render(pods[name], pods, sds_socket=tmp_path / "agent.sock", ttl_s=10)
    config = yaml.safe_load(text)
    assert config["node"] == {"id": name, "cluster": name}
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sidecar_inbound_requires_client_certificates_and_rbac() -> None:
    pods = _pods()
    config = yaml.safe_load(envoyconfig.render(pods["payments"], pods, sds_socket=Path("/x.sock"), ttl_s=60))
    inbound = next(l for l in config["static_resources"]["listeners"] if l["name"] == "inbound")
    assert inbound["address"]["socket_address"]["address"] == pods["payments"].host
    tls = inbound["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    hcm = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["common_http_protocol_options"]["max_connection_duration"] == "30.000s"
    rbac = hcm["http_filters"][0]
    assert rbac["name"] == "rbac"
    # Served by the agent over ECDS (the same socket as SDS); deny-all until then.
    assert rbac["config_discovery"]["config_source"]["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "sds-agent"
    assert rbac["config_discovery"]["default_config"]["rules"] == {"action": "ALLOW", "policies": {}}
    # Nothing listens outside the pod but the inbound port.
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] != "inbound":
            assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_outbound_clusters_verify_the_exact_upstream_identity() -> None:
    pods = _pods()
    config = yaml.safe_load(envoyconfig.render(pods["orders"], pods, sds_socket=Path("/x.sock"), ttl_s=60))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for upstream in ("search", "payments"):
        ctx = clusters[upstream]["transport_socket"]["typed_config"]["common_tls_context"]
        matcher = ctx["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
        assert matcher == [{"san_type": "URI", "matcher": {"exact": topology.spiffe_id_for(upstream)}}]
        assert ctx["tls_certificate_sds_secret_configs"][0]["name"] == "default"
        assert ctx["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == "ROOTCA"


def test_rendered_rbac_is_a_valid_envoy_rbac_config() -> None:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

    from shopmesh.policyserver import rbac_resource

    resource = rbac_resource("payments", policy.load_policy())
    rbac = rbac_pb2.RBAC()
    assert resource.typed_config.Unpack(rbac)
    assert set(rbac.rules.policies) == {"ingress-to-payments", "orders-to-payments"}
    orders = rbac.rules.policies["orders-to-payments"]
    assert orders.principals[0].authenticated.principal_name.exact == topology.spiffe_id_for("orders")
    paths = [r.url_path.path.exact for r in orders.permissions[0].or_rules.rules]
    assert paths == ["/shopmesh.payments.v1.Payments/Charge", "/shopmesh.payments.v1.Payments/Refund"]


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    """Stubs are generated, never edited: regenerating gives the committed files."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    generated = [Path(line) for line in proc.stdout.split()]
    assert generated
    for rel in generated:
        assert filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False), f"{rel} differs from protos/: run `make protos`"
