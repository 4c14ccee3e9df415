"""The Orders gRPC servicer: price with search, persist, charge through payments.

PlaceOrder, step by step:
1. Idempotency. The same key with the same request returns the stored order
   (and resumes payment if it is still PENDING); the same key with another
   request is FAILED_PRECONDITION.
2. Price the items with search.GetProducts (deadline 2 s). If search cannot
   answer, nothing is stored and the caller gets UNAVAILABLE.
3. Persist the order as PENDING.
4. Charge through payments (deadline 3 s) with the idempotency key
   "order:<order_id>". A definite answer settles the order (PAID or
   PAYMENT_FAILED). No answer leaves it PENDING and returns UNAVAILABLE; a
   retry of PlaceOrder resumes at step 4 with the same charge key, and
   payments' idempotency guarantees the card is charged once.

Upstreams are dialled in plaintext on 127.0.0.1: they are this pod's
sidecar's outbound listeners, and the sidecar originates mTLS to the
upstream pod.

Tracing: the server and client interceptors (shopmesh.telemetry) carry the
W3C trace context from the PlaceOrder call to the search and payments calls,
so one order is one trace. The steps have their own spans: orders.price,
orders.persist, orders.charge (ERROR when the payment fails) and
orders.settle, with orders.* attributes (never the payment token).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.orders.storage import PAID, PAYMENT_FAILED, PENDING, OrderItem, OrderRecord, OrdersStore
from shopmesh.identity import describe_caller
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.pagination import InvalidPageToken, PageTokens, resolve_page_size
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.search.v1 import search_pb2, search_pb2_grpc
from shopmesh.server import FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable, rpc_errors
from shopmesh.telemetry import client_interceptors, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

SERVICE_NAME = orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name
SEARCH_DEADLINE_SECONDS = 2.0
PAYMENTS_DEADLINE_SECONDS = 3.0
MAX_ITEMS = 50
MAX_QUANTITY = 100
MAX_PRODUCT_ID_CHARS = 64
MAX_IDEMPOTENCY_KEY_CHARS = 128
PAYMENT_TOKEN_PATTERN = re.compile(r"^tok_[0-9a-f]{32}$")
ORDER_ID_PATTERN = re.compile(r"^ord_[0-9a-f]{24}$")
PAGE_TOKEN_KEY = Path("keys") / "page-token.key"

# The sidecar is local: reconnect quickly after it restarts instead of
# backing off for up to the default two minutes.
UPSTREAM_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

_STATE = {
    PENDING: orders_pb2.ORDER_STATE_PENDING,
    PAID: orders_pb2.ORDER_STATE_PAID,
    PAYMENT_FAILED: orders_pb2.ORDER_STATE_PAYMENT_FAILED,
}
# Payments answered definitively: the charge went through (it may have been
# refunded since, but it was made).
_CHARGED = (
    payments_pb2.CHARGE_STATUS_SUCCEEDED,
    payments_pb2.CHARGE_STATUS_REFUNDED,
    payments_pb2.CHARGE_STATUS_PARTIALLY_REFUNDED,
)
# Payments could not be reached or did not answer in time: the charge may or
# may not have happened, so the order stays PENDING.
_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

Context = grpc.aio.ServicerContext[Any, Any]


def masked_card(brand: str, last4: str) -> str:
    """E.g. "visa •••• 4242"; empty when payments told us nothing about the card."""
    return f"{brand} •••• {last4}" if last4 else ""


def request_fingerprint(items: Sequence[tuple[str, int]], payment_token: str) -> str:
    canonical = json.dumps({"items": [list(i) for i in items], "payment_token": payment_token}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _to_proto(order: OrderRecord) -> orders_pb2.Order:
    return orders_pb2.Order(
        order_id=order.order_id,
        state=_STATE[order.state],
        items=[
            orders_pb2.LineItem(
                product_id=i.product_id, quantity=i.quantity, name=i.name, unit_price_minor=i.unit_price_minor
            )
            for i in order.items
        ],
        total_minor=order.total_minor,
        currency=order.currency,
        charge_id=order.charge_id,
        failure_reason=order.failure_reason,
        created_at=order.created_at,
        card=order.card,
    )


def _validate_place_order(request: orders_pb2.PlaceOrderRequest) -> list[tuple[str, int]]:
    if not request.items:
        raise InvalidArgument(f"items is empty; an order needs 1 to {MAX_ITEMS} items")
    if len(request.items) > MAX_ITEMS:
        raise InvalidArgument(f"an order has at most {MAX_ITEMS} items, got {len(request.items)}")
    items: list[tuple[str, int]] = []
    for index, item in enumerate(request.items):
        if not item.product_id.strip():
            raise InvalidArgument(f"items[{index}].product_id is required")
        if len(item.product_id) > MAX_PRODUCT_ID_CHARS:
            raise InvalidArgument(
                f"items[{index}].product_id is {len(item.product_id)} characters long; the limit is {MAX_PRODUCT_ID_CHARS}"
            )
        if not 1 <= item.quantity <= MAX_QUANTITY:
            raise InvalidArgument(f"items[{index}].quantity must be 1 to {MAX_QUANTITY}, got {item.quantity}")
        items.append((item.product_id, item.quantity))
    # Not echoed: a client that mixes up fields could send a card number here.
    if not PAYMENT_TOKEN_PATTERN.fullmatch(request.payment_token):
        raise InvalidArgument(
            "payment_token must be a card token from Payments.Tokenize ('tok_' followed by 32 lowercase hex digits)"
        )
    key = request.idempotency_key
    if not key:
        raise InvalidArgument("idempotency_key is required; a retry with the same key returns the same order")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidArgument(f"idempotency_key is {len(key)} characters long; the limit is {MAX_IDEMPOTENCY_KEY_CHARS}")
    if not key.isprintable():
        raise InvalidArgument("idempotency_key must not contain control characters")
    return items


class OrdersServicer(orders_pb2_grpc.OrdersServicer):
    def __init__(
        self,
        store: OrdersStore,
        search: search_pb2_grpc.SearchStub,
        payments: payments_pb2_grpc.PaymentsStub,
        page_tokens: PageTokens,
        *,
        search_deadline: float = SEARCH_DEADLINE_SECONDS,
        payments_deadline: float = PAYMENTS_DEADLINE_SECONDS,
    ) -> None:
        self._store = store
        self._search = search
        self._payments = payments
        self._page_tokens = page_tokens
        self._search_deadline = search_deadline
        self._payments_deadline = payments_deadline

    def register(self, server: grpc.aio.Server) -> list[str]:
        orders_pb2_grpc.add_OrdersServicer_to_server(self, server)
        return [SERVICE_NAME]

    @rpc_errors()
    async def PlaceOrder(self, request: orders_pb2.PlaceOrderRequest, context: Context) -> orders_pb2.Order:
        items = _validate_place_order(request)
        caller = describe_caller(context.invocation_metadata())
        fingerprint = request_fingerprint(items, request.payment_token)
        call_span = trace.get_current_span()
        call_span.set_attribute("orders.item_count", len(items))

        earlier = self._store.by_idempotency_key(request.idempotency_key)
        if earlier is not None:
            call_span.set_attributes({"orders.order_id": earlier.order_id, "orders.replayed": True})
            return await self._resume(earlier, fingerprint, caller)

        priced, currency = await self._price(items)
        order = OrderRecord(
            order_id="ord_" + secrets.token_hex(12),
            idempotency_key=request.idempotency_key,
            request_fingerprint=fingerprint,
            state=PENDING,
            payment_token=request.payment_token,
            total_minor=sum(i.unit_price_minor * i.quantity for i in priced),
            currency=currency,
            items=priced,
        )
        if order.total_minor <= 0:
            raise FailedPrecondition("the order's total is 0; there is nothing to charge")
        with _tracer.start_as_current_span("orders.persist", attributes={"orders.order_id": order.order_id}):
            stored, created = self._store.insert_pending(order)
        call_span.set_attributes({"orders.order_id": stored.order_id, "orders.replayed": not created})
        if not created:
            # A concurrent call with the same key stored its order first.
            return await self._resume(stored, fingerprint, caller)
        log.info(
            "order %s PENDING: %d items, %d %s, caller %s",
            stored.order_id,
            len(stored.items),
            stored.total_minor,
            stored.currency,
            caller,
        )
        return _to_proto(await self._pay(stored))

    async def _resume(self, earlier: OrderRecord, fingerprint: str, caller: str) -> orders_pb2.Order:
        if earlier.request_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"idempotency_key '{earlier.idempotency_key}' was already used for a different order "
                f"({earlier.order_id}); use a new key for a new order"
            )
        if earlier.state != PENDING:
            log.info("order %s replayed (%s) for caller %s", earlier.order_id, earlier.state, caller)
            return _to_proto(earlier)
        log.info("order %s resumed: payment not settled yet, caller %s", earlier.order_id, caller)
        return _to_proto(await self._pay(earlier))

    async def _price(self, items: Sequence[tuple[str, int]]) -> tuple[list[OrderItem], str]:
        """The items with names and unit prices from search, and their one currency."""
        ids = list(dict.fromkeys(product_id for product_id, _ in items))
        with _tracer.start_as_current_span("orders.price", attributes={"orders.product_count": len(ids)}):
            return await self._price_with_search(ids, items)

    async def _price_with_search(self, ids: list[str], items: Sequence[tuple[str, int]]) -> tuple[list[OrderItem], str]:
        try:
            response = await self._search.GetProducts(search_pb2.GetProductsRequest(ids=ids), timeout=self._search_deadline)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(err.details() or "unknown product id") from None
            if code in _NO_ANSWER:
                log.warning("search did not answer GetProducts: %s %s", code.name, err.details())
                raise Unavailable("search is unavailable; no order was stored") from None
            log.error("search refused GetProducts: %s %s", code.name, err.details())
            raise Internal(f"search refused to price the items ({code.name}: {err.details()}); no order was stored") from None
        by_id = {p.id: p for p in response.products}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise Internal(f"search did not return product {missing[0]!r}; no order was stored")
        currencies = sorted({by_id[i].currency for i in ids})
        if len(currencies) > 1:
            raise FailedPrecondition(
                f"the items are priced in different currencies ({', '.join(currencies)}); "
                "place one order per currency"
            )
        priced = [
            OrderItem(product_id=pid, name=by_id[pid].name, quantity=qty, unit_price_minor=by_id[pid].price_minor)
            for pid, qty in items
        ]
        return priced, currencies[0]

    async def _pay(self, order: OrderRecord) -> OrderRecord:
        attributes = {"orders.order_id": order.order_id, "orders.total_minor": order.total_minor, "orders.currency": order.currency}
        with _tracer.start_as_current_span("orders.charge", attributes=attributes) as span:
            settled = await self._charge_and_settle(order)
            span.set_attribute("orders.state", settled.state)
            if settled.state == PAYMENT_FAILED:
                # The RPCs all succeeded, but the order did not: say so where
                # someone looking at the trace will see it.
                span.set_status(Status(StatusCode.ERROR, f"payment failed: {settled.failure_reason}"))
            return settled

    def _settle(self, order_id: str, state: str, **fields: str) -> OrderRecord:
        with _tracer.start_as_current_span("orders.settle", attributes={"orders.order_id": order_id, "orders.state": state}):
            return self._store.settle(order_id, state, **fields)

    async def _charge_and_settle(self, order: OrderRecord) -> OrderRecord:
        charge_key = f"order:{order.order_id}"
        request = payments_pb2.ChargeRequest(
            token=order.payment_token,
            amount_minor=order.total_minor,
            currency=order.currency,
            idempotency_key=charge_key,
            description=f"ShopMesh order {order.order_id}",
        )
        try:
            charge = await self._payments.Charge(request, timeout=self._payments_deadline)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                settled = self._settle(order.order_id, PAYMENT_FAILED, failure_reason=f"payment rejected: {err.details()}")
                log.info("order %s PAYMENT_FAILED: payments answered %s", order.order_id, code.name)
                return settled
            if code in _NO_ANSWER:
                log.warning("order %s stays PENDING: payments did not answer (%s)", order.order_id, code.name)
                raise Unavailable(
                    f"payment not confirmed for order {order.order_id}; retry PlaceOrder with the same idempotency_key"
                ) from None
            log.error("order %s stays PENDING: payments answered %s: %s", order.order_id, code.name, err.details())
            raise Internal(
                f"payment not confirmed for order {order.order_id} (payments answered {code.name}); "
                "the order stays pending; retry PlaceOrder with the same idempotency_key"
            ) from None
        card = masked_card(charge.brand, charge.last4)
        if charge.status in _CHARGED:
            settled = self._settle(order.order_id, PAID, charge_id=charge.charge_id, card=card)
        elif charge.status == payments_pb2.CHARGE_STATUS_DECLINED:
            settled = self._settle(
                order.order_id, PAYMENT_FAILED, failure_reason=f"card declined: {charge.decline_reason}", card=card
            )
        else:
            raise Internal(
                f"payments answered charge {charge.charge_id} with status {charge.status}; order {order.order_id} stays pending"
            )
        log.info("order %s %s (charge %s)", settled.order_id, settled.state, charge.charge_id)
        return settled

    @rpc_errors()
    async def GetOrder(self, request: orders_pb2.GetOrderRequest, context: Context) -> orders_pb2.Order:
        if not request.order_id:
            raise InvalidArgument("order_id is required")
        if not ORDER_ID_PATTERN.fullmatch(request.order_id):
            raise InvalidArgument("order_id is not an order id (expected 'ord_' followed by 24 lowercase hex digits)")
        order = self._store.get(request.order_id)
        if order is None:
            raise NotFound(f"unknown order id '{request.order_id}'")
        return _to_proto(order)

    @rpc_errors()
    async def ListOrders(self, request: orders_pb2.ListOrdersRequest, context: Context) -> orders_pb2.ListOrdersResponse:
        page_size = resolve_page_size(request.page_size)
        # Keyset pagination: the token holds the position of the last order
        # shown, so orders placed meanwhile neither repeat nor shift pages.
        before: int | None = None
        if request.page_token:
            position = self._page_tokens.parse(request.page_token).get("before")
            if not isinstance(position, int) or position <= 0:
                raise InvalidPageToken()
            before = position
        # One extra row tells whether another page exists.
        orders = self._store.list_newest_first(page_size + 1, before_seq=before)
        next_token = ""
        if len(orders) > page_size:
            orders = orders[:page_size]
            next_token = self._page_tokens.issue({"before": orders[-1].seq})
        return orders_pb2.ListOrdersResponse(orders=[_to_proto(o) for o in orders], next_page_token=next_token)


@dataclass(frozen=True)
class Upstreams:
    """host:port of this pod's sidecar outbound listeners."""

    search: str
    payments: str


