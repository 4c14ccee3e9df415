"""`shopmesh`: run the local mesh, place a demo order, inspect workloads.

    shopmesh up [-d] [--ttl 10m] [--state-dir .state]   start the mesh
    shopmesh down                                         stop it
    shopmesh demo [--json] [--card NUMBER]                tokenize a card, place an order
    shopmesh status [--json]                              identities, serials, expiry, readiness
    shopmesh rotate WORKLOAD                              force a certificate rotation now
    shopmesh policy reload|show [WORKLOAD …]              apply mesh/policy.yaml to every sidecar now
    shopmesh metrics WORKLOAD                             the agent's Prometheus metrics
    shopmesh envoy WORKLOAD [PATH]                        read a sidecar's Envoy admin (e.g. /stats)
    shopmesh traces [TRACE_ID]                            recent traces, or one as a tree
    shopmesh ca rotate [--step prepare|activate|retire]   rotate the CA without downtime
    shopmesh payments rotate-key|rewrap|audit verify      card vault administration
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import yaml
from opentelemetry.trace import StatusCode

from pki.durations import parse_duration
from pki.errors import DurationError
from services.payments import admin as payments_admin
from services.payments.cards import brand_of
from shopmesh import ca_admin, policy, runner, telemetry, topology, traces
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.search.v1 import search_pb2, search_pb2_grpc

DEFAULT_STATE_DIR = Path(os.environ.get("SHOPMESH_STATE_DIR", ".state"))
DEFAULT_TTL = "10m"
DEMO_CARD = "4242 4242 4242 4242"  # the classic test Visa; any Luhn-valid test card works
RPC_TIMEOUT_S = 10.0


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).resolve()


def cmd_up(args: argparse.Namespace) -> int:
    try:
        ttl_s = parse_duration(args.ttl).total_seconds()
    except DurationError as exc:
        print(f"shopmesh up: --ttl: {exc}", file=sys.stderr)
        return 2
    state_dir = _state_dir(args)
    try:
        payments_env = payments_admin.payments_env_for_up(args, state_dir)
    except payments_admin.AdminError as exc:
        print(f"shopmesh up: {exc}", file=sys.stderr)
        return 2
    try:
        ca_args = ca_admin.up_ca_args(args)
    except ValueError as exc:
        print(f"shopmesh up: {exc}", file=sys.stderr)
        return 2
    print(f"starting the mesh (state in {state_dir}, certificate TTL {args.ttl}) …", flush=True)
    try:
        record = runner.up(state_dir, ttl_s, ingress_port=args.ingress_port, network=args.network,
                           extra_app_env={"payments": payments_env}, ca_args=ca_args,
                           policy_file=Path(args.policy) if args.policy else None)
    except policy.PolicyError as exc:
        print(f"shopmesh up: {exc}", file=sys.stderr)
        return 2
    _print_status(runner.workload_status(record), record.ttl_s)
    print(f"\ningress: {record.external} (gRPC, plaintext on loopback); logs: {state_dir / 'logs'}")
    if args.detach:
        return 0
    # Foreground: stay until Ctrl-C or `shopmesh down`, then tear everything down.
    record.runner_pid = os.getpid()
    record.save()
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("running; Ctrl-C stops the mesh", flush=True)
    while not stop["now"]:
        signal.pause()
    print("stopping …", flush=True)
    runner.teardown(runner.MeshRecord.load(state_dir))
    (state_dir / "mesh.json").unlink(missing_ok=True)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    runner.down(_state_dir(args))
    print("mesh stopped")
    return 0


_RED, _YELLOW, _RESET = "\033[31m", "\033[33m", "\033[0m"


def _colour(text: str, colour: str | None) -> str:
    # Colour only for a person at a terminal; NO_COLOR (no-color.org) turns it off.
    if colour is None or not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return text
    return f"{colour}{text}{_RESET}"


def _expiry_colour(expires_in_s: float | None, ttl_s: float) -> str | None:
    """Red once expired; yellow once less than a quarter of the TTL is left,
    which means a renewal due at half the TTL is overdue."""
    if expires_in_s is None:
        return None
    if expires_in_s <= 0:
        return _RED
    return _YELLOW if expires_in_s < ttl_s / 4 else None


def _print_status(entries: list[dict[str, Any]], ttl_s: float) -> None:
    header = ("NAME", "SPIFFE ID", "SERIAL", "EXPIRES IN", "ADDRESS", "READY")
    rows = []
    colours = []
    for e in entries:
        left = e["expires_in_s"]
        expires = "-" if left is None else ("expired" if left <= 0 else f"{left:.0f}s")
        address = e["inbound"] or f"{e.get('external')} (external)"
        serial = (e["serial"] or "-")[:16]
        rows.append((e["name"], e["spiffe_id"], serial, expires, address, "yes" if e["ready"] else "NO"))
        colours.append((_expiry_colour(left, ttl_s), None if e["ready"] else _RED))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    print("  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip())
    for row, (expiry_colour, ready_colour) in zip(rows, colours):
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        cells[3] = _colour(cells[3], expiry_colour)
        cells[5] = _colour(cells[5], ready_colour)
        print("  ".join(cells).rstrip())
    for e in entries:
        if e.get("last_error"):
            print(f"{e['name']}: {e['last_error']}")


def cmd_status(args: argparse.Namespace) -> int:
    record = runner.MeshRecord.load(_state_dir(args))
    entries = runner.workload_status(record)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        _print_status(entries, record.ttl_s)
    return 0 if all(e["ready"] for e in entries) else 1


def cmd_policy(args: argparse.Namespace) -> int:
    record = runner.MeshRecord.load(_state_dir(args))
    if args.action == "show":
        from google.protobuf import json_format

        from shopmesh.policyserver import rbac_resource

        unknown = [w for w in args.workloads if w not in topology.GRPC_SERVICES]
        if unknown:
            print(f"shopmesh policy show: no sidecar enforces a policy for {', '.join(unknown)} "
                  f"(choose from {', '.join(topology.GRPC_SERVICES)})", file=sys.stderr)
            return 2
        rules = policy.load_policy(Path(record.policy_file))
        for name in args.workloads or list(topology.GRPC_SERVICES):
            rbac = json_format.MessageToDict(rbac_resource(name, rules).typed_config)
            print(f"# {name}: RBAC its sidecar enforces (from {record.policy_file})")
            print(yaml.safe_dump(rbac, sort_keys=False))
        return 0
    try:
        before = {e["name"]: runner.agent_status(record, e["name"]).get("policy_version") for e in runner.workload_status(record)}
        signalled = runner.reload_policy(record)
    except policy.PolicyError as exc:
        print(f"shopmesh policy reload: {exc}; the sidecars keep the policy they have", file=sys.stderr)
        return 2

    def applied() -> bool:
        for name in signalled:
            doc = runner.agent_status(record, name)
            if doc.get("policy_error") or not doc.get("policy_version") or doc.get("policy_acked") != doc.get("policy_version"):
                return False
        return True

    runner.wait_for(applied, 30, "every sidecar to apply the policy")
    for name in signalled:
        version = runner.agent_status(record, name)["policy_version"]
        note = "unchanged" if version == before.get(name) else "applied"
        print(f"{name}: policy {version} {note}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    record = runner.MeshRecord.load(_state_dir(args))
    pod = record.pods.get(args.workload)
    if pod is None:
        print(f"shopmesh rotate: unknown workload '{args.workload}' (known: {', '.join(record.pods)})", file=sys.stderr)
        return 2
    before = runner.workload_status(record)
    old = next(e["serial"] for e in before if e["name"] == args.workload)
    runner.request_rotation(record, args.workload)

    def rotated() -> bool:
        now = next(e for e in runner.workload_status(record) if e["name"] == args.workload)
        return bool(now["serial"]) and now["serial"] != old

    runner.wait_for(rotated, 30, f"{args.workload} to serve a new certificate")
    new = next(e["serial"] for e in runner.workload_status(record) if e["name"] == args.workload)
    print(f"{args.workload}: serial {old} -> {new}")
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    record = runner.MeshRecord.load(_state_dir(args))
    if args.workload not in record.pods:
        print(f"shopmesh envoy: unknown workload '{args.workload}'", file=sys.stderr)
        return 2
    sys.stdout.write(runner.envoy_admin(record, args.workload, args.path))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    record = runner.MeshRecord.load(_state_dir(args))
    sys.stdout.write(runner.agent_metrics(record, args.workload))
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    return traces.run(_state_dir(args), args)


def _demo_cvv(card: str) -> str:
    # Amex cards have a 4-digit security code, every other brand 3.
    return "1234" if brand_of("".join(ch for ch in card if ch.isdigit())) == "amex" else "123"


def _card_label(order: orders_pb2.Order) -> str:
    return order.card or "-"


def cmd_demo(args: argparse.Namespace) -> int:
    if args.ingress:
        # Another mesh's ingress (the compose stack's): no local receiver to
        # export the client span to; the calls still carry its traceparent.
        external, collector = args.ingress, None
    else:
        record = runner.MeshRecord.load(_state_dir(args))
        external, collector = record.external, (record.otlp if record.otlp_pid else None)
    # One trace for the whole demo (tokenize, search, order), rooted in a span
    # of this command and exported to the mesh's OTLP receiver; every call
    # carries its W3C traceparent, so the id printed is the order's trace
    # (`shopmesh traces TRACE_ID`).
    with (
        # Export only while the mesh's receiver runs: a stale address from a
        # stopped mesh may belong to nothing on this machine any more.
        telemetry.client_trace("shopmesh demo", collector) as demo_trace,
        grpc.insecure_channel(external) as plain_channel,
    ):
        trace_id = demo_trace.trace_id
        channel = demo_trace.channel(plain_channel)
        payments = payments_pb2_grpc.PaymentsStub(channel)
        search = search_pb2_grpc.SearchStub(channel)
        orders = orders_pb2_grpc.OrdersStub(channel)
        try:
            year = datetime.now(timezone.utc).year + 3
            card = payments.Tokenize(
                payments_pb2.TokenizeRequest(card_number=args.card, exp_month=12, exp_year=year, cvv=_demo_cvv(args.card)),
                timeout=RPC_TIMEOUT_S,
            )
            found = search.SearchProducts(
                search_pb2.SearchProductsRequest(query=args.query, page_size=2),
                timeout=RPC_TIMEOUT_S,
            )
            if not found.products:
                print(f"shopmesh demo: no product matches '{args.query}'", file=sys.stderr)
                return 1
            items = [orders_pb2.LineItem(product_id=p.id, quantity=i + 1) for i, p in enumerate(found.products)]
            order = orders.PlaceOrder(
                orders_pb2.PlaceOrderRequest(items=items, payment_token=card.token, idempotency_key=str(uuid.uuid4())),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            demo_trace.span.set_status(StatusCode.ERROR, f"{exc.code().name}: {exc.details()}")
            print(f"shopmesh demo: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        demo_trace.span.set_attribute("demo.order_id", order.order_id)
        if order.state != orders_pb2.ORDER_STATE_PAID:
            demo_trace.span.set_status(StatusCode.ERROR, f"order not paid: {order.failure_reason}")
    state = orders_pb2.OrderState.Name(order.state).removeprefix("ORDER_STATE_").lower()
    result = {
        "order_id": order.order_id,
        "state": state,
        "card": _card_label(order),
        "trace_id": trace_id,
        "total_minor": order.total_minor,
        "currency": order.currency,
        "items": [{"product_id": i.product_id, "name": i.name, "quantity": i.quantity} for i in order.items],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"order    {result['order_id']}")
        print(f"state    {state}")
        for item in result["items"]:
            print(f"item     {item['quantity']} × {item['name']} ({item['product_id']})")
        print(f"total    {order.total_minor / 100:.2f} {order.currency}")
        print(f"card     {result['card']}")
        print(f"trace    {trace_id}")
    return 0 if state == "paid" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shopmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runner does")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="where keys, databases, logs live (default: %(default)s; env SHOPMESH_STATE_DIR)")
        return p

    p = add("up", "start the local mesh and wait until every workload is ready")
    p.add_argument("-d", "--detach", action="store_true", help="return once healthy, leave the mesh running")
    p.add_argument("--ttl", default=DEFAULT_TTL, help="certificate lifetime, e.g. 10s, 5m (default: %(default)s)")
    p.add_argument("--ingress-port", type=int, default=topology.INGRESS_PORT, help="client-facing port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--policy", help=f"authorization policy file (default: {policy.DEFAULT_POLICY_PATH}); sidecars reload it when it changes")
    p.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto",
                   help="pod isolation: a network namespace per pod (needs root) or shared loopback (default: auto)")
    payments_admin.add_kms_options(p)
    ca_admin.add_up_arguments(p)
    p.set_defaults(func=cmd_up)

    add("down", "stop the mesh").set_defaults(func=cmd_down)

    p = add("demo", "tokenize a test card and place an order through the ingress")
    p.add_argument("--json", action="store_true")
    p.add_argument("--card", default=DEMO_CARD, help="test card number (default: a test Visa)")
    p.add_argument("--query", default="coffee", help="what to search for and buy (default: %(default)s)")
    p.add_argument("--ingress", metavar="HOST:PORT",
                   help="use this ingress instead of the local mesh's, e.g. the compose stack's 127.0.0.1:8080")
    p.set_defaults(func=cmd_demo)

    p = add("status", "each workload's identity, certificate and readiness")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = add("metrics", "a workload agent's Prometheus metrics (certificate expiry, renewals, CA reachability)")
    p.add_argument("workload", choices=list(topology.WORKLOADS))
    p.set_defaults(func=cmd_metrics)

    p = add("policy", "the authorization policy: reload it into every sidecar, or show the RBAC each enforces")
    p.add_argument("action", choices=("reload", "show"))
    p.add_argument("workloads", nargs="*", help=f"with show: which of {', '.join(topology.GRPC_SERVICES)} (default: all)")
    p.set_defaults(func=cmd_policy)

    p = add("rotate", "force a certificate rotation now and wait for the new serial")
    p.add_argument("workload", choices=list(topology.WORKLOADS))
    p.set_defaults(func=cmd_rotate)

    p = add("envoy", "GET a path from a workload's Envoy admin (inside its pod)")
    p.add_argument("workload", choices=list(topology.WORKLOADS))
    p.add_argument("path", nargs="?", default="/stats", help="admin path (default: %(default)s)")
    p.set_defaults(func=cmd_envoy)

    p = add("traces", "list recent traces from the mesh's OTLP receiver, or show one as a tree")
    traces.add_arguments(p)
    p.set_defaults(func=cmd_traces)

    payments_admin.add_payments_commands(sub, str(DEFAULT_STATE_DIR))
    ca_admin.register(sub, add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except runner.RunnerError as exc:
        print(f"shopmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
