"""Container health checks: `python -m shopmesh.healthcheck app|sidecar|ca|otlp`.

compose.yaml runs these as HEALTHCHECK commands (grpc_health_probe is not
shipped: a few lines of Python in the image we already have do the same).
Exit status 0 means healthy; otherwise one line on stderr says what is not.

    app [ADDRESS]       grpc.health.v1 Check("") answers SERVING (default 127.0.0.1:50051)
    sidecar [--status FILE] [--admin ADDRESS]
                        Envoy's admin /ready says LIVE, and the pod agent's status file
                        is fresh and ready (SVID valid, Envoy live, app serving)
    ca [--address A] [--bundle FILE] [--keeper-status FILE]
                        the CA's join port answers grpc.health.v1 SERVING over TLS,
                        verified against the bundle, and every pod has a join token
    otlp [ADDRESS]      something accepts TCP connections there (an OTLP receiver)
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shopmesh import topology

TIMEOUT_S = 2.0
# The agent rewrites its status file every second; older than this means the
# agent is gone or stuck, whatever the file says.
STATUS_STALE_S = 5.0
DEFAULT_RUN_DIR = Path("/run/shopmesh")


class Unhealthy(Exception):
    """The check failed; the message says why."""


def _fresh_json(path: Path, what: str) -> dict[str, object]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise Unhealthy(f"no {what} at {path} yet") from None
    except (OSError, json.JSONDecodeError) as err:
        raise Unhealthy(f"unreadable {what} {path}: {err}") from None
    if not isinstance(doc, dict):
        raise Unhealthy(f"{what} {path} is not a JSON object")
    age = time.time() - float(doc.get("updated_at", 0) or 0)
    if age > STATUS_STALE_S:
        raise Unhealthy(f"{what} {path} is {age:.0f}s old: its writer is gone or stuck")
    return doc


def check_app(address: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            raise Unhealthy(f"health check of {address}: {err.code().name}: {err.details()}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(f"{address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")


def check_sidecar(status_file: Path, admin: str) -> None:
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=TIMEOUT_S) as resp:
            body = resp.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace").strip()
        raise Unhealthy(f"Envoy admin {admin}/ready: HTTP {err.code} {body}") from None
    except OSError as err:
        raise Unhealthy(f"Envoy admin {admin}/ready: {err}") from None
    if body != "LIVE":
        raise Unhealthy(f"Envoy admin {admin}/ready says {body!r}")
    status = _fresh_json(status_file, "agent status")
    if not status.get("ready"):
        raise Unhealthy(f"agent not ready: {status.get('last_error') or json.dumps(status, sort_keys=True)}")


def check_ca(address: str, bundle: Path, keeper_status: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pki.ca import CA_SERVER_DNS_NAME

    try:
        bundle_pem = bundle.read_bytes()
    except OSError as err:
        raise Unhealthy(f"no trust bundle yet: {err}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=bundle_pem)
    options = [("grpc.ssl_target_name_override", CA_SERVER_DNS_NAME)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            raise Unhealthy(f"CA health check on {address}: {err.code().name}: {err.details()}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unhealthy(f"the CA on {address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    keeper = _fresh_json(keeper_status, "join token keeper status")
    waiting = keeper.get("waiting") or []
    if waiting:
        raise Unhealthy(f"no join token written yet for: {', '.join(map(str, waiting))}")


def check_tcp(address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=TIMEOUT_S).close()
    except OSError as err:
        raise Unhealthy(f"nothing accepts connections on {address}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shopmesh.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("app", help="the app's grpc.health.v1")
    p.add_argument("address", nargs="?", default=f"127.0.0.1:{topology.APP_PORT}")
    p = sub.add_parser("sidecar", help="Envoy ready and the agent ready")
    p.add_argument("--status", type=Path, default=DEFAULT_RUN_DIR / "status.json")
    p.add_argument("--admin", default=f"127.0.0.1:{topology.ADMIN_PORT}")
    p = sub.add_parser("ca", help="the CA's join port SERVING, and a join token for every pod")
    p.add_argument("--address", default=f"127.0.0.1:{topology.CA_JOIN_PORT}")
    p.add_argument("--bundle", type=Path, default=Path("/var/lib/shopmesh/state/ca/root.pem"))
    p.add_argument("--keeper-status", type=Path, default=DEFAULT_RUN_DIR / "join-keeper.json")
    p = sub.add_parser("otlp", help="an OTLP receiver accepts connections")
    p.add_argument("address", nargs="?", default="127.0.0.1:4317")
    args = parser.parse_args(argv)
    try:
        if args.check == "app":
            check_app(args.address)
        elif args.check == "sidecar":
            check_sidecar(args.status, args.admin)
        elif args.check == "ca":
            check_ca(args.address, args.bundle, args.keeper_status)
        else:
            check_tcp(args.address)
    except Unhealthy as err:
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
