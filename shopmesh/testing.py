"""pytest plugin: test certificate rotation, expiry and CA outages against a real mesh.

Installed with the project (entry point `pytest11: shopmesh`), it gives your
tests a `mesh` fixture: the local ShopMesh mesh (CA, agents, the real Envoy
binary, one network namespace per pod when run as root), started once per
distinct configuration and shared by the tests that ask for it, plus the
levers a rotation test needs:

    def test_orders_survive_a_ca_outage(mesh):
        with mesh.traffic(rate=10) as report:
            mesh.stop_ca()
            mesh.wait(seconds=3)          # shorter than the remaining lifetime
            mesh.start_ca()
        assert report.failures == {}

Configure it per test (or module) with indirect parametrization:

    @pytest.mark.parametrize("mesh", [{"ttl": "10s"}], indirect=True)

or for the whole suite in pytest.ini: `shopmesh_ttl = 10s`.

Whatever a test disturbs (a stopped CA, a paused agent) is put back after
it, and the mesh is ready again before the next test starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest

from shopmesh import probe, runner, topology
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.search.v1 import search_pb2, search_pb2_grpc

DEFAULT_TTL = "10s"
TEST_CARD = "4242424242424242"


@dataclass(frozen=True)
class CertInfo:
    """The certificate a workload's Envoy is serving right now."""

    spiffe_id: str
    serial: str
    not_after: float  # epoch seconds
    expires_in_s: float


@dataclass(frozen=True)
class Identity:
    """A certificate and key to present to a sidecar."""

    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes


def _identity_from(ca: Any, spiffe_id: str, ttl: timedelta, now: datetime | None) -> Identity:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    chain, _bundle = ca.issue_svid(csr.public_bytes(serialization.Encoding.PEM), spiffe_id, ttl, now=now)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Identity(spiffe_id, chain.encode(), key_pem)


