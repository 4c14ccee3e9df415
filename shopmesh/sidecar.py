"""A pod's sidecar container in compose: render Envoy's config, then run the agent.

    python -m shopmesh.sidecar WORKLOAD [--ttl 5m] [--otlp jaeger:4317]

compose.yaml starts one per pod, in the app container's network namespace
(`network_mode: service:<app>`), and one for the ingress gateway. It

1. waits for the trust bundle in its join volume (written by the CA
   container, see shopmesh.ca_pod), so a pod started before the CA does not
   fail: it waits, with a deadline;
2. renders the pod's Envoy bootstrap from mesh/envoy/*.j2 (shopmesh.envoyconfig):
   in compose every pod is reached by its service name (the templates switch
   to STRICT_DNS for names), the inbound mTLS listener binds every interface
   of the pod, the app, admin and outbound listeners stay on 127.0.0.1;
3. runs `python -m pki.agent`, which joins with the pod's one-time token,
   serves the SVID to Envoy over SDS and supervises Envoy;
4. stays as the agent's parent: it forwards SIGTERM/SIGINT (stop), SIGHUP
   (rotate now: `docker compose kill -s HUP orders-sidecar`) and SIGUSR1
   (reload the policy now), and exits with the agent's status.

A sidecar lives in its app container's network namespace. When that
container restarts, Docker gives it a new namespace and the sidecar is left
in the old one with nothing but loopback: the pod's door would stay shut
for good. The sidecar notices (its network interfaces are gone), stops the
agent and exits with status 3, and Docker's restart policy starts it again
inside the app's new namespace; the agent resumes with the SVID kept on its
volume (or joins again with the fresh token the CA keeper left).

Every flag can also be set through the environment variable named in its help.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pki.durations import parse_duration
from pki.errors import PkiError
from shopmesh import envoyconfig, policy, topology
from shopmesh.config import ConfigError, parse_address

log = logging.getLogger("shopmesh.sidecar")

ORPHANED_EXIT = 3
WATCH_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 15.0
INBOUND_BIND = "0.0.0.0"  # the pod's address, whatever Docker gives it


def _env_default(name: str, default: str | None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shopmesh.sidecar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=list(topology.WORKLOADS), help="which pod this sidecar serves")
    p.add_argument("--ca-join", default=_env_default("SHOPMESH_CA_JOIN", f"ca:{topology.CA_JOIN_PORT}"),
                   help="the CA's join port (env SHOPMESH_CA_JOIN; default %(default)s)")
    p.add_argument("--ca-renew", default=_env_default("SHOPMESH_CA_RENEW", f"ca:{topology.CA_RENEW_PORT}"),
                   help="the CA's renew port (env SHOPMESH_CA_RENEW; default %(default)s)")
    p.add_argument("--ttl", default=_env_default("SHOPMESH_TTL", "5m"),
                   help="the CA's SVID lifetime: no connection lives longer than half of it (env SHOPMESH_TTL; default %(default)s)")
    p.add_argument("--otlp", default=_env_default("SHOPMESH_OTLP_COLLECTOR", None),
                   help="HOST:PORT of an OTLP/gRPC collector for Envoy's spans; none: no tracing (env SHOPMESH_OTLP_COLLECTOR)")
    p.add_argument("--join-dir", type=Path, default=Path("/var/lib/shopmesh/join"),
                   help="this pod's join volume: root.pem and join-token (default %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("/var/lib/shopmesh/agent"),
                   help="this pod's private agent volume: key and SVID (default %(default)s)")
    p.add_argument("--run-dir", type=Path, default=Path("/run/shopmesh"),
                   help="Envoy config, SDS socket, status file (default %(default)s)")
    p.add_argument("--bundle-timeout", default=_env_default("SHOPMESH_BUNDLE_TIMEOUT", "5m"),
                   help="how long to wait for the CA's trust bundle (env SHOPMESH_BUNDLE_TIMEOUT; default %(default)s)")
    p.add_argument("--policy-file", type=Path,
                   default=Path(_env_default("SHOPMESH_POLICY_FILE", str(policy.DEFAULT_POLICY_PATH)) or ""),
                   help="the authorization policy the agent serves to Envoy and reloads when it changes "
                        "(env SHOPMESH_POLICY_FILE; default %(default)s, the one in the image)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default=_env_default("SHOPMESH_LOG_LEVEL", "info"))
    args = p.parse_args(argv)
    for flag, value in (("--ttl", args.ttl), ("--bundle-timeout", args.bundle_timeout)):
        try:
            setattr(args, flag[2:].replace("-", "_") + "_s", parse_duration(value).total_seconds())
        except PkiError as err:
            p.error(f"argument {flag}: {err}")
    for flag, value in (("--ca-join", args.ca_join), ("--ca-renew", args.ca_renew), ("--otlp", args.otlp)):
        if value is None:
            continue
        try:
            parse_address(value, what=flag)
        except ConfigError as err:
            p.error(f"argument {flag}: {err}")
    return args


def pod_addresses() -> dict[str, envoyconfig.PodAddresses]:
    """Every pod as compose runs it: reached by its service name, standard ports inside."""
    out = {}
    for name, workload in topology.WORKLOADS.items():
        out[name] = envoyconfig.PodAddresses(
            name=name,
            host=name,
            inbound_bind=INBOUND_BIND,
            inbound_port=0 if workload.is_gateway else topology.INBOUND_PORT,
            app_port=0 if workload.is_gateway else topology.APP_PORT,
            admin_port=topology.ADMIN_PORT,
            outbound_ports={u: topology.OUTBOUND_PORTS[u] for u in workload.upstreams} if not workload.is_gateway else {},
        )
    return out


def render_config(workload: str, run_dir: Path, ttl_s: float, otlp: str | None) -> Path:
    pods = pod_addresses()
    text = envoyconfig.render(
        pods[workload], pods,
        sds_socket=run_dir / "agent.sock",
        ttl_s=ttl_s,
        # The ingress's client-facing listener: compose publishes it on the host.
        external_bind="0.0.0.0",
        external_port=topology.INGRESS_PORT,
        otlp_collector=otlp,
    )
    path = run_dir / "envoy.yaml"
    path.write_text(text)
    return path


def wait_for_bundle(bundle: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    said = False
    while not bundle.exists():
        if time.monotonic() > deadline:
            return False
        if not said:
            log.info("waiting for the CA's trust bundle at %s", bundle)
            said = True
        time.sleep(0.5)  # polling for a file another container writes
    return True


def _interfaces() -> set[str]:
    return {name for _, name in socket.if_nameindex() if name != "lo"}


def agent_argv(args: argparse.Namespace, envoy_config: Path) -> list[str]:
    workload = topology.WORKLOADS[args.workload]
    envoy = shutil.which("envoy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = [
        sys.executable, "-m", "pki.agent",
        "--spiffe-id", workload.spiffe_id,
        "--ca-join", args.ca_join,
        "--ca-renew", args.ca_renew,
        "--join-token-file", str(args.join_dir / "join-token"),
        "--bundle-file", str(args.join_dir / "root.pem"),
        "--data-dir", str(args.data_dir),
        "--sds-socket", str(args.run_dir / "agent.sock"),
        "--status-file", str(args.run_dir / "status.json"),
        "--envoy-config", str(envoy_config),
        "--envoy-bin", envoy or "envoy",
        "--envoy-admin", f"127.0.0.1:{topology.ADMIN_PORT}",
        # Envoy's own log and access log go to the container's output (`docker compose logs`).
        "--envoy-log", "/dev/stdout",
        "--log-level", args.log_level,
    ]
    if not workload.is_gateway:
        argv += ["--app-health", f"127.0.0.1:{topology.APP_PORT}", "--policy-file", str(args.policy_file)]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.umask(0o077)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    bundle = args.join_dir / "root.pem"
    if not wait_for_bundle(bundle, args.bundle_timeout_s):
        log.error("no trust bundle at %s after %s: is the CA container up, and is this pod's join volume mounted "
                  "at %s in both containers?", bundle, args.bundle_timeout, args.join_dir)
        return 1
    envoy_config = render_config(args.workload, args.run_dir, args.ttl_s, args.otlp)
    interfaces = _interfaces()
    log.info("%s sidecar: Envoy config %s, interfaces %s", args.workload, envoy_config, ", ".join(sorted(interfaces)) or "-")

    agent = subprocess.Popen(agent_argv(args, envoy_config))
    stopping = {"signal": 0}

    def forward(signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping["signal"] = signum
        if agent.poll() is None:
            agent.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)

    orphaned = False
    while agent.poll() is None and not stopping["signal"]:
        if interfaces and not _interfaces():
            log.error("this pod's network interfaces (%s) are gone: the app container restarted into a new network "
                      "namespace; stopping so Docker restarts this sidecar inside it", ", ".join(sorted(interfaces)))
            orphaned = True
            agent.send_signal(signal.SIGTERM)
            break
        try:
            agent.wait(timeout=WATCH_INTERVAL_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        code = agent.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("the agent did not stop within %.0fs: killing it", STOP_TIMEOUT_S)
        agent.kill()
        code = agent.wait()
    if orphaned:
        return ORPHANED_EXIT
    if stopping["signal"]:
        return 0
    log.error("the agent exited with status %d", code)
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