@contextlib.asynccontextmanager
async def orders_servicer(
    data_dir: Path,
    upstreams: Upstreams,
    *,
    search_deadline: float = SEARCH_DEADLINE_SECONDS,
    payments_deadline: float = PAYMENTS_DEADLINE_SECONDS,
) -> AsyncIterator[OrdersServicer]:
    """An OrdersServicer with its database and upstream channels, closed on exit."""
    store = OrdersStore.in_data_dir(data_dir)
    try:
        tokens = PageTokens.from_key_file(data_dir / PAGE_TOKEN_KEY, "orders.v1.ListOrders")
        async with (
            grpc.aio.insecure_channel(
                upstreams.search, options=UPSTREAM_CHANNEL_OPTIONS, interceptors=client_interceptors()
            ) as search_channel,
            grpc.aio.insecure_channel(
                upstreams.payments, options=UPSTREAM_CHANNEL_OPTIONS, interceptors=client_interceptors()
            ) as payments_channel,
        ):
            log.info("upstreams: search %s, payments %s", upstreams.search, upstreams.payments)
            yield OrdersServicer(
                store,
                search_pb2_grpc.SearchStub(search_channel),
                payments_pb2_grpc.PaymentsStub(payments_channel),
                tokens,
                search_deadline=search_deadline,
                payments_deadline=payments_deadline,
            )
    finally:
        store.close()
