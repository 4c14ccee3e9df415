"""The agent and the CA server as real processes, no Envoy (ACCEPTANCE rows 4, 5, 18, 21, 22, 23).

Steps mirror what the runner does: start the CA, write a join token, start the
agent for a pod directory, read its status file.
"""

from __future__ import annotations

import random
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pki import db
from pki.agent import MIN_RETRY_S, retry_delay, rotation_due_at
from pki.authority import AuthorityStore, self_signed_root
from pki.ca import LocalCA
from pki.spiffe_ids import agent_id_for
from pki.svid import AGENT_SVID_FILE, SVID_FILE
from pki.testing import (
    CaServer,
    free_port,
    key_pem,
    make_csr,
    run_ca_server,
    start_agent,
    sync_ca_channel,
)
from pki.tokens import create_join_token, write_token_file
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc

ORDERS = "spiffe://shopmesh.internal/ns/shop/sa/orders"
PAYMENTS = "spiffe://shopmesh.internal/ns/shop/sa/payments"


@pytest.fixture(scope="module")
def fast_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    """A CA issuing 4-second SVIDs: rotations every ~2 s."""
    with run_ca_server(tmp_path_factory.mktemp("fast-ca"), ttl="4s") as server:
        yield server


def provision(ca: CaServer, pod: Path, spiffe_id: str = ORDERS) -> None:
    pod.mkdir(parents=True, exist_ok=True)
    write_token_file(pod / "join-token", create_join_token(ca.state_dir, spiffe_id))


# --- rotation arithmetic (deterministic, no processes) ---------------------


def test_rotation_is_due_at_half_the_remaining_lifetime_with_ten_percent_jitter() -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    rng = random.Random(7)
    for remaining_s in (4, 300, 3600):
        not_after = now + timedelta(seconds=remaining_s)
        dues = [(rotation_due_at(not_after, now, rng) - now).total_seconds() for _ in range(500)]
        half = remaining_s / 2
        assert all(0.9 * half <= d <= 1.1 * half for d in dues)
        assert max(dues) - min(dues) > 0.1 * half, "jitter spreads a fleet out"


def test_rotation_uses_the_certificates_not_after_not_the_requested_ttl() -> None:
    # A CA that ignored a 10 s request and issued a year (ACM PCA, moto) is
    # renewed after about half a year, not after 5 s.
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    due = rotation_due_at(now + timedelta(days=365), now, random.Random(1))
    assert timedelta(days=164) < due - now < timedelta(days=201)


def test_retry_back_off_grows_and_is_capped() -> None:
    rng = random.Random(3)
    delays = [retry_delay(n, cap_s=5.0, rng=rng) for n in range(1, 12)]
    assert all(0 < d <= 5.0 for d in delays)
    assert delays[0] <= 0.5
    assert max(delays[-4:]) > 2.0


def test_retries_get_denser_as_expiry_nears() -> None:
    """A CA back before the certificate expires is retried in time: never wait
    more than a third of the time left (but never less than MIN_RETRY_S)."""
    rng = random.Random(3)
    assert retry_delay(10, cap_s=5.0, rng=rng, time_left_s=3.0) <= 1.0
    assert retry_delay(10, cap_s=5.0, rng=rng, time_left_s=0.1) == MIN_RETRY_S
    # Far from expiry, or already past it, the back-off is unchanged.
    assert retry_delay(10, cap_s=5.0, rng=random.Random(3), time_left_s=3600) == retry_delay(10, cap_s=5.0, rng=random.Random(3))
    assert retry_delay(10, cap_s=5.0, rng=random.Random(3), time_left_s=-5) == retry_delay(10, cap_s=5.0, rng=random.Random(3))


# --- bootstrap and rotation -------------------------------------------------


