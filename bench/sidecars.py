"""A client and a server sidecar, outside the mesh, for the mesh-overhead benchmark.

The real parts, wired as the runner wires a pod, minus the pods: the CA
server (pki.ca_server), one agent per sidecar (join token, SVID over SDS,
RBAC over ECDS from mesh/policy.yaml), and the real Envoy binary with the
bootstrap shopmesh.envoyconfig renders from mesh/envoy/sidecar.yaml.j2,
started with the agent's own Envoy flags (pki.envoy.EnvoyOptions). Everything
listens on 127.0.0.1, so the direct run and the meshed run share the same
loopback network and the same server process:

    loadgen ──plaintext──► client Envoy (orders)  127.0.0.1:<outbound search>
                              │ mTLS, orders' SVID, expects search's SPIFFE ID
                              ▼
                           server Envoy (search)  127.0.0.1:<inbound>  RBAC: orders may call GetProducts
                              │ plaintext
                              ▼
    loadgen ──plaintext──► echo server            127.0.0.1:<app>       (the direct run)

Tracing is off (no otlp_collector): the overhead measured is mTLS, RBAC,
the access log and the proxying itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.echo_server import PATH as ECHO_PATH
from bench.procs import BenchError, Process, free_port, python_module, start, wait_for, wait_listening
from pki.durations import parse_duration
from pki.envoy import EnvoyOptions
from pki.testing import AgentProcess, run_ca_server, start_agent
from pki.tokens import create_join_token, write_token_file
from shopmesh import envoyconfig, topology
from shopmesh.policy import DEFAULT_POLICY_PATH

ENVOY = Path(sys.executable).parent / "envoy"
CLIENT, SERVER = "orders", "search"


@dataclass
class SidecarPair:
    direct: str  # the echo server, plaintext
    meshed: str  # the client sidecar's outbound listener for search
    client_envoy: Process
    server_envoy: Process
    server_app: Process
    agents: tuple[AgentProcess, AgentProcess]
    ttl: str


def _pod(name: str, app_port: int, outbound: dict[str, int]) -> envoyconfig.PodAddresses:
    return envoyconfig.PodAddresses(
        name=name, host="127.0.0.1", inbound_bind="127.0.0.1", inbound_port=free_port(),
        app_port=app_port, admin_port=free_port(), outbound_ports=outbound,
    )


def _wait_meshed_call(address: str, timeout: float, logs: tuple[Path, ...]) -> None:
    """Poll until one echo call through both sidecars succeeds (certificates and RBAC delivered)."""

    def works() -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                channel.unary_unary(ECHO_PATH)(b"ping", timeout=1.0)
            except grpc.RpcError:
                return False
        return True

    wait_for(works, f"a call through the sidecars on {address}", timeout=timeout, logs=logs)


@contextlib.contextmanager
def sidecar_pair(work_dir: Path, ttl: str = "1h", timeout: float = 60.0) -> Iterator[SidecarPair]:
    """Start the CA, two agents, two Envoys and the echo server; stop them all on exit.

    The TTL is long by default, so no rotation happens during the measurement
    (the rotation benchmark measures that on its own).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    app_port = free_port()
    server = _pod(SERVER, app_port, {})
    # The client pod renders outbound listeners for both its upstreams; only
    # search's is used. Payments' address is never dialled.
    client = _pod(CLIENT, free_port(), {"search": free_port(), "payments": free_port()})
    pods = {SERVER: server, CLIENT: client, "payments": _pod("payments", free_port(), {})}
    started: list[Process] = []
    with run_ca_server(work_dir / "ca-state", ttl=ttl, log_dir=work_dir) as ca:
        agents: list[AgentProcess] = []
        try:
            app = start(python_module("bench.echo_server", "--listen", f"127.0.0.1:{app_port}"), work_dir / "echo.log")
            started.append(app)
            envoys = []
            for pod in (client, server):
                pod_dir = work_dir / pod.name
                pod_dir.mkdir(exist_ok=True, mode=0o700)
                spiffe_id = topology.spiffe_id_for(pod.name)
                write_token_file(pod_dir / "join-token", create_join_token(ca.state_dir, spiffe_id))
                agent = start_agent(spiffe_id, ca, pod_dir, ["--policy-file", str(DEFAULT_POLICY_PATH)])
                agents.append(agent)
                started.append(agent.process)
                config = pod_dir / "envoy.yaml"
                config.write_text(envoyconfig.render(pod, pods, sds_socket=pod_dir / "sds.sock", ttl_s=parse_duration(ttl).total_seconds()))
                options = EnvoyOptions(ENVOY, config, ("127.0.0.1", pod.admin_port), pod_dir / "envoy.log")
                envoy = start(options.command(), pod_dir / "envoy.log")
                started.append(envoy)
                envoys.append(envoy)
            wait_listening(f"127.0.0.1:{app_port}", "the echo server", app)
            meshed = f"127.0.0.1:{client.outbound_ports['search']}"
            logs = tuple(p.log_path for p in started) + (ca.log_path,)
            wait_listening(f"127.0.0.1:{server.inbound_port}", "the server sidecar's inbound listener", envoys[1], timeout)
            _wait_meshed_call(meshed, timeout, logs)
            for process in started:
                if process.popen.poll() is not None:
                    raise BenchError(f"{process.argv[:3]} exited; see {process.log_path}")
            yield SidecarPair(
                direct=f"127.0.0.1:{app_port}", meshed=meshed, client_envoy=envoys[0], server_envoy=envoys[1],
                server_app=app, agents=(agents[0], agents[1]), ttl=ttl,
            )
        finally:
            for process in reversed(started):
                process.stop()