@dataclass
class TrafficReport:
    """What `mesh.traffic()` saw. Safe to read while traffic still flows."""

    kind: str
    rate: float
    successes: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # gRPC status name → count
    failure_samples: list[str] = field(default_factory=list)  # the first few, with details
    latencies_ms: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return self.successes + sum(self.failures.values())

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds (p in 0..100) over all calls."""
        with self._lock:
            values = sorted(self.latencies_ms)
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(p) - 1))]

    def summary(self) -> str:
        return (
            f"{self.kind} at {self.rate:g}/s: {self.total} calls, {self.successes} ok, "
            f"failures {dict(self.failures) or 'none'}, p50 {self.percentile(50):.1f} ms, "
            f"p99 {self.percentile(99):.1f} ms"
        )

    def _record(self, latency_ms: float, error: grpc.RpcError | None) -> None:
        with self._lock:
            self.latencies_ms.append(latency_ms)
            if error is None:
                self.successes += 1
            else:
                self.failures[error.code().name] += 1
                if len(self.failure_samples) < 10:
                    self.failure_samples.append(f"{error.code().name}: {error.details()}")


class Mesh:
    """A running mesh and the levers of a rotation test."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._paused: set[str] = set()

    # -- reading -------------------------------------------------------------

    @property
    def record(self) -> runner.MeshRecord:
        return runner.MeshRecord.load(self.state_dir)

    @property
    def policy_file(self) -> Path:
        """The authorization policy file the sidecars serve and watch. With
        the `own_policy` parameter it is this mesh's own copy, to edit."""
        return Path(self.record.policy_file)

    @property
    def ingress(self) -> str:
        """host:port of the ingress gateway (plaintext gRPC on loopback)."""
        return self.record.external

    def status(self) -> dict[str, dict[str, Any]]:
        """`shopmesh status --json`, keyed by workload name."""
        return {e["name"]: e for e in runner.workload_status(self.record)}

    def agent_status(self, workload: str) -> dict[str, Any]:
        """The agent's own status file (rotations, renewal failures, last error …)."""
        return dict(json.loads(self.record.pods[workload].status_file.read_text()))

    def cert(self, workload: str) -> CertInfo:
        entry = self.status()[workload]
        agent = self.agent_status(workload)
        if not entry["serial"]:
            raise AssertionError(f"{workload} is serving no certificate yet")
        not_after = float(agent["not_after"])
        return CertInfo(entry["spiffe_id"], entry["serial"], not_after, not_after - time.time())

    def envoy(self, workload: str, path: str = "/stats") -> str:
        """GET an Envoy admin path of a workload (from inside its pod)."""
        return runner.envoy_admin(self.record, workload, path)

    def stats(self, workload: str) -> dict[str, int]:
        return runner.envoy_stats(self.record, workload)

    def metrics(self, workload: str) -> dict[str, float]:
        """The workload agent's Prometheus metrics, as {name: value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = runner.agent_metrics(self.record, workload)
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}

    def log(self, name: str) -> str:
        """A process log: `ca`, `<workload>.app`, `<workload>.agent`, `<workload>.envoy`."""
        return (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, pattern: str, timeout: float = 15) -> str:
        """Poll a process log until a line matches the regex `pattern`; return that line."""
        import re

        found: list[str] = []

        def match() -> bool:
            found[:] = [line for line in self.log(name).splitlines() if re.search(pattern, line)]
            return bool(found)

        self.wait_until(match, timeout, f"a line matching {pattern!r} in {name}.log")
        return found[0]

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `shopmesh ARGS --state-dir <this mesh>`."""
        proc = subprocess.run([sys.executable, "-m", "shopmesh.cli", *args, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"shopmesh {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def dump_logs(self, lines: int = 40) -> str:
        parts = []
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- acting as a workload ---------------------------------------------------

    def mint_svid(self, workload: str, ttl_s: float = 300, now: datetime | None = None) -> Identity:
        """An SVID for `workload` (a name or a full SPIFFE ID) signed by this
        mesh's CA: what a pod holding that identity would present. `now` in
        the past gives an already-expired certificate."""
        from pki.ca import LocalCA

        spiffe_id = workload if workload.startswith("spiffe://") else topology.spiffe_id_for(workload)
        return _identity_from(LocalCA.load_or_create(self.state_dir), spiffe_id, timedelta(seconds=ttl_s), now)

    def foreign_svid(self, workload: str, ttl_s: float = 300) -> Identity:
        """An SVID with the right SPIFFE ID from a CA this mesh does not trust."""
        from pki.ca import LocalCA

        foreign_dir = Path(tempfile.mkdtemp(prefix="shopmesh-foreign-ca-"))
        spiffe_id = topology.spiffe_id_for(workload)
        return _identity_from(LocalCA.load_or_create(foreign_dir), spiffe_id, timedelta(seconds=ttl_s), None)

    def call(
        self, target: str, method: str, request: bytes = b"", *, identity: Identity | None = None,
        metadata: tuple[tuple[str, str], ...] = (), tls: bool = True,
    ) -> probe.ProbeResult:
        """One unary gRPC call straight to `target`'s inbound sidecar port, as
        `identity` (or with no client certificate). `method` is the bare name
        (`Charge`) or a full path. Raises probe.ProbeError when the connection
        or handshake is refused."""
        path = method if method.startswith("/") else f"/{topology.GRPC_SERVICES[target]}/{method}"
        inbound = self.record.pods[target].inbound
        assert inbound, f"{target} has no inbound port"
        bundle = (self.state_dir / "ca" / "root.pem").read_bytes()
        return probe.grpc_unary(
            inbound, path, request, tls=tls, metadata=metadata, ca_pem=bundle,
            cert_pem=identity.cert_pem if identity else None, key_pem=identity.key_pem if identity else None,
        )

    def connect(self, target: str, *, identity: Identity | None = None) -> probe.GrpcConnection:
        """An HTTP/2 connection to `target`'s inbound port that stays open
        across calls (`conn.call(path)`), to watch what rotation and
        connection age do to it."""
        inbound = self.record.pods[target].inbound
        assert inbound, f"{target} has no inbound port"
        bundle = (self.state_dir / "ca" / "root.pem").read_bytes()
        return probe.GrpcConnection(
            inbound, ca_pem=bundle,
            cert_pem=identity.cert_pem if identity else None, key_pem=identity.key_pem if identity else None,
        )

    def method_path(self, target: str, method: str) -> str:
        return f"/{topology.GRPC_SERVICES[target]}/{method}"

    # -- waiting -------------------------------------------------------------

    def wait_until(self, condition: Callable[[], Any], timeout: float = 30, what: str = "a condition") -> None:
        """Poll `condition` until it is truthy; fail naming `what` after `timeout` seconds."""
        runner.wait_for(lambda: bool(condition()), timeout, what)

    def wait(self, seconds: float) -> None:
        """Let time pass *on purpose* (an outage of a given length), not to synchronise."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))

    def wait_ready(self, timeout: float = 60) -> None:
        runner.wait_ready(self.record, timeout)

    # -- levers -----------------------------------------------------------------

    def rotate(self, workload: str, timeout: float = 30) -> CertInfo:
        """Force a rotation and wait until Envoy serves the new certificate."""
        before = self.cert(workload).serial
        runner.request_rotation(self.record, workload)
        self.wait_until(lambda: self.status()[workload]["serial"] not in (None, before), timeout,
                        f"{workload} to serve a certificate other than {before}")
        return self.cert(workload)

    def expire(self, workload: str, timeout: float | None = None) -> CertInfo:
        """Let the workload's certificate really expire: freeze its agent
        (SIGSTOP; Envoy keeps serving what it has) until notAfter has passed.
        The agent stays frozen until `resume(workload)` or the end of the test."""
        cert = self.cert(workload)
        self.freeze_agent(workload)
        limit = timeout if timeout is not None else cert.expires_in_s + 30
        runner.wait_for(lambda: time.time() > cert.not_after + 0.5, limit, f"{workload}'s certificate to expire")
        return cert

    def freeze_agent(self, workload: str) -> None:
        """Freeze a workload's agent (SIGSTOP): no renewals, no Envoy restarts,
        while Envoy keeps serving what it has. `resume(workload)` or the end of
        the test unfreezes it."""
        pid = self.record.pods[workload].agent_pid
        assert pid is not None, f"{workload} has no agent"
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(workload)

    def resume(self, workload: str) -> None:
        """Unfreeze an agent frozen by freeze_agent() or expire()."""
        pid = self.record.pods[workload].agent_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused.discard(workload)

    def stop_ca(self) -> None:
        """Stop the CA server; agents keep their certificates and retry with backoff."""
        runner.stop_ca(self.record)

    def start_ca(self) -> None:
        """Start the CA server again (same keys, same addresses) and wait until it answers."""
        runner.start_ca(self.record)

    def restart_agent(self, workload: str) -> int:
        """SIGKILL a workload's agent and start a new one; return its pid."""
        self.resume(workload)
        return runner.restart_agent(self.record, workload)

    @contextlib.contextmanager
    def traffic(self, rate: float = 10.0, kind: str = "orders", timeout: float = 10.0) -> Iterator[TrafficReport]:
        """Keep real RPCs flowing through the ingress at `rate` per second
        while the block runs; the report counts successes, failures by status
        code, and latencies. `kind`: "orders" (Tokenize once, then PlaceOrder)
        or "search" (SearchProducts)."""
        if kind not in ("orders", "search"):
            raise ValueError(f"traffic kind must be 'orders' or 'search', not {kind!r}")
        report = TrafficReport(kind=kind, rate=rate)
        stop = threading.Event()
        channel = grpc.insecure_channel(self.ingress)
        call = self._order_call(channel, timeout) if kind == "orders" else self._search_call(channel, timeout)

        def loop() -> None:
            interval = 1.0 / rate
            next_at = time.monotonic()
            while not stop.is_set():
                started = time.monotonic()
                error: grpc.RpcError | None = None
                try:
                    call()
                except grpc.RpcError as exc:
                    error = exc
                report._record((time.monotonic() - started) * 1000, error)
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))

        thread = threading.Thread(target=loop, name="shopmesh-traffic", daemon=True)
        thread.start()
        try:
            yield report
        finally:
            stop.set()
            thread.join(timeout + 5)
            channel.close()

    def _order_call(self, channel: grpc.Channel, timeout: float) -> Callable[[], None]:
        year = datetime.now(timezone.utc).year + 3
        token = payments_pb2_grpc.PaymentsStub(channel).Tokenize(
            payments_pb2.TokenizeRequest(card_number=TEST_CARD, exp_month=12, exp_year=year, cvv="123"), timeout=timeout,
        ).token
        orders = orders_pb2_grpc.OrdersStub(channel)

        def place() -> None:
            order = orders.PlaceOrder(orders_pb2.PlaceOrderRequest(
                items=[orders_pb2.LineItem(product_id="sku-0001", quantity=1)],
                payment_token=token, idempotency_key=str(uuid.uuid4()),
            ), timeout=timeout)
            if order.state != orders_pb2.ORDER_STATE_PAID:
                raise _NotPaid(order)

        return place

    def _search_call(self, channel: grpc.Channel, timeout: float) -> Callable[[], None]:
        search = search_pb2_grpc.SearchStub(channel)

        def query() -> None:
            search.SearchProducts(search_pb2.SearchProductsRequest(query="coffee", page_size=5), timeout=timeout)

        return query

    def heal(self, timeout: float = 60) -> None:
        """Undo what a test disturbed and wait until every workload is ready."""
        for workload in list(self._paused):
            self.resume(workload)
        record = self.record
        if not record.ca_pid or not runner._alive(record.ca_pid):
            runner.start_ca(record)
        self.wait_ready(timeout)


