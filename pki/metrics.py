"""Prometheus metrics of an agent: how close its workload's certificate is to
expiry, and whether renewal works.

The agent's status (the same document it writes to its status file) is read
at scrape time, so the metrics never disagree with `shopmesh status`.
Alert rules built on these names ship in mesh/prometheus/alerts.yaml.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "shopmesh_agent"


class AgentCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._status()
        labels = ["spiffe_id"]
        values = [str(s.get("spiffe_id", ""))]

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            if value is not None:
                g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        not_after = s.get("not_after")
        issued_at = s.get("issued_at")
        yield gauge("svid_not_after_timestamp_seconds", "notAfter of the workload SVID Envoy serves (Unix time).", not_after)
        yield gauge("svid_expires_in_seconds", "Seconds until the workload SVID expires (negative once expired).",
                    None if not_after is None else float(not_after) - time.time())
        yield gauge("svid_lifetime_seconds", "Lifetime (notAfter - issue time) of the current workload SVID; renewal is due at half of it.",
                    None if not_after is None or issued_at is None else float(not_after) - float(issued_at))
        yield gauge("svid_next_rotation_timestamp_seconds", "When the agent plans to renew (Unix time).", s.get("next_rotation_at"))
        yield counter("svid_rotations", "Workload SVIDs obtained by renewal since the agent started.", float(s.get("rotations") or 0))
        yield counter("svid_renewal_failures", "Failed renewal attempts since the agent started.", float(s.get("renewal_failures") or 0))
        yield gauge("ca_reachable", "1 if the last exchange with the CA succeeded, 0 if it failed.",
                    None if s.get("ca_reachable") is None else float(bool(s.get("ca_reachable"))))
        yield gauge("envoy_live", "1 if the agent's Envoy reports LIVE.", None if s.get("envoy_live") is None else float(bool(s["envoy_live"])))
        yield gauge("ready", "1 if the workload is ready: valid SVID, Envoy live, app serving.", float(bool(s.get("ready"))))


def serve_metrics(address: tuple[str, int], status: Callable[[], dict[str, Any]]) -> None:
    """Serve /metrics on address (a background thread of prometheus_client)."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(status))
    start_http_server(address[1], addr=address[0], registry=registry)


def render(status: dict[str, Any]) -> str:
    """The exposition text for a status document (for tests and `shopmesh status`)."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: status))
    return generate_latest(registry).decode()
