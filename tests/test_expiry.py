"""CA outages (rows 21, 22) against the live mesh with a 10-second TTL:
shorter than the certificates' remaining lifetime, nothing happens; longer,
traffic fails closed, readiness turns false, status says expired, and when
the CA returns everything recovers on its own — no restart."""

from __future__ import annotations

import pytest

from shopmesh.probe import ProbeError

pytestmark = pytest.mark.mesh

MESH_PODS = ("orders", "payments", "search")


def test_a_ca_outage_shorter_than_the_remaining_lifetime_is_invisible(mesh) -> None:  # row 21
    with mesh.traffic(rate=5, kind="orders") as report:
        # Renewal happens at half the lifetime, so every certificate has at
        # least ~4 s left when the CA goes; the outage lasts 3 s.
        mesh.stop_ca()
        mesh.wait(3)
        mesh.start_ca()
        mesh.wait(2)
    assert report.total > 0
    assert report.failures == {}, f"{report.summary()} {report.failure_samples}"


def test_a_ca_outage_past_expiry_fails_closed_and_recovers_by_itself(mesh) -> None:  # row 22
    pids = {w: (mesh.record.pods[w].agent_pid, mesh.agent_status(w)["envoy_pid"]) for w in MESH_PODS}
    mesh.stop_ca()
    mesh.wait_until(lambda: all((e["expires_in_s"] or 0) <= 0 for e in mesh.status().values()), 40,
                    "every certificate to expire")
    status = mesh.status()
    assert all(not e["ready"] for e in status.values()), status
    printed = mesh.cli("status", check=False)
    assert printed.returncode == 1, printed.stdout
    rows = {line.split()[0]: line for line in printed.stdout.splitlines()[1:] if line.split() and line.split()[0] in status}
    assert sorted(rows) == sorted(status) and all(" expired " in row for row in rows.values()), printed.stdout
    for workload in MESH_PODS:
        assert mesh.agent_status(workload)["renewal_failures"] > 0
        metrics = mesh.metrics(workload)
        assert metrics["shopmesh_agent_svid_expires_in_seconds"] <= 0
        assert metrics["shopmesh_agent_ca_reachable"] == 0
        assert metrics["shopmesh_agent_svid_renewal_failures_total"] > 0
        assert metrics["shopmesh_agent_ready"] == 0

    # Fails closed: nothing gets through the mesh, and plaintext is still refused.
    def only_failures() -> bool:
        with mesh.traffic(rate=10, kind="search") as window:
            mesh.wait(1)
        return window.total > 0 and window.successes == 0

    mesh.wait_until(only_failures, 20, "calls through the mesh to fail")
    with pytest.raises(ProbeError):
        mesh.call("search", "SearchProducts", tls=False)

    # The CA returns: agents renew on their own (their agent identity outlives
    # the workload certificates), Envoy gets the new certificates over SDS.
    mesh.start_ca()
    mesh.wait_until(lambda: all(e["ready"] for e in mesh.status().values()), 60, "every workload to be ready again")
    with mesh.traffic(rate=5, kind="orders") as report:
        mesh.wait(2)
    assert report.total > 0 and report.failures == {}, report.failure_samples
    assert mesh.metrics("orders")["shopmesh_agent_ca_reachable"] == 1
    assert mesh.metrics("orders")["shopmesh_agent_svid_expires_in_seconds"] > 0
    # No process was restarted to get there.
    for workload, (agent_pid, envoy_pid) in pids.items():
        assert mesh.record.pods[workload].agent_pid == agent_pid
        assert mesh.agent_status(workload)["envoy_pid"] == envoy_pid
