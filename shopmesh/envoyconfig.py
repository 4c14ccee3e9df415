"""Render the Envoy configurations of the sidecars and the ingress.

The templates live in mesh/envoy/ (Jinja2, readable enough to copy); this
module fills them from the pod plan, and checks that the
result is well-formed YAML before anyone hands it to Envoy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from shopmesh import config, topology

TEMPLATES = Path(__file__).resolve().parent.parent / "mesh" / "envoy"


@dataclass(frozen=True)
class PodAddresses:
    """Where one pod's parts listen. In a pod network namespace every pod uses
    the standard ports of shopmesh.topology; on shared loopback they differ."""

    name: str
    host: str  # the pod address other pods dial (an IP or a DNS name)
    inbound_bind: str  # where the sidecar's inbound listener binds
    inbound_port: int
    app_port: int
    admin_port: int
    outbound_ports: dict[str, int]

    @property
    def spiffe_id(self) -> str:
        return topology.spiffe_id_for(self.name)

    @property
    def inbound(self) -> str:
        return f"{self.host}:{self.inbound_port}"


@dataclass(frozen=True)
class Upstream:
    name: str
    spiffe_id: str
    grpc_service: str
    host: str
    inbound_port: int
    port: int  # outbound listener port in the calling pod (sidecars only)

    @property
    def discovery(self) -> str:
        # An IP literal needs no resolver; a name (compose) is resolved by DNS.
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


@dataclass(frozen=True)
class OtlpCollector:
    """Where Envoy sends its spans (OTLP/gRPC): the runner's receiver, or Jaeger in compose."""

    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> "OtlpCollector":
        """Parse "host:port" (an IP or a DNS name); ConfigError naming the value otherwise."""
        host, port = config.parse_address(address, what="OTLP collector address")
        return cls(host, port)

    @property
    def discovery(self) -> str:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


def _duration(seconds: float) -> str:
    return f"{max(1.0, seconds):.3f}s"


def max_connection_duration(ttl_s: float) -> str:
    """Connections close after half the certificate lifetime.

    The agent renews at about half the TTL, so a new connection always starts
    with a certificate that has at least about half its life left; closing it
    after half the TTL means no connection outlives the certificate it was
    authenticated with.
    """
    return _duration(ttl_s / 2)


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _upstreams(pod: PodAddresses, pods: dict[str, PodAddresses]) -> list[Upstream]:
    out = []
    for name in topology.WORKLOADS[pod.name].upstreams:
        target = pods[name]
        out.append(
            Upstream(
                name=name,
                spiffe_id=target.spiffe_id,
                grpc_service=topology.GRPC_SERVICES[name],
                host=target.host,
                inbound_port=target.inbound_port,
                port=pod.outbound_ports.get(name, 0),
            )
        )
    return out


def render(
    pod: PodAddresses,
    pods: dict[str, PodAddresses],
    *,
    sds_socket: Path,
    ttl_s: float,
    external_bind: str = "127.0.0.1",
    external_port: int = topology.INGRESS_PORT,
    otlp_collector: str | None = None,
) -> str:
    """The Envoy bootstrap YAML for one pod (a sidecar, or the ingress gateway).

    With `otlp_collector` ("host:port"), every HTTP connection manager traces
    with envoy.tracers.opentelemetry and exports there; without it, no tracing.
    """
    workload = topology.WORKLOADS[pod.name]
    template = "ingress.yaml.j2" if workload.is_gateway else "sidecar.yaml.j2"
    text = _env().get_template(template).render(
        pod=pod,
        trust_domain=topology.TRUST_DOMAIN,
        upstreams=_upstreams(pod, pods),
        sds_socket=str(sds_socket),
        max_connection_duration=max_connection_duration(ttl_s),
        external_bind=external_bind,
        external_port=external_port,
        otel=OtlpCollector.parse(otlp_collector) if otlp_collector else None,
    )
    yaml.safe_load(text)  # a template bug must fail here, not inside Envoy
    return text
