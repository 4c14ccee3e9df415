"""The local runner: the whole mesh as processes on this machine.

`shopmesh up` starts the CA server, then for every pod its app, its agent
(which obtains the pod's SVID and launches Envoy), and the ingress gateway.
As root each pod gets its own network namespace (shopmesh.netns); otherwise
all pods share loopback with distinct ports, and a warning says so.

Everything the run needs to find again (addresses, process ids) is written to
<state-dir>/mesh.json; `shopmesh down`, `status` and the tests read it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from pki import tokens as join_tokens
from shopmesh import envoyconfig, netns, policy, telemetry, topology

log = logging.getLogger("shopmesh.runner")

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
# A status file older than this means its agent is gone or stuck.
STATUS_STALE_S = 5.0


class RunnerError(RuntimeError):
    """The mesh could not be started or stopped; the message says why and where to look."""


@dataclass
class PodRecord:
    name: str
    spiffe_id: str
    dir: str
    netns: str | None
    host: str
    inbound_port: int | None
    app_port: int | None
    admin_port: int
    outbound_ports: dict[str, int]
    app_pid: int | None = None
    agent_pid: int | None = None
    # How each process was started, so one can be restarted alone
    # (shopmesh.testing restarts agents; a crashed app can be started again).
    app_argv: list[str] = field(default_factory=list)
    app_env: dict[str, str] = field(default_factory=dict)
    agent_argv: list[str] = field(default_factory=list)
    # The agent's Prometheus /metrics, on the pod's own 127.0.0.1.
    metrics_port: int | None = None

    @property
    def inbound(self) -> str | None:
        return f"{self.host}:{self.inbound_port}" if self.inbound_port else None

    @property
    def status_file(self) -> Path:
        return Path(self.dir) / "status.json"


@dataclass
class MeshRecord:
    state_dir: str
    mode: str  # "netns" or "loopback"
    ttl_s: float
    ca_join: str
    ca_renew: str
    external: str  # the ingress's client-facing host:port
    mesh_id: str | None = None
    subnet: str | None = None
    ca_pid: int | None = None
    ca_argv: list[str] = field(default_factory=list)
    # The OTLP/gRPC receiver (shopmesh.otlp_receiver): apps and Envoys export
    # spans to this host:port; they land in <state-dir>/traces/.
    otlp: str = ""
    otlp_pid: int | None = None
    runner_pid: int | None = None
    pods: dict[str, PodRecord] = field(default_factory=dict)
    # Extra environment per app, from `shopmesh up` options (e.g. payments'
    # SHOPMESH_KMS*): settings only, never credentials.
    extra_app_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # Extra CA server flags from `shopmesh up` (the CA backend: --ca acm-pca
    # --pca-arn …, see pki.ca_server); AWS settings reach it by environment.
    ca_args: list[str] = field(default_factory=list)
    # The authorization policy every sidecar agent serves (and watches).
    policy_file: str = str(policy.DEFAULT_POLICY_PATH)

    def save(self) -> None:
        path = Path(self.state_dir) / "mesh.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> "MeshRecord":
        path = state_dir / "mesh.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunnerError(f"no mesh is running from {state_dir} (no {path}); start one with `shopmesh up`") from None
        raw["pods"] = {k: PodRecord(**v) for k, v in raw["pods"].items()}
        return cls(**raw)

    @property
    def network(self) -> netns.PodNetwork | None:
        if self.mode != "netns" or self.mesh_id is None or self.subnet is None:
            return None
        return netns.PodNetwork(self.mesh_id, self.subnet)

    def exec_prefix(self, pod: str) -> list[str]:
        network = self.network
        return network.exec_prefix(pod) if network and self.pods[pod].netns else []


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mesh_id_for(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:4]


def _subnet_for(mesh_id: str) -> str:
    # 10.89.<n>.0/24 with n from the mesh id: two state directories on one
    # machine get different subnets (a clash is detected and reported).
    return f"10.89.{int(mesh_id, 16) % 250 + 1}.0/24"


def pod_aws_endpoints(record: MeshRecord, environ: Mapping[str, str]) -> dict[str, str]:
    """AWS endpoint variables (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>) as a pod process must see them.

    A pod has its own loopback, so an AWS stand-in (moto, LocalStack) that
    the host reaches on a loopback address is, from inside a pod namespace,
    at the pod bridge's host address (it must listen there, e.g. on 0.0.0.0).
    Only loopback endpoints are rewritten; others are inherited unchanged.
    """
    network = record.network
    if network is None:
        return {}
    rewritten = {}
    for name, value in environ.items():
        if not name.startswith("AWS_ENDPOINT_URL"):
            continue
        parts = urlsplit(value)
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            netloc = network.host_ip + (f":{parts.port}" if parts.port else "")
            rewritten[name] = urlunsplit(parts._replace(netloc=netloc))
    return rewritten


def _log_file(state_dir: Path, name: str) -> Any:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return open(logs / f"{name}.log", "ab", buffering=0)


def _spawn(state_dir: Path, log_name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    out = _log_file(state_dir, log_name)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # Own session: the processes outlive `shopmesh up -d`, and a stray
            # Ctrl-C in the terminal does not reach them.
            start_new_session=True,
        )
    finally:
        out.close()
    log.debug("started %s (pid %d): %s", log_name, proc.pid, " ".join(argv))
    return proc.pid


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        # Reap it if it is our exited child, so it does not linger as a zombie.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll `condition` until it holds; raise RunnerError naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise RunnerError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# -- starting ---------------------------------------------------------------


def plan(state_dir: Path, ttl_s: float, ingress_port: int, network: str) -> MeshRecord:
    """Decide addresses and ports for every part of the mesh (nothing started yet)."""
    reason = netns.available()
    if network == "netns" and reason:
        raise RunnerError(f"--network netns needs network namespaces, but {reason}")
    mode = "netns" if network == "netns" or (network == "auto" and reason is None) else "loopback"
    if mode == "loopback" and network == "auto":
        log.warning(
            "pods share loopback (%s): apps are reachable from other pods on 127.0.0.1. "
            "Run as root for one network namespace per pod.", reason,
        )
    record = MeshRecord(
        state_dir=str(state_dir), mode=mode, ttl_s=ttl_s, ca_join="", ca_renew="",
        external=f"127.0.0.1:{ingress_port}",
    )
    if mode == "netns":
        record.mesh_id = mesh_id_for(state_dir)
        record.subnet = _subnet_for(record.mesh_id)
        pod_net = record.network
        assert pod_net is not None
        record.ca_join = f"{pod_net.host_ip}:{topology.CA_JOIN_PORT}"
        record.ca_renew = f"{pod_net.host_ip}:{topology.CA_RENEW_PORT}"
        record.otlp = f"{pod_net.host_ip}:{topology.OTLP_RECEIVER_PORT}"
    else:
        record.ca_join = f"127.0.0.1:{_free_port()}"
        record.ca_renew = f"127.0.0.1:{_free_port()}"
        record.otlp = f"127.0.0.1:{_free_port()}"
    for index, (name, workload) in enumerate(topology.WORKLOADS.items()):
        pod_dir = state_dir / "pods" / name
        if workload.is_gateway:
            # The ingress runs in the host namespace: its client-facing
            # listener is on the host's loopback, and it has no mesh inbound.
            record.pods[name] = PodRecord(
                name=name, spiffe_id=workload.spiffe_id, dir=str(pod_dir), netns=None,
                host="127.0.0.1", inbound_port=None, app_port=None,
                admin_port=_free_port(), outbound_ports={}, metrics_port=_free_port(),
            )
        elif mode == "netns":
            pod_net = record.network
            assert pod_net is not None
            record.pods[name] = PodRecord(
                name=name, spiffe_id=workload.spiffe_id, dir=str(pod_dir),
                netns=pod_net.netns(name), host=pod_net.pod_ip(index),
                inbound_port=topology.INBOUND_PORT, app_port=topology.APP_PORT,
                admin_port=topology.ADMIN_PORT, metrics_port=topology.METRICS_PORT,
                outbound_ports={u: topology.OUTBOUND_PORTS[u] for u in workload.upstreams},
            )
        else:
            record.pods[name] = PodRecord(
                name=name, spiffe_id=workload.spiffe_id, dir=str(pod_dir), netns=None,
                host="127.0.0.1", inbound_port=_free_port(), app_port=_free_port(),
                admin_port=_free_port(), metrics_port=_free_port(),
                outbound_ports={u: _free_port() for u in workload.upstreams},
            )
    return record


def _addresses(record: MeshRecord) -> dict[str, envoyconfig.PodAddresses]:
    return {
        name: envoyconfig.PodAddresses(
            name=name, host=pod.host, inbound_bind=pod.host,
            inbound_port=pod.inbound_port or 0, app_port=pod.app_port or 0,
            admin_port=pod.admin_port, outbound_ports=pod.outbound_ports,
        )
        for name, pod in record.pods.items()
    }


def _python() -> str:
    return sys.executable


def _start_ca(record: MeshRecord, state_dir: Path) -> None:
    record.ca_argv = [
        _python(), "-m", "pki.ca_server",
        "--state-dir", str(state_dir),
        "--join-listen", record.ca_join,
        "--renew-listen", record.ca_renew,
        "--ttl", f"{record.ttl_s}s",
        *record.ca_args,
    ]
    start_ca(record)


def start_ca(record: MeshRecord) -> None:
    """Start the CA server (again) as recorded, and wait until it answers."""
    state_dir = Path(record.state_dir)
    record.ca_pid = _spawn(state_dir, "ca", record.ca_argv)
    record.save()
    bundle = state_dir / "ca" / "root.pem"

    def ca_up() -> bool:
        if not _alive(record.ca_pid):
            raise RunnerError(f"the CA server exited; see {state_dir / 'logs' / 'ca.log'}:\n{_tail(state_dir / 'logs' / 'ca.log')}")
        if not bundle.exists():
            return False
        host, port = record.ca_join.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
        except OSError:
            return False
        return True

    wait_for(ca_up, 30, f"the CA server on {record.ca_join}")


def _start_otlp_receiver(record: MeshRecord, state_dir: Path) -> None:
    """Start the OTLP receiver on record.otlp (every pod reaches it there) and wait until it listens."""
    record.otlp_pid = _spawn(state_dir, "otlp-receiver", [
        _python(), "-m", "shopmesh.otlp_receiver", "--listen", record.otlp, "--out", str(state_dir / "traces"),
    ])
    record.save()
    logf = state_dir / "logs" / "otlp-receiver.log"

    def listening() -> bool:
        if not _alive(record.otlp_pid):
            raise RunnerError(f"the OTLP receiver exited; see {logf}:\n{_tail(logf)}")
        host, port = record.otlp.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
        except OSError:
            return False
        return True

    wait_for(listening, 30, f"the OTLP receiver on {record.otlp}")


def _start_pod(record: MeshRecord, state_dir: Path, pod: PodRecord, addresses: dict[str, envoyconfig.PodAddresses], external_port: int) -> None:
    pod_dir = Path(pod.dir)
    pod_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(pod_dir, 0o700)
    prefix = record.exec_prefix(pod.name)
    sds_socket = pod_dir / "agent.sock"
    envoy_config = pod_dir / "envoy.yaml"
    envoy_config.write_text(envoyconfig.render(
        addresses[pod.name], addresses, sds_socket=sds_socket, ttl_s=record.ttl_s,
        external_port=external_port, otlp_collector=record.otlp or None,
    ))
    token_file = pod_dir / "join-token"
    join_tokens.write_token_file(token_file, join_tokens.create_join_token(state_dir, pod.spiffe_id))

    if pod.app_port is not None:
        workload = topology.WORKLOADS[pod.name]
        assert workload.app_module is not None
        env = {
            "SHOPMESH_APP_LISTEN": f"127.0.0.1:{pod.app_port}",
            "SHOPMESH_DATA_DIR": str(pod_dir / "data"),
            # The agent serves the SPIFFE Workload API on its socket (pki.workload_api).
            "SPIFFE_ENDPOINT_SOCKET": f"unix://{sds_socket}",
            **telemetry.app_environment(pod.name, record.otlp),
            **record.extra_app_env.get(pod.name, {}),
            **pod_aws_endpoints(record, os.environ),
        }
        for upstream, port in pod.outbound_ports.items():
            env[f"SHOPMESH_UPSTREAM_{upstream.upper()}"] = f"127.0.0.1:{port}"
        pod.app_argv = [*prefix, _python(), "-m", workload.app_module]
        pod.app_env = env
        pod.app_pid = _spawn(state_dir, f"{pod.name}.app", pod.app_argv, env)

    argv = [
        *prefix, _python(), "-m", "pki.agent",
        "--spiffe-id", pod.spiffe_id,
        "--ca-join", record.ca_join,
        "--ca-renew", record.ca_renew,
        "--join-token-file", str(token_file),
        "--bundle-file", str(state_dir / "ca" / "root.pem"),
        "--data-dir", str(pod_dir / "agent"),
        "--sds-socket", str(sds_socket),
        "--status-file", str(pod.status_file),
        "--envoy-config", str(envoy_config),
        "--envoy-bin", str(Path(_python()).parent / "envoy"),
        "--envoy-admin", f"127.0.0.1:{pod.admin_port}",
        "--envoy-log", str(state_dir / "logs" / f"{pod.name}.envoy.log"),
    ]
    if pod.app_port is not None:
        argv += ["--app-health", f"127.0.0.1:{pod.app_port}"]
    if not topology.WORKLOADS[pod.name].is_gateway:
        argv += ["--policy-file", record.policy_file]
    if pod.metrics_port:
        argv += ["--metrics-listen", f"127.0.0.1:{pod.metrics_port}"]
    pod.agent_argv = argv
    pod.agent_pid = _spawn(state_dir, f"{pod.name}.agent", argv)
    record.save()


def up(
    state_dir: Path, ttl_s: float, ingress_port: int = topology.INGRESS_PORT, network: str = "auto",
    extra_app_env: dict[str, dict[str, str]] | None = None,
    ca_args: list[str] | None = None,
    policy_file: Path | None = None,
) -> MeshRecord:
    """Start the whole mesh and return once every workload is ready.

    `extra_app_env` adds environment variables per app (by pod name);
    `ca_args` adds CA server flags (see `python -m pki.ca_server --help`)."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (state_dir / "mesh.json").exists():
        existing = MeshRecord.load(state_dir)
        if any(_alive(p) for p in _all_pids(existing)):
            raise RunnerError(f"a mesh is already running from {state_dir}; stop it with `shopmesh down --state-dir {state_dir}`")
        teardown(existing)
    record = plan(state_dir, ttl_s, ingress_port, network)
    if policy_file is not None:
        policy.load_policy(policy_file)  # a bad policy stops `up` here, naming the mistake
        record.policy_file = str(policy_file.resolve())
    record.extra_app_env = {name: dict(env) for name, env in (extra_app_env or {}).items()}
    record.ca_args = list(ca_args or [])
    record.save()
    started = False
    try:
        pod_net = record.network
        if pod_net is not None:
            pod_net.destroy(list(record.pods))  # leftovers of a crashed run
            pod_net.create_bridge()
            for index, name in enumerate(record.pods):
                if record.pods[name].netns:
                    pod_net.create_pod(name, index)
        _start_otlp_receiver(record, state_dir)
        _start_ca(record, state_dir)
        addresses = _addresses(record)
        external_port = int(record.external.rsplit(":", 1)[1])
        for pod in record.pods.values():
            _start_pod(record, state_dir, pod, addresses, external_port)
        wait_ready(record, READY_TIMEOUT_S)
        started = True
    finally:
        if not started:  # any failure, or Ctrl-C: leave nothing behind
            teardown(record)
    return record


