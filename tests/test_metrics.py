"""The agent's Prometheus metrics and the alert rules built on them."""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from pki.metrics import render

ROOT = Path(__file__).resolve().parent.parent
SPIFFE_ID = "spiffe://shopmesh.internal/ns/shop/sa/orders"


def _samples(status: dict) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(render(status)) for s in f.samples}


def test_metrics_follow_the_status_document() -> None:
    now = time.time()
    samples = _samples({
        "spiffe_id": SPIFFE_ID, "not_after": now + 30, "issued_at": now - 30, "next_rotation_at": now,
        "rotations": 7, "renewal_failures": 2, "ca_reachable": False, "envoy_live": True, "ready": True,
    })
    assert 25 < samples["shopmesh_agent_svid_expires_in_seconds"] <= 30
    assert samples["shopmesh_agent_svid_lifetime_seconds"] == 60
    assert samples["shopmesh_agent_svid_rotations_total"] == 7
    assert samples["shopmesh_agent_svid_renewal_failures_total"] == 2
    assert samples["shopmesh_agent_ca_reachable"] == 0
    assert samples["shopmesh_agent_ready"] == 1


def test_an_expired_certificate_shows_negative_time_to_expiry() -> None:
    samples = _samples({"spiffe_id": SPIFFE_ID, "not_after": time.time() - 5, "ready": False})
    assert samples["shopmesh_agent_svid_expires_in_seconds"] < 0
    assert samples["shopmesh_agent_ready"] == 0


def test_alert_rules_use_only_metrics_the_agent_exports() -> None:
    exported = set(_samples({"spiffe_id": SPIFFE_ID, "not_after": 1.0, "issued_at": 0.0, "next_rotation_at": 0.5,
                             "ca_reachable": True, "envoy_live": True, "ready": True}))
    rules = yaml.safe_load((ROOT / "mesh" / "prometheus" / "alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"ShopMeshCertificateExpiringSoon", "ShopMeshRenewalsFailing"}
    for alert in alerts:
        for name in re.findall(r"\bshopmesh_[a-z_]+", alert["expr"]):
            assert name in exported, f"{alert['alert']} uses {name}, which no agent exports"
