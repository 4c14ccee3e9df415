"""The authorization policy (mesh/policy.yaml) and its rendering into Envoy RBAC.

The policy names workloads and gRPC methods; this module checks every name
against the topology and the generated API descriptors (a typo must stop the
mesh, not silently deny), then renders one Envoy RBAC filter per sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pool

from shopmesh import topology

# Importing the stubs registers their descriptors in the default pool.
from shopmesh.orders.v1 import orders_pb2  # noqa: F401
from shopmesh.payments.v1 import payments_pb2  # noqa: F401
from shopmesh.search.v1 import search_pb2  # noqa: F401

DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "mesh" / "policy.yaml"


class PolicyError(ValueError):
    """The policy file names something that does not exist, or is malformed."""


@dataclass(frozen=True)
class Rule:
    server: str  # workload being called
    caller: str  # workload allowed to call it
    methods: tuple[str, ...]  # full gRPC paths, e.g. /shopmesh.search.v1.Search/GetProducts

    @property
    def caller_spiffe_id(self) -> str:
        return topology.spiffe_id_for(self.caller)


def service_methods(server: str) -> list[str]:
    """The method names of the gRPC service a workload serves, from its descriptor."""
    full_name = topology.GRPC_SERVICES[server]
    service = descriptor_pool.Default().FindServiceByName(full_name)
    return [m.name for m in service.methods]


def load_policy(path: Path = DEFAULT_POLICY_PATH) -> list[Rule]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read policy {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"policy {path}: expected a mapping of server workloads")
    rules: list[Rule] = []
    for server, callers in raw.items():
        if server not in topology.GRPC_SERVICES:
            raise PolicyError(
                f"policy {path}: '{server}' is not a workload that serves gRPC "
                f"(known: {', '.join(sorted(topology.GRPC_SERVICES))})"
            )
        if not isinstance(callers, dict):
            raise PolicyError(f"policy {path}: '{server}' must map callers to method lists")
        known = service_methods(server)
        service = topology.GRPC_SERVICES[server]
        for caller, methods in callers.items():
            if caller not in topology.WORKLOADS:
                raise PolicyError(f"policy {path}: caller '{caller}' of '{server}' is not a workload")
            if not isinstance(methods, list) or not methods:
                raise PolicyError(f"policy {path}: '{server}.{caller}' must be a non-empty list of methods")
            names = known if methods == ["*"] else methods
            for name in names:
                if name not in known:
                    raise PolicyError(
                        f"policy {path}: '{service}' has no method '{name}' "
                        f"(it has: {', '.join(known)})"
                    )
            rules.append(Rule(server, caller, tuple(f"/{service}/{n}" for n in names)))
    return rules


def is_allowed(rules: list[Rule], caller: str, server: str, method: str) -> bool:
    path = f"/{topology.GRPC_SERVICES[server]}/{method}"
    return any(r.server == server and r.caller == caller and path in r.methods for r in rules)


def render_rbac(rules: list[Rule], server: str) -> dict[str, Any]:
    """The Envoy RBAC HTTP filter config (as a dict) for the sidecar of `server`.

    Principals match the TLS peer's URI SAN (`authenticated.principal_name`),
    never a header, so a forged x-forwarded-client-cert cannot change the
    outcome. Methods are exact paths: a prefix would let a future method in
    through the back door.
    """
    policies: dict[str, Any] = {}
    for rule in rules:
        if rule.server != server:
            continue
        policies[f"{rule.caller}-to-{server}"] = {
            "permissions": [
                {"or_rules": {"rules": [{"url_path": {"path": {"exact": m}}} for m in rule.methods]}}
            ],
            "principals": [
                {"authenticated": {"principal_name": {"exact": rule.caller_spiffe_id}}}
            ],
        }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": policies},
        },
    }