class _NotPaid(grpc.RpcError):
    """An order that came back without being paid counts as a failed call."""

    def __init__(self, order: orders_pb2.Order) -> None:
        super().__init__()
        self._order = order

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        state = orders_pb2.OrderState.Name(self._order.state)
        return f"order {self._order.order_id} ended {state}: {self._order.failure_reason}"


# -- the plugin -----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("shopmesh_ttl", "certificate TTL of the `mesh` fixture", default=DEFAULT_TTL)
    parser.addini("shopmesh_network", "pod isolation: auto, netns or loopback", default="auto")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mesh: runs the real local ShopMesh mesh (Envoy, CA, agents, apps)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mesh(state_dir: Path, ttl: str, network: str = "auto", extra_args: list[str] | None = None) -> Mesh:
    """Start a mesh with the `shopmesh` CLI (as a user would) and return its handle."""
    argv = [sys.executable, "-m", "shopmesh.cli", "up", "-d", "--ttl", ttl, "--network", network,
            "--ingress-port", str(_free_port()), "--state-dir", str(state_dir), *(extra_args or [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    mesh = Mesh(state_dir)
    if proc.returncode != 0:
        logs = mesh.dump_logs() if (state_dir / "logs").exists() else ""
        raise RuntimeError(f"`shopmesh up` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{logs}")
    return mesh


def stop_mesh(mesh: Mesh) -> None:
    proc = subprocess.run([sys.executable, "-m", "shopmesh.cli", "down", "--state-dir", str(mesh.state_dir)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`shopmesh down` failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def _shopmesh_instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Mesh]]:
    meshes: dict[str, Mesh] = {}
    try:
        yield meshes
    finally:
        for mesh in meshes.values():
            stop_mesh(mesh)


@pytest.fixture
def mesh(request: pytest.FixtureRequest, _shopmesh_instances: dict[str, Mesh],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A running ShopMesh mesh, shared by every test with the same configuration."""
    params: dict[str, Any] = dict(getattr(request, "param", None) or {})
    ttl = str(params.pop("ttl", request.config.getini("shopmesh_ttl")))
    network = str(params.pop("network", request.config.getini("shopmesh_network")))
    extra = list(params.pop("up_args", []))
    own_policy = bool(params.pop("own_policy", False))
    if params:
        raise pytest.UsageError(f"unknown mesh parameters {sorted(params)}: use ttl, network, up_args, own_policy")
    key = json.dumps([ttl, network, extra, own_policy])
    if key not in _shopmesh_instances:
        # One mesh at a time keeps a small machine honest: stop the others.
        for other in list(_shopmesh_instances):
            stop_mesh(_shopmesh_instances.pop(other))
        state_dir = tmp_path_factory.mktemp("shopmesh")
        if own_policy:
            import shutil

            from shopmesh.policy import DEFAULT_POLICY_PATH

            shutil.copy(DEFAULT_POLICY_PATH, state_dir / "policy.yaml")
            extra = [*extra, "--policy", str(state_dir / "policy.yaml")]
        try:
            _shopmesh_instances[key] = start_mesh(state_dir, ttl, network, extra)
        except RuntimeError as exc:
            pytest.fail(str(exc))
    handle = _shopmesh_instances[key]
    failed_before = request.session.testsfailed
    yield handle
    if request.session.testsfailed > failed_before:
        print(f"\n--- shopmesh logs ({handle.state_dir}) ---\n{handle.dump_logs()}")
    handle.heal()


__all__ = ["CertInfo", "Identity", "Mesh", "TrafficReport", "mesh", "start_mesh", "stop_mesh"]
