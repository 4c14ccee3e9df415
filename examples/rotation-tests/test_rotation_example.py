"""Rotation, expiry and CA-outage tests written the way a user writes them:
a separate suite, nothing imported from ShopMesh's own tests, only the
`mesh` fixture of the shopmesh pytest plugin.

Run it (as root, for one network namespace per pod):
    pytest examples/rotation-tests
"""

from __future__ import annotations

import pytest

WORKLOADS = ("orders", "payments", "search")


def test_orders_flow_through_rotations_and_a_short_ca_outage(mesh):
    """Certificates rotate every ~5 s (TTL 10 s); the CA goes away for less
    than their remaining lifetime. Not one order may fail."""
    first = {w: mesh.cert(w).serial for w in WORKLOADS}
    with mesh.traffic(rate=5, kind="orders") as report:
        mesh.rotate("payments")  # force one now, on top of the scheduled ones
        mesh.stop_ca()
        mesh.wait(3)  # an outage shorter than the certificates' remaining lifetime
        mesh.start_ca()
        mesh.wait_until(lambda: all(mesh.cert(w).serial != first[w] for w in WORKLOADS), timeout=30,
                        what="every workload to serve a new certificate")
    print(report.summary())
    assert report.total > 0
    assert report.failures == {}, report.failure_samples


def test_an_expired_certificate_fails_closed_and_recovers(mesh):
    """Freeze search's agent until its certificate expires: calls to search
    fail (never in plaintext), search is not ready; unfreeze it and search
    recovers with no restart."""
    expired = mesh.expire("search")
    assert mesh.status()["search"]["ready"] is False
    assert mesh.status()["search"]["expires_in_s"] <= 0

    def only_failures() -> bool:
        with mesh.traffic(rate=10, kind="search") as window:
            mesh.wait(1)
        return window.total > 0 and window.successes == 0

    # Connections opened before expiry may live on briefly (at most half the
    # TTL); after that, nothing gets through.
    mesh.wait_until(only_failures, timeout=20, what="calls to search to fail")
    mesh.resume("search")
    mesh.wait_until(lambda: mesh.status()["search"]["ready"], timeout=30, what="search to be ready again")
    assert mesh.cert("search").serial != expired.serial
    with mesh.traffic(rate=10, kind="search") as report:
        mesh.wait(2)
    assert report.total > 0 and report.failures == {}, report.failure_samples


@pytest.mark.parametrize("workload", WORKLOADS)
def test_forced_rotation_gives_a_new_serial(mesh, workload):
    before = mesh.cert(workload)
    after = mesh.rotate(workload)
    assert after.serial != before.serial
    assert after.spiffe_id == before.spiffe_id
    assert after.not_after > before.not_after