def _all_pids(record: MeshRecord) -> list[int]:
    pids = [record.ca_pid, record.otlp_pid] + [p for pod in record.pods.values() for p in (pod.agent_pid, pod.app_pid)]
    return [p for p in pids if p is not None]


def wait_ready(record: MeshRecord, timeout_s: float) -> None:
    state_dir = Path(record.state_dir)

    def all_ready() -> bool:
        for pod in record.pods.values():
            for role, pid in (("agent", pod.agent_pid), ("app", pod.app_pid)):
                if pid is not None and not _alive(pid):
                    logf = state_dir / "logs" / f"{pod.name}.{role}.log"
                    raise RunnerError(f"the {pod.name} {role} exited; see {logf}:\n{_tail(logf)}")
        return all(s["ready"] for s in workload_status(record))

    try:
        wait_for(all_ready, timeout_s, "every workload to be ready")
    except RunnerError as exc:
        if "timed out" not in str(exc):
            raise
        waiting = [s["name"] for s in workload_status(record) if not s["ready"]]
        raise RunnerError(f"{exc}: not ready: {', '.join(waiting)} (logs in {state_dir / 'logs'})") from None


# -- status -------------------------------------------------------------------


def agent_status(record: MeshRecord, pod: str) -> dict[str, Any]:
    """A workload agent's own status document ({} if it has written none yet)."""
    try:
        return dict(json.loads(record.pods[pod].status_file.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def workload_status(record: MeshRecord) -> list[dict[str, Any]]:
    """One entry per workload, as `shopmesh status --json` prints it."""
    now = time.time()
    out = []
    for pod in record.pods.values():
        try:
            agent = json.loads(pod.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            agent = {}
        fresh = bool(agent) and now - float(agent.get("updated_at", 0)) < STATUS_STALE_S and _alive(pod.agent_pid)
        not_after = agent.get("not_after")
        expires_in = round(float(not_after) - now, 1) if not_after else None
        entry: dict[str, Any] = {
            "name": pod.name,
            "spiffe_id": pod.spiffe_id,
            "serial": agent.get("serial"),
            "expires_in_s": expires_in,
            "inbound": pod.inbound,
            "ready": bool(fresh and agent.get("ready") and expires_in is not None and expires_in > 0
                          and (pod.app_pid is None or _alive(pod.app_pid))),
        }
        if topology.WORKLOADS[pod.name].is_gateway:
            entry["external"] = record.external
        # The agent's SDS socket also serves the SPIFFE Workload API.
        entry["workload_api_socket"] = agent.get("workload_api_socket") or str(Path(pod.dir) / "agent.sock")
        if agent.get("last_error"):
            entry["last_error"] = agent["last_error"]
        out.append(entry)
    return out


# -- stopping -------------------------------------------------------------------


def _terminate(pids: list[int], timeout_s: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        wait_for(lambda: not any(_alive(p) for p in pids), timeout_s, "processes to stop", 0.1)
    except RunnerError:
        for pid in pids:
            if _alive(pid):
                log.warning("pid %d did not stop on SIGTERM; killing its process group", pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def teardown(record: MeshRecord) -> None:
    """Stop every process of the mesh and remove its network; safe to repeat."""
    # Agents first (each stops its Envoy), then apps, then the CA; the OTLP
    # receiver last, so the spans the others flush on their way out land.
    agents = [p.agent_pid for p in record.pods.values() if p.agent_pid]
    apps = [p.app_pid for p in record.pods.values() if p.app_pid]
    _terminate(agents, STOP_TIMEOUT_S)
    _terminate(apps, STOP_TIMEOUT_S)
    _terminate([record.ca_pid] if record.ca_pid else [], STOP_TIMEOUT_S)
    _terminate([record.otlp_pid] if record.otlp_pid else [], STOP_TIMEOUT_S)
    # Envoys whose agent was killed outright: each ran in its agent's process group.
    for pid in agents:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    pod_net = record.network
    if pod_net is not None:
        for name in record.pods:
            for pid in pod_net.pids_in(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        pod_net.destroy(list(record.pods))
    for pod in record.pods.values():
        pod.agent_pid = pod.app_pid = None
    record.ca_pid = record.otlp_pid = None
    record.save()


def down(state_dir: Path) -> None:
    record = MeshRecord.load(state_dir.resolve())
    if record.runner_pid and record.runner_pid != os.getpid() and _alive(record.runner_pid):
        # A foreground `shopmesh up` owns this mesh: ask it to stop, and let it clean up.
        os.kill(record.runner_pid, signal.SIGTERM)
        wait_for(lambda: not _alive(record.runner_pid), STOP_TIMEOUT_S * 3, "the foreground `shopmesh up` to stop")
        record = MeshRecord.load(state_dir.resolve())
    teardown(record)
    (state_dir / "mesh.json").unlink(missing_ok=True)


# -- poking at a running mesh ---------------------------------------------------


def envoy_admin(record: MeshRecord, pod: str, path: str, timeout_s: float = 5.0) -> str:
    """GET `path` from a workload's Envoy admin, which listens on the pod's own
    127.0.0.1: run the request inside the pod's network namespace."""
    return _get_in_pod(record, pod, record.pods[pod].admin_port, path, timeout_s)


def agent_metrics(record: MeshRecord, pod: str, timeout_s: float = 5.0) -> str:
    """A workload agent's Prometheus /metrics (on the pod's own 127.0.0.1)."""
    port = record.pods[pod].metrics_port
    if not port:
        raise RunnerError(f"the {pod} agent serves no metrics")
    return _get_in_pod(record, pod, port, "/metrics", timeout_s)


def _get_in_pod(record: MeshRecord, pod: str, port: int, path: str, timeout_s: float) -> str:
    code = (
        "import sys, urllib.request;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}' + sys.argv[1], timeout={timeout_s}).read().decode())"
    )
    proc = subprocess.run(
        [*record.exec_prefix(pod), _python(), "-c", code, path],
        capture_output=True, text=True, timeout=timeout_s + 10,
    )
    if proc.returncode != 0:
        raise RunnerError(f"GET 127.0.0.1:{port}{path} in the {pod} pod: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def envoy_stats(record: MeshRecord, pod: str) -> dict[str, int]:
    """A workload's Envoy counters and gauges as a dict."""
    stats = {}
    for line in envoy_admin(record, pod, "/stats").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            stats[name] = int(value)
    return stats


def stop_ca(record: MeshRecord) -> None:
    """Stop the CA server (agents keep serving what they have, and retry)."""
    if record.ca_pid:
        _terminate([record.ca_pid], STOP_TIMEOUT_S)
    record.ca_pid = None
    record.save()


def restart_agent(record: MeshRecord, pod: str, *, kill: bool = True) -> int:
    """Kill a workload's agent outright (SIGKILL: no goodbye to Envoy) and
    start a new one with the same arguments; return the new pid."""
    agent = record.pods[pod]
    if kill and agent.agent_pid and _alive(agent.agent_pid):
        os.kill(agent.agent_pid, signal.SIGKILL)
        wait_for(lambda: not _alive(agent.agent_pid), STOP_TIMEOUT_S, f"the {pod} agent to die")
    agent.agent_pid = _spawn(Path(record.state_dir), f"{pod}.agent", agent.agent_argv)
    record.save()
    return agent.agent_pid


def reload_policy(record: MeshRecord) -> list[str]:
    """Check the policy file, then tell every sidecar agent to serve it now
    (SIGUSR1); return the workloads signalled. A bad file raises PolicyError
    and nothing is signalled: the sidecars keep the policy they have."""
    policy.load_policy(Path(record.policy_file))
    signalled = []
    for name, pod in record.pods.items():
        if topology.WORKLOADS[name].is_gateway or not _alive(pod.agent_pid):
            continue
        assert pod.agent_pid is not None
        os.kill(pod.agent_pid, signal.SIGUSR1)
        signalled.append(name)
    return signalled


def request_rotation(record: MeshRecord, pod: str) -> None:
    """Ask a workload's agent to renew its SVID now (SIGHUP)."""
    pid = record.pods[pod].agent_pid
    if not _alive(pid):
        raise RunnerError(f"the {pod} agent is not running")
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
