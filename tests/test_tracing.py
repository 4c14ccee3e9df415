"""Row 41: one order is one trace — ingress, orders, search, payments, with
the Envoy spans of every hop — read back from the local OTLP receiver's data.

`shopmesh demo` roots the trace in a span of its own and prints its id; the
ingress Envoy continues it, each sidecar adds a span for the request and one
for its hop, and each app's spans hang under its sidecar's.
"""

from __future__ import annotations

import json
import time

import pytest

from shopmesh import traces

pytestmark = pytest.mark.mesh

DECLINE_CARD = "4000000000000002"
TEST_CARDS = ("4242424242424242", DECLINE_CARD)
SERVICES = {"shopmesh-cli", "ingress", "orders", "orders-sidecar", "search", "search-sidecar", "payments", "payments-sidecar"}
PLACE = "/shopmesh.orders.v1.Orders/PlaceOrder"
GET_PRODUCTS = "/shopmesh.search.v1.Search/GetProducts"
CHARGE = "/shopmesh.payments.v1.Payments/Charge"

# From the demo's root span down to the step that charges the card: every
# hop, Envoy's and the apps', as (service, span name, kind).
CHARGE_PATH = [
    ("shopmesh-cli", "shopmesh demo", "internal"),
    ("shopmesh-cli", PLACE, "client"),
    ("ingress", f"ingress {PLACE}", "server"),
    ("ingress", "to orders", "client"),
    ("orders-sidecar", f"inbound {PLACE}", "server"),
    ("orders-sidecar", "to local-app", "client"),
    ("orders", PLACE, "server"),
    ("orders", "orders.charge", "internal"),
    ("orders", CHARGE, "client"),
    ("orders-sidecar", f"outbound {CHARGE}", "server"),
    ("orders-sidecar", "to payments", "client"),
    ("payments-sidecar", f"inbound {CHARGE}", "server"),
    ("payments-sidecar", "to local-app", "client"),
    ("payments", CHARGE, "server"),
    ("payments", "payments.charge", "internal"),
]
# The same from orders' app span down to the catalog lookup in search.
PRICE_PATH = [
    ("orders", PLACE, "server"),
    ("orders", "orders.price", "internal"),
    ("orders", GET_PRODUCTS, "client"),
    ("orders-sidecar", f"outbound {GET_PRODUCTS}", "server"),
    ("orders-sidecar", "to search", "client"),
    ("search-sidecar", f"inbound {GET_PRODUCTS}", "server"),
    ("search-sidecar", "to local-app", "client"),
    ("search", GET_PRODUCTS, "server"),
    ("search", "search.lookup", "internal"),
]


def _demo(mesh, *args: str) -> dict:
    out = mesh.cli("demo", "--json", *args, check=False)
    assert out.returncode in (0, 1), out.stderr
    result = json.loads(out.stdout)
    for number in TEST_CARDS:
        assert number not in out.stdout + out.stderr
    return result


def _complete_trace(mesh, trace_id: str, timeout: float = 30) -> list[traces.SpanRecord]:
    """The trace's spans once every part has arrived: Envoys flush every
    second, apps every half second, so poll with a deadline."""
    directory = traces.traces_dir(mesh.state_dir)
    members: list[traces.SpanRecord] = []

    def arrived() -> bool:
        members[:] = [s for s in traces.load_spans(directory) if s.trace_id == trace_id]
        names = {s.name for s in members}
        return (
            {s.service for s in members} >= SERVICES
            and {"payments.charge", "search.lookup", "shopmesh demo"} <= names
            and len(traces.roots(members)) == 1
        )

    deadline = time.monotonic() + timeout
    while not arrived():
        if time.monotonic() > deadline:
            pytest.fail(f"trace {trace_id} incomplete after {timeout:.0f} s:\n" + (traces.render_tree(members) if members else "no spans"))
        time.sleep(0.2)
    return members


def _path_to(members: list[traces.SpanRecord], leaf: traces.SpanRecord, length: int) -> list[tuple[str, str, str]]:
    """(service, name, kind) of `leaf` and its ancestors, root side first, `length` long."""
    by_id = {s.span_id: s for s in members}
    path = [leaf]
    while len(path) < length and path[-1].parent_span_id in by_id:
        path.append(by_id[path[-1].parent_span_id])
    return [(s.service, s.name, s.kind) for s in reversed(path)]


def _only(members: list[traces.SpanRecord], service: str, name: str) -> traces.SpanRecord:
    found = [s for s in members if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in members])
    return found[0]


def test_one_order_is_one_trace_with_envoy_and_app_spans(mesh) -> None:
    result = _demo(mesh)
    assert result["state"] == "paid", result
    members = _complete_trace(mesh, result["trace_id"])

    # One trace: one root (the demo's span), and the order's own spans carry
    # the id printed by the demo, in no other trace.
    assert [(r.service, r.name) for r in traces.roots(members)] == [("shopmesh-cli", "shopmesh demo")]
    order_spans = [s for s in traces.load_spans(traces.traces_dir(mesh.state_dir))
                   if s.attributes.get("orders.order_id") == result["order_id"]]
    assert order_spans and {s.trace_id for s in order_spans} == {result["trace_id"]}

    # Envoy spans from the ingress and every sidecar, app spans from every app.
    envoy = {s.service for s in members if s.from_envoy}
    apps = {s.service for s in members if not s.from_envoy}
    assert envoy == {"ingress", "orders-sidecar", "search-sidecar", "payments-sidecar"}
    assert apps == {"shopmesh-cli", "orders", "search", "payments"}

    # Parent/child links, hop by hop.
    charge = _only(members, "payments", "payments.charge")
    assert _path_to(members, charge, len(CHARGE_PATH)) == CHARGE_PATH
    lookup = _only(members, "search", "search.lookup")
    assert _path_to(members, lookup, len(PRICE_PATH)) == PRICE_PATH
    # …under the same order: the root side of both paths is shared.
    assert _path_to(members, lookup, 100)[:7] == CHARGE_PATH[:7]

    # Namespaced attributes, and nothing failed.
    place = _only(members, "orders", PLACE)
    assert place.attributes["orders.item_count"] == len(result["items"])
    assert charge.attributes["payments.amount_minor"] == result["total_minor"]
    assert charge.attributes["payments.status"] == "SUCCEEDED"
    assert not [s for s in members if s.is_error]


def test_a_declined_payment_shows_as_an_error_in_its_trace(mesh) -> None:
    result = _demo(mesh, "--card", DECLINE_CARD)
    assert result["state"] == "payment_failed", result
    members = _complete_trace(mesh, result["trace_id"])

    failed = {(s.service, s.name): s.status_message for s in members if s.is_error}
    # Every RPC answered OK: the order failed, not the calls.
    assert failed == {
        ("shopmesh-cli", "shopmesh demo"): "order not paid: card declined: card_declined",
        ("orders", "orders.charge"): "payment failed: card declined: card_declined",
        ("payments", "payments.charge"): "declined: card_declined",
    }
    assert _only(members, "orders", "orders.charge").attributes["orders.state"] == "PAYMENT_FAILED"

    # What a person sees.
    tree = mesh.cli("traces", result["trace_id"]).stdout
    assert "orders.charge" in tree and "ERROR payment failed: card declined: card_declined" in tree
    listing = mesh.cli("traces").stdout
    assert any(line.startswith(result["trace_id"]) for line in listing.splitlines())

    # Neither test card appears anywhere in the stored spans.
    stored = "".join(p.read_text() for p in traces.traces_dir(mesh.state_dir).glob("spans.jsonl*"))
    for number in TEST_CARDS:
        assert number not in stored
