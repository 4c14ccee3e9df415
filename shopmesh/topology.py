"""The mesh's workloads, identities and ports: the one source of truth.

Everything else (the Envoy configs, the local runner, compose, the tests)
reads these values instead of repeating them.
"""

from __future__ import annotations

from dataclasses import dataclass

TRUST_DOMAIN = "shopmesh.internal"
NAMESPACE = "shop"

# Ports inside a pod. Every pod has its own network namespace, so every pod
# uses the same numbers; only the pod address differs.
APP_PORT = 50051  # the app, on 127.0.0.1 only
INBOUND_PORT = 8443  # the sidecar's mTLS listener: the pod's only door
ADMIN_PORT = 9901  # Envoy admin, on 127.0.0.1 only
METRICS_PORT = 15090  # the agent's Prometheus /metrics, on 127.0.0.1 only
# Outbound listeners on 127.0.0.1, one per upstream service: the app dials
# these in plaintext and its sidecar originates mTLS to the upstream pod.
OUTBOUND_PORTS = {"orders": 9101, "search": 9102, "payments": 9103}

# Host-side services.
CA_JOIN_PORT = 8440  # CA: bootstrap with a join token (server-authenticated TLS)
CA_RENEW_PORT = 8441  # CA: renewal (mutual TLS with the current SVID)
INGRESS_PORT = 8080  # the ingress gateway's client-facing port (127.0.0.1)
# The local runner's OTLP/gRPC receiver (shopmesh.otlp_receiver), on the pod
# bridge's host address. Not 4317: a collector or Jaeger on this machine
# usually has that one.
OTLP_RECEIVER_PORT = 8442


def spiffe_id_for(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}"


@dataclass(frozen=True)
class Workload:
    """One pod of the mesh."""

    name: str
    # Python module of the app (`python -m …`); None for the ingress gateway.
    app_module: str | None
    # Services this workload calls through its sidecar's outbound listeners.
    upstreams: tuple[str, ...]

    @property
    def spiffe_id(self) -> str:
        return spiffe_id_for(self.name)

    @property
    def is_gateway(self) -> bool:
        return self.app_module is None


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("ingress", None, ("orders", "search", "payments")),
        Workload("orders", "services.orders", ("search", "payments")),
        Workload("payments", "services.payments", ()),
        Workload("search", "services.search", ()),
    )
}

# gRPC service names (package.Service) served by each workload: used to route
# at the ingress and to render per-method RBAC rules.
GRPC_SERVICES = {
    "orders": "shopmesh.orders.v1.Orders",
    "payments": "shopmesh.payments.v1.Payments",
    "search": "shopmesh.search.v1.Search",
}
