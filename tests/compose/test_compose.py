"""The compose suite: the real compose.yaml, built and run under the Docker engine.

Numbered steps with one purpose each, in the order they run:
1. orders placed from outside, through the ingress's host port;
2. from a container on the stack's network: plaintext and app ports unreachable;
3. the order's trace, found where compose sends traces;
4. a short TTL through several rotations with steady traffic: zero failures;
5. a service restarted: its orders survive;
6. the `aws` profile (a second project): moto, the CA on ACM PCA, payments on KMS.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any

import grpc
import pytest

from compose_stack import REPO, Stack, StackError, say
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.search.v1 import search_pb2, search_pb2_grpc

RPC_TIMEOUT_S = 10.0
PODS = ("orders", "search", "payments")
SIDECARS = ("ingress", "orders-sidecar", "search-sidecar", "payments-sidecar")
ROTATIONS = 3


def _traceparent() -> tuple[str, tuple[tuple[str, str], ...]]:
    trace_id = secrets.token_hex(16)
    return trace_id, (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),)


def place_order(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> orders_pb2.Order:
    card = payments_pb2_grpc.PaymentsStub(channel).Tokenize(
        payments_pb2.TokenizeRequest(card_number="4242 4242 4242 4242", exp_month=12,
                                     exp_year=datetime.now(timezone.utc).year + 3, cvv="123"),
        timeout=RPC_TIMEOUT_S, metadata=metadata)
    found = search_pb2_grpc.SearchStub(channel).SearchProducts(
        search_pb2.SearchProductsRequest(query="coffee", page_size=2), timeout=RPC_TIMEOUT_S, metadata=metadata)
    assert found.products, "the catalog has coffee"
    items = [orders_pb2.LineItem(product_id=p.id, quantity=i + 1) for i, p in enumerate(found.products)]
    order: orders_pb2.Order = orders_pb2_grpc.OrdersStub(channel).PlaceOrder(
        orders_pb2.PlaceOrderRequest(items=items, payment_token=card.token, idempotency_key=str(uuid.uuid4())),
        timeout=RPC_TIMEOUT_S, metadata=metadata)
    return order


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)  # polling with a deadline


def test_01_orders_through_the_ingress_host_port(stack: Stack) -> None:
    with grpc.insecure_channel(stack.ingress) as channel:
        orders = [place_order(channel) for _ in range(3)]
    for order in orders:
        assert order.state == orders_pb2.ORDER_STATE_PAID, order
        assert order.card == "visa •••• 4242"
        assert order.total_minor > 0
    assert len({o.order_id for o in orders}) == 3


def test_02_plaintext_and_app_ports_unreachable_from_the_network(stack: Stack) -> None:
    image = stack.env.get("SHOPMESH_MESH_IMAGE") or _env_default("SHOPMESH_MESH_IMAGE")
    probe = stack_run_probe(stack, image)
    for pod in PODS:
        seen = probe[pod]
        assert seen["inbound_tcp"] == "connected", f"{pod}: the control failed, the pod is not reachable at all: {seen}"
        assert seen["plaintext_h2"].startswith("closed"), f"{pod}: plaintext got an answer: {seen}"
        assert seen["tls_no_client_cert"].startswith(("closed", "handshake failed")), \
            f"{pod}: TLS without a client cert got an answer: {seen}"
        assert seen["app_port"].startswith("unreachable"), f"{pod}: the app port is reachable: {seen}"
        assert seen["admin_port"].startswith("unreachable"), f"{pod}: Envoy admin is reachable: {seen}"
    # Every refused plaintext or certificate-less handshake was counted by the
    # pod's Envoy, i.e. it reached the sidecar and stopped there.
    for pod in PODS:
        stats = stack.exec(f"{pod}-sidecar", "python", "-c",
                           "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9901/stats?filter=^listener.0.0.0.0_8443.ssl.').read().decode())").stdout
        counters = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
        failures = sum(int(v) for k, v in counters.items()
                       if k.endswith((".connection_error", ".fail_verify_no_cert", ".handshake_error")) and v.strip().isdigit())
        assert failures >= 1, f"{pod}: Envoy counted no refused handshake: {counters}"


def _env_default(name: str) -> str:
    from compose_stack import read_env_file
    return read_env_file()[name]


def stack_run_probe(stack: Stack, image: str) -> dict[str, Any]:
    from compose_stack import _run

    argv = ["docker", "run", "--rm", "--network", stack.network(), "--read-only", "--cap-drop", "ALL",
            "-v", f"{REPO / 'tests' / 'compose'}:/probe:ro", "--entrypoint", "python", image,
            "/probe/probe_in_network.py", *PODS]
    out = _run(argv, timeout=120).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    return result


def test_03_an_order_is_one_trace(stack: Stack) -> None:
    trace_id, metadata = _traceparent()
    with grpc.insecure_channel(stack.ingress) as channel:
        assert place_order(channel, metadata).state == orders_pb2.ORDER_STATE_PAID
    wanted = {"ingress", "orders", "orders-sidecar", "search", "search-sidecar", "payments", "payments-sidecar"}

    def services_in_trace() -> set[str] | None:
        if stack.jaeger_standin:
            proc = stack.exec("jaeger", "shopmesh", "traces", "--state-dir", "/var/lib/shopmesh/state", "--json", trace_id,
                              check=False)
            if proc.returncode != 0:
                return None
            seen = {span["service"] for span in json.loads(proc.stdout)}
        else:
            url = f"http://127.0.0.1:{stack.env['SHOPMESH_JAEGER_UI_PORT']}/api/traces/{trace_id}"
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    data = json.load(resp)["data"]
            except OSError:
                return None
            seen = {p["serviceName"] for t in data for p in t["processes"].values()}
        return seen if wanted <= seen else None

    seen = wait_until(services_in_trace, 60, f"trace {trace_id} with spans from {sorted(wanted)}")
    where = "the OTLP receiver standing in for Jaeger" if stack.jaeger_standin else "Jaeger"
    print(f"trace {trace_id} found in {where}: services {sorted(seen)}")


def test_04_rotations_under_steady_traffic_fail_nothing(stack: Stack) -> None:
    before = {s: stack.sidecar_status(s) for s in SIDECARS}
    stop = threading.Event()
    outcomes = {"ok": 0, "failed": []}  # type: dict[str, Any]

    def traffic() -> None:
        with grpc.insecure_channel(stack.ingress) as channel:
            search = search_pb2_grpc.SearchStub(channel)
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if n % 10 == 0:
                        assert place_order(channel).state == orders_pb2.ORDER_STATE_PAID
                    else:
                        search.SearchProducts(search_pb2.SearchProductsRequest(query="tea", page_size=3),
                                              timeout=RPC_TIMEOUT_S)
                    outcomes["ok"] += 1
                except (grpc.RpcError, AssertionError) as err:
                    outcomes["failed"].append(repr(err)[:300])
                stop.wait(0.05)  # pacing the load, not synchronisation

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        def rotated() -> bool:
            return all(stack.sidecar_status(s)["rotations"] >= before[s]["rotations"] + ROTATIONS for s in SIDECARS)

        wait_until(rotated, 180, f"{ROTATIONS} rotations in every sidecar", interval_s=2.0)
    finally:
        stop.set()
        worker.join(RPC_TIMEOUT_S * 3)
    after = {s: stack.sidecar_status(s) for s in SIDECARS}
    for s in SIDECARS:
        assert after[s]["serial"] != before[s]["serial"], f"{s}: Envoy still serves serial {before[s]['serial']}"
        assert after[s]["ready"], after[s]
    print(f"{outcomes['ok']} calls through {ROTATIONS}+ rotations per sidecar: "
          + ", ".join(f"{s} {before[s]['rotations']}->{after[s]['rotations']}" for s in SIDECARS))
    assert outcomes["ok"] > 0
    assert outcomes["failed"] == [], f"{len(outcomes['failed'])} failed calls, first: {outcomes['failed'][:3]}"


def test_05_a_restarted_service_keeps_its_orders(stack: Stack) -> None:
    with grpc.insecure_channel(stack.ingress) as channel:
        placed = [place_order(channel) for _ in range(2)]
    assert all(o.state == orders_pb2.ORDER_STATE_PAID for o in placed)
    app_before = stack.container("orders")
    stack.compose("restart", "orders")
    assert stack.container("orders") == app_before  # restarted, not recreated: same container, same volume
    # The app restarts into a new network namespace; its sidecar notices and
    # is restarted by Docker into the new one (shopmesh/sidecar.py).
    wait_until(lambda: _healthy(stack, ("orders", "orders-sidecar")), 120, "the orders pod to be healthy again",
               interval_s=1.0)
    with grpc.insecure_channel(stack.ingress) as channel:
        stub = orders_pb2_grpc.OrdersStub(channel)

        def fetched() -> list[orders_pb2.Order] | None:
            try:
                return [stub.GetOrder(orders_pb2.GetOrderRequest(order_id=o.order_id), timeout=RPC_TIMEOUT_S) for o in placed]
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return None  # Envoy re-resolving the pod's new address
                raise

        again = wait_until(fetched, 60, "the orders placed before the restart")
        listed = {o.order_id for o in stub.ListOrders(orders_pb2.ListOrdersRequest(page_size=100), timeout=RPC_TIMEOUT_S).orders}
    for before, after in zip(placed, again):
        assert after.order_id == before.order_id
        assert after.state == orders_pb2.ORDER_STATE_PAID
        assert after.total_minor == before.total_minor
        assert after.order_id in listed


def test_06_the_aws_profile_puts_the_ca_on_acm_pca_and_payments_on_kms(stack: Stack) -> None:
    aws = stack.variant(f"{stack.project}-aws", COMPOSE_PROFILES="aws")
    aws.down()
    try:
        aws.build("moto")
        aws.up()
        with grpc.insecure_channel(aws.ingress) as channel:
            order = place_order(channel)
        assert order.state == orders_pb2.ORDER_STATE_PAID, order
        payments_log = aws.compose("logs", "--no-color", "payments").stdout
        assert "cards are sealed under the AWS KMS key arn:aws:kms:" in payments_log
        ca_log = aws.compose("logs", "--no-color", "ca").stdout
        assert "--ca acm-pca" in ca_log
        issued = [line for line in ca_log.splitlines() if "issued SVID spiffe_id=spiffe://shopmesh.internal/ns/shop/sa/payments" in line]
        assert issued, "the CA issued the payments SVID"
    except (AssertionError, StackError, grpc.RpcError):
        say("aws profile stack failed; its logs:\n" + "\n".join(aws.logs().splitlines()[-200:]))
        raise
    finally:
        aws.down()


def _healthy(stack: Stack, services: tuple[str, ...]) -> bool:
    """Every service's container running and healthy (a container mid-restart is neither)."""
    states = stack.states()
    if not all(states.get(s) == "running/healthy" for s in services):
        return False
    try:
        return all(stack.sidecar_status(s).get("ready") for s in services if s.endswith("-sidecar"))
    except StackError:
        return False


@pytest.fixture(autouse=True)
def _name_the_step(request: pytest.FixtureRequest) -> None:
    print(f"\n--- {request.node.name}")