def test_agent_bootstraps_with_a_token_and_rotates(fast_ca: CaServer, tmp_path: Path) -> None:
    pod = tmp_path / "orders"
    provision(fast_ca, pod)
    agent = start_agent(ORDERS, fast_ca, pod)
    try:
        first = agent.status_where(lambda s: s["ready"] and s["serial"], "the first SVID")
        assert first["spiffe_id"] == ORDERS
        assert first["serial"] == first["issued_serial"]
        assert first["serial"] in db.issued_serials(fast_ca.state_dir, ORDERS)
        assert first["envoy_live"] is None and first["app_serving"] is None
        assert first["workload_api_socket"] == str(agent.sds_socket.resolve())
        assert first["agent_spiffe_id"] == agent_id_for(ORDERS) and first["agent_serial"]
        assert first["svid_authority"] == first["signing_authority"] == first["bundle_fingerprints"][0]
        assert 0 < first["expires_in_s"] <= 4
        assert first["not_after"] <= first["updated_at"] + 4
        assert not agent.token_file.exists(), "a spent token is deleted"

        # Row 5: keys on disk are private.
        assert stat.S_IMODE(agent.data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((agent.data_dir / SVID_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE(agent.sds_socket.stat().st_mode) == 0o600

        seen = {first["serial"]}

        def rotated_again(s: dict[str, Any]) -> bool:
            seen.add(s["serial"])
            return len(seen) >= 4

        last = agent.status_where(rotated_again, "three rotations", timeout=20)
        assert last["rotations"] >= 3
        assert last["renewal_failures"] == 0 and last["last_error"] is None
        # Every rotation was a renewal over mTLS: one join in the ledger.
        serials = db.issued_serials(fast_ca.state_dir, ORDERS)
        assert seen <= set(serials)
        # Rotation is scheduled before expiry, from the certificate's notAfter.
        assert last["next_rotation_at"] < last["not_after"]
    finally:
        assert agent.process.stop() == 0
    final = agent.status()
    assert final is not None and final["running"] is False and final["ready"] is False
    assert not agent.sds_socket.exists()


def test_sighup_forces_a_rotation(tmp_path: Path) -> None:
    with run_ca_server(tmp_path / "state", ttl="1h") as ca:
        pod = tmp_path / "orders"
        provision(ca, pod)
        agent = start_agent(ORDERS, ca, pod)
        try:
            first = agent.status_where(lambda s: s["ready"], "the first SVID")
            agent.process.signal(signal.SIGHUP)
            after = agent.status_where(lambda s: s["serial"] != first["serial"], "a new serial after SIGHUP")
            assert after["rotations"] == 1
            assert after["issued_serial"] == db.issued_serials(ca.state_dir, ORDERS)[-1]
        finally:
            agent.process.stop()


def test_restarted_agent_resumes_from_its_persisted_key_without_a_token(tmp_path: Path) -> None:
    with run_ca_server(tmp_path / "state", ttl="1h") as ca:
        pod = tmp_path / "orders"
        provision(ca, pod)
        agent = start_agent(ORDERS, ca, pod)
        before = agent.status_where(lambda s: s["ready"], "the first SVID")
        agent.process.kill()  # SIGKILL: no clean-up at all
        assert not agent.token_file.exists()

        again = start_agent(ORDERS, ca, pod)
        try:
            resumed = again.status_where(lambda s: s["ready"], "the restarted agent to serve")
            assert resumed["serial"] == before["serial"], "resumed from the persisted SVID"
            assert resumed["renewal_failures"] == 0
            again.process.signal(signal.SIGHUP)
            renewed = again.status_where(lambda s: s["serial"] != before["serial"], "a renewal after restart")
            assert renewed["last_error"] is None
            assert db.issued_serials(ca.state_dir, ORDERS)[-1] == renewed["serial"]
        finally:
            again.process.stop()


def test_expired_and_no_token_reports_and_recovers_when_a_token_arrives(tmp_path: Path) -> None:
    # A CA root from two hours ago, so that it can have issued SVIDs that expired an hour ago.
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    AuthorityStore(
        tmp_path / "state" / "ca" / "local", lambda key: [self_signed_root(key, "shopmesh.internal", two_hours_ago)]
    ).load()
    with run_ca_server(tmp_path / "state", ttl="1h") as ca:
        pod = tmp_path / "orders"
        data_dir = pod / "agent"
        data_dir.mkdir(parents=True)
        # Leave expired SVIDs behind (workload and agent), as if the pod had
        # been down for longer than the agent SVID lives.
        local = LocalCA.load_or_create(ca.state_dir)
        an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
        for name, spiffe_id in ((SVID_FILE, ORDERS), (AGENT_SVID_FILE, agent_id_for(ORDERS))):
            key = ec.generate_private_key(ec.SECP256R1())
            chain, bundle = local.issue_svid(make_csr(key, spiffe_id), spiffe_id, timedelta(minutes=5), now=an_hour_ago)
            (data_dir / name).write_bytes(key_pem(key) + chain.encode())
        (data_dir / "bundle.pem").write_text(bundle)

        agent = start_agent(ORDERS, ca, pod)
        try:
            stuck = agent.status_where(lambda s: s["renewal_failures"] >= 2, "renewal failures to be reported")
            assert stuck["ready"] is False
            assert stuck["expires_in_s"] < 0 and stuck["agent_expires_in_s"] < 0
            assert "agent SVID serial" in stuck["last_error"] and "expired at" in stuck["last_error"]
            assert "join token" in stuck["last_error"]
            assert agent.process.popen.poll() is None, "the agent keeps trying instead of exiting"

            write_token_file(pod / "join-token", create_join_token(ca.state_dir, ORDERS))
            recovered = agent.status_where(lambda s: s["ready"], "recovery with the new token")
            assert recovered["last_error"] is None and recovered["expires_in_s"] > 0
        finally:
            agent.process.stop()


def test_ca_down_keeps_the_current_svid_and_recovers(tmp_path: Path) -> None:
    pod = tmp_path / "orders"
    with run_ca_server(tmp_path / "state", ttl="1h") as ca:
        ports = ca.ports
        provision(ca, pod)
        agent = start_agent(ORDERS, ca, pod)
        first = agent.status_where(lambda s: s["ready"], "the first SVID")
    try:
        agent.process.signal(signal.SIGHUP)  # rotate while the CA is down
        failing = agent.status_where(lambda s: s["renewal_failures"] >= 2, "failed renewals while the CA is down")
        assert failing["serial"] == first["serial"] and failing["ready"] is True, "the current SVID is still served"
        assert "UNAVAILABLE" in failing["last_error"]
        with run_ca_server(tmp_path / "state", ttl="1h", ports=ports):
            back = agent.status_where(lambda s: s["serial"] != first["serial"], "renewal once the CA is back")
            assert back["last_error"] is None and back["rotations"] == 1
    finally:
        agent.process.stop()


def test_readiness_follows_the_apps_health(tmp_path: Path) -> None:
    port = free_port()
    app = grpc.server(ThreadPoolExecutor(2))
    app_health = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(app_health, app)
    app.add_insecure_port(f"127.0.0.1:{port}")
    app.start()
    try:
        with run_ca_server(tmp_path / "state", ttl="1h") as ca:
            pod = tmp_path / "orders"
            provision(ca, pod)
            agent = start_agent(ORDERS, ca, pod, ["--app-health", f"127.0.0.1:{port}"])
            try:
                agent.status_where(lambda s: s["app_serving"] is True and s["ready"] is True, "ready with a serving app")
                app_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                down = agent.status_where(lambda s: s["app_serving"] is False, "the app's NOT_SERVING to show")
                assert down["ready"] is False and down["expires_in_s"] > 0
            finally:
                agent.process.stop()
    finally:
        app.stop(0)


# --- Renew refusals (row 4), straight at the CA's mTLS port -----------------


def mint(
    ca: CaServer, spiffe_id: str, *, now: datetime | None = None, local: LocalCA | None = None
) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A key and an SVID for spiffe_id from the CA's active root (or from `local`)."""
    signer = local or LocalCA.load_or_create(ca.state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    chain, _ = signer.issue_svid(make_csr(key, spiffe_id), spiffe_id, timedelta(minutes=5), now=now)
    return key, chain


def renew_with(
    ca: CaServer, key: ec.EllipticCurvePrivateKey, chain_pem: str, csr_for: str | None, method: str = "Renew"
) -> ca_pb2.SvidResponse:
    with sync_ca_channel(ca.renew_address, ca.bundle_path.read_bytes(), key_pem(key), chain_pem.encode()) as channel:
        new_key = ec.generate_private_key(ec.SECP256R1())
        response: ca_pb2.SvidResponse = getattr(ca_pb2_grpc.CertificateAuthorityStub(channel), method)(
            ca_pb2.RenewRequest(csr_pem=make_csr(new_key, csr_for)), timeout=5
        )
        return response


def refused_renewal(ca: CaServer, key: ec.EllipticCurvePrivateKey, chain: str, csr_for: str | None, method: str = "Renew") -> grpc.RpcError:
    before = db.issued_serials(ca.state_dir)
    with pytest.raises(grpc.RpcError) as excinfo:
        renew_with(ca, key, chain, csr_for, method)
    assert db.issued_serials(ca.state_dir) == before, "nothing issued"
    return excinfo.value


def test_an_agent_svid_renews_the_workload_its_token_was_bound_to(fast_ca: CaServer) -> None:
    key, chain = mint(fast_ca, agent_id_for(PAYMENTS))
    response = renew_with(fast_ca, key, chain, None)  # no SAN in the CSR: the CA takes it from the agent ID
    assert response.spiffe_id == PAYMENTS
    leaf = x509.load_pem_x509_certificate(response.cert_chain_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [PAYMENTS]
    assert renew_with(fast_ca, key, chain, agent_id_for(PAYMENTS), "RenewAgent").spiffe_id == agent_id_for(PAYMENTS)


def test_renew_with_an_expired_agent_svid_is_refused(fast_ca: CaServer) -> None:
    key, chain = mint(fast_ca, agent_id_for(ORDERS), now=datetime.now(timezone.utc) - timedelta(hours=1))
    # The TLS handshake itself fails: no RPC reaches the CA.
    assert refused_renewal(fast_ca, key, chain, ORDERS).code() == grpc.StatusCode.UNAVAILABLE


def test_renew_with_a_certificate_from_a_foreign_ca_is_refused(fast_ca: CaServer, tmp_path: Path) -> None:
    foreign = LocalCA.load_or_create(tmp_path / "foreign")  # same trust domain name, different root
    key, chain = mint(fast_ca, agent_id_for(ORDERS), local=foreign)
    assert refused_renewal(fast_ca, key, chain, ORDERS).code() == grpc.StatusCode.UNAVAILABLE


def test_renew_for_another_identity_is_refused(fast_ca: CaServer) -> None:
    key, chain = mint(fast_ca, agent_id_for(ORDERS))
    err = refused_renewal(fast_ca, key, chain, PAYMENTS)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"may renew '{ORDERS}' only" in err.details() and f"asks for '{PAYMENTS}'" in err.details()
    err = refused_renewal(fast_ca, key, chain, agent_id_for(PAYMENTS), "RenewAgent")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("method", ["Renew", "RenewAgent"])
def test_a_workload_svid_renews_nothing(fast_ca: CaServer, method: str) -> None:
    """The workload key is in Envoy and the app (Workload API): it must not mint itself new certificates."""
    key, chain = mint(fast_ca, ORDERS)
    err = refused_renewal(fast_ca, key, chain, None, method)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"'{ORDERS}' is not an agent SVID" in err.details()


# --- agent identity vs workload identity ---------------------------------------


def test_the_agent_svid_rotates_on_its_own_schedule(tmp_path: Path) -> None:
    with run_ca_server(tmp_path / "state", ttl="1h", extra=["--agent-ttl", "4s"]) as ca:
        pod = tmp_path / "orders"
        provision(ca, pod)
        agent = start_agent(ORDERS, ca, pod)
        try:
            first = agent.status_where(lambda s: s["ready"], "the first SVIDs")
            assert first["agent_spiffe_id"] == agent_id_for(ORDERS)
            assert 0 < first["agent_expires_in_s"] <= 4
            assert stat.S_IMODE((agent.data_dir / AGENT_SVID_FILE).stat().st_mode) == 0o600
            later = agent.status_where(lambda s: s["agent_rotations"] >= 2, "two agent SVID rotations", timeout=20)
            assert later["agent_serial"] != first["agent_serial"]
            assert later["serial"] == first["serial"] and later["rotations"] == 0, "the workload SVID was left alone"
            assert later["last_error"] is None
            assert set(db.issued_serials(ca.state_dir, agent_id_for(ORDERS))) >= {first["agent_serial"], later["agent_serial"]}
        finally:
            agent.process.stop()


def test_a_workload_svid_that_expired_during_a_ca_outage_recovers_without_a_token(tmp_path: Path) -> None:
    """Row 22: the CA is down past the workload SVID's expiry; when it returns, the agent renews
    with its (still valid) agent SVID. No new join token, no restart."""
    pod = tmp_path / "orders"
    with run_ca_server(tmp_path / "state", ttl="3s") as ca:
        ports = ca.ports
        provision(ca, pod)
        agent = start_agent(ORDERS, ca, pod)
        first = agent.status_where(lambda s: s["ready"], "the first SVID")
    try:
        expired = agent.status_where(
            lambda s: s["expires_in_s"] < 0 and s["renewal_failures"] >= 1, "the workload SVID to expire", timeout=20
        )
        assert expired["ready"] is False and expired["agent_expires_in_s"] > 0
        assert not agent.token_file.exists()
        with run_ca_server(tmp_path / "state", ttl="3s", ports=ports):
            back = agent.status_where(lambda s: s["ready"], "recovery once the CA is back")
            assert back["serial"] != first["serial"] and back["last_error"] is None
            assert back["agent_serial"] == first["agent_serial"], "recovered with the agent SVID it had"
            assert db.issued_serials(ca.state_dir, ORDERS)[-1] == back["serial"]
    finally:
        agent.process.stop()


def test_an_agent_whose_ca_was_replaced_joins_again_when_given_a_token(tmp_path: Path) -> None:
    """The CA's root changed while the agent's SVIDs were still valid: the CA refuses them, and a
    fresh join token (what `shopmesh up` writes) gets the pod back without a restart."""
    pod = tmp_path / "orders"
    with run_ca_server(tmp_path / "state", ttl="1h") as ca:
        ports = ca.ports
        provision(ca, pod)
        agent = start_agent(ORDERS, ca, pod)
        first = agent.status_where(lambda s: s["ready"], "the first SVIDs")
    shutil.rmtree(tmp_path / "state" / "ca" / "local")  # a new root; same token database
    try:
        with run_ca_server(tmp_path / "state", ttl="1h", ports=ports) as ca:
            agent.process.signal(signal.SIGHUP)
            refused = agent.status_where(lambda s: s["renewal_failures"] >= 1, "the renewal to be refused")
            assert "Renew" in refused["last_error"] and refused["ready"] is True
            write_token_file(pod / "join-token", create_join_token(ca.state_dir, ORDERS))
            back = agent.status_where(
                lambda s: s["agent_serial"] != first["agent_serial"] and s["last_error"] is None, "a new join"
            )
            assert back["svid_authority"] == back["bundle_fingerprints"][0] != first["svid_authority"]
            assert not agent.token_file.exists()
    finally:
        agent.process.stop()


# --- flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--spiffe-id", "spiffe://Shopmesh.internal/ns/shop/sa/orders", "must be lowercase"),
        ("--ca-join", "localhost", "is not HOST:PORT"),
        ("--ca-renew", "127.0.0.1:99999", "outside 1..65535"),
        ("--envoy-admin", "0.0.0.0:9901", "not a loopback address"),
        ("--app-health", "10.0.0.1:50051", "not a loopback address"),
        ("--bundle-file", "/nonexistent/root.pem", "No such file"),
        ("--backoff-max", "soon", "invalid duration 'soon'"),
    ],
)
def test_a_bad_flag_exits_2_naming_it(tmp_path: Path, flag: str, value: str, expected: str) -> None:
    bundle = tmp_path / "root.pem"
    bundle.write_text(LocalCA.load_or_create(tmp_path).bundle_pem)
    args = {
        "--spiffe-id": ORDERS,
        "--ca-join": "127.0.0.1:1",
        "--ca-renew": "127.0.0.1:2",
        "--join-token-file": str(tmp_path / "token"),
        "--bundle-file": str(bundle),
        "--data-dir": str(tmp_path / "data"),
        "--sds-socket": str(tmp_path / "sds.sock"),
        "--status-file": str(tmp_path / "status.json"),
        flag: value,
    }
    argv = [sys.executable, "-m", "pki.agent", *(x for kv in args.items() for x in kv)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"argument {flag}" in result.stderr and expected in result.stderr
    assert not (tmp_path / "data").exists(), "nothing created before the flags are valid"


def test_envoy_flags_go_together(tmp_path: Path) -> None:
    bundle = tmp_path / "root.pem"
    bundle.write_text(LocalCA.load_or_create(tmp_path).bundle_pem)
    argv = [
        sys.executable, "-m", "pki.agent", "--spiffe-id", ORDERS, "--ca-join", "127.0.0.1:1", "--ca-renew", "127.0.0.1:2",
        "--join-token-file", str(tmp_path / "t"), "--bundle-file", str(bundle), "--data-dir", str(tmp_path / "d"),
        "--sds-socket", str(tmp_path / "s"), "--status-file", str(tmp_path / "st"), "--envoy-config", str(bundle),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "argument --envoy-bin: required when --envoy-config is given" in result.stderr
