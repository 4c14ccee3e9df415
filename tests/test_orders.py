"""Orders: pricing through search, payment through payments, state and idempotency.

Every test runs real search and payments servers (in-process, real SQLite)
and an orders server whose upstreams point at them, as its sidecar's
outbound listeners would.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from _services import (
    channel,
    check_app_lifecycle,
    eventually,
    expect_status,
    free_port,
    orders_service,
    payments_service,
    run,
    search_service,
)

from services.orders.server import SERVICE_NAME, Upstreams
from services.orders.storage import DB_NAME as ORDERS_DB
from services.payments.audit import AuditLog
from services.payments.server import PaymentsServicer
from services.payments.storage import DB_NAME as PAYMENTS_DB
from services.payments.keys import LocalCardKeyProvider
from services.payments.storage import PaymentsStore
from services.payments.vault import CardVault
from services.search.server import SearchServicer
from services.search.storage import Catalog
from shopmesh.pagination import PageTokens
from shopmesh.server import running_server
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.search.v1 import search_pb2, search_pb2_grpc

VISA = "4242424242424242"
DECLINE = "4000000000000002"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Shop:
    orders: orders_pb2_grpc.OrdersStub
    payments: payments_pb2_grpc.PaymentsStub
    search: search_pb2_grpc.SearchStub
    dirs: dict[str, Path]

    async def token(self, number: str = VISA) -> str:
        reply = await self.payments.Tokenize(
            payments_pb2.TokenizeRequest(card_number=number, exp_month=12, exp_year=2031, cvv="123")
        )
        return reply.token

    def order_count(self) -> int:
        with sqlite3.connect(self.dirs["orders"] / ORDERS_DB) as conn:
            return int(conn.execute("SELECT count(*) FROM orders").fetchone()[0])

    def charge_count(self) -> int:
        with sqlite3.connect(self.dirs["payments"] / PAYMENTS_DB) as conn:
            return int(conn.execute("SELECT count(*) FROM charges").fetchone()[0])


@contextlib.asynccontextmanager
async def shop(tmp_path: Path, **orders_kwargs: Any) -> AsyncIterator[Shop]:
    dirs = {name: tmp_path / name for name in ("search", "payments", "orders")}
    async with (
        search_service(dirs["search"]) as (search_address, _),
        payments_service(dirs["payments"]) as (payments_address, _),
        orders_service(dirs["orders"], Upstreams(search_address, payments_address), **orders_kwargs) as (orders_address, _),
        channel(orders_address) as orders_chan,
        channel(payments_address) as payments_chan,
        channel(search_address) as search_chan,
    ):
        yield Shop(
            orders_pb2_grpc.OrdersStub(orders_chan),
            payments_pb2_grpc.PaymentsStub(payments_chan),
            search_pb2_grpc.SearchStub(search_chan),
            dirs,
        )


def place(token: str, key: str, *items: tuple[str, int]) -> orders_pb2.PlaceOrderRequest:
    return orders_pb2.PlaceOrderRequest(
        items=[orders_pb2.LineItem(product_id=p, quantity=q) for p, q in items or (("sku-0001", 1),)],
        payment_token=token,
        idempotency_key=key,
    )


def test_place_order_prices_persists_and_pays(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            token = await s.token()
            products = {
                p.id: p
                for p in (await s.search.GetProducts(search_pb2.GetProductsRequest(ids=["sku-0001", "sku-0002"]))).products
            }
            order = await s.orders.PlaceOrder(place(token, "k1", ("sku-0001", 2), ("sku-0002", 1)))
            assert re.fullmatch(r"ord_[0-9a-f]{24}", order.order_id)
            assert order.state == orders_pb2.ORDER_STATE_PAID
            expected_total = 2 * products["sku-0001"].price_minor + products["sku-0002"].price_minor
            assert (order.total_minor, order.currency) == (expected_total, "EUR")
            assert [(i.product_id, i.quantity, i.name, i.unit_price_minor) for i in order.items] == [
                ("sku-0001", 2, products["sku-0001"].name, products["sku-0001"].price_minor),
                ("sku-0002", 1, products["sku-0002"].name, products["sku-0002"].price_minor),
            ]
            assert order.card == "visa •••• 4242"
            assert order.failure_reason == ""
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", order.created_at)
            charge = await s.payments.GetCharge(payments_pb2.GetChargeRequest(charge_id=order.charge_id))
            assert (charge.status, charge.amount_minor, charge.currency) == (
                payments_pb2.CHARGE_STATUS_SUCCEEDED,
                expected_total,
                "EUR",
            )
            assert await s.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.order_id)) == order

    run(body())


def test_place_order_is_idempotent(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            token = await s.token()
            first = await s.orders.PlaceOrder(place(token, "k1", ("sku-0003", 1)))
            assert await s.orders.PlaceOrder(place(token, "k1", ("sku-0003", 1))) == first
            for different in (
                place(token, "k1", ("sku-0003", 2)),
                place(token, "k1", ("sku-0004", 1)),
                # Another card: the same card would get the same token back.
                place(await s.token("5555555555554444"), "k1", ("sku-0003", 1)),
            ):
                details = await expect_status(s.orders.PlaceOrder(different), grpc.StatusCode.FAILED_PRECONDITION)
                assert f"idempotency_key 'k1' was already used for a different order ({first.order_id})" in details
            assert (s.order_count(), s.charge_count()) == (1, 1)

    run(body())


def test_concurrent_place_order_with_one_key_makes_one_order_and_one_charge(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            token = await s.token()
            replies = await asyncio.gather(*(s.orders.PlaceOrder(place(token, "same", ("sku-0005", 3))) for _ in range(12)))
            assert len({r.order_id for r in replies}) == 1
            assert all(r.state == orders_pb2.ORDER_STATE_PAID for r in replies)
            assert (s.order_count(), s.charge_count()) == (1, 1)

    run(body())


def test_a_declined_card_fails_the_order(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            token = await s.token(DECLINE)
            order = await s.orders.PlaceOrder(place(token, "k1"))
            assert order.state == orders_pb2.ORDER_STATE_PAYMENT_FAILED
            assert order.failure_reason == "card declined: card_declined"
            assert order.card == "visa •••• 0002"
            assert order.charge_id == ""
            # Final: a retry returns the failed order and does not try the card again.
            assert await s.orders.PlaceOrder(place(token, "k1")) == order
            assert await s.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.order_id)) == order
            assert (s.order_count(), s.charge_count()) == (1, 1)

    run(body())


def test_an_unknown_token_fails_the_order(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            unknown = "tok_" + "0" * 32
            order = await s.orders.PlaceOrder(place(unknown, "k1"))
            assert order.state == orders_pb2.ORDER_STATE_PAYMENT_FAILED
            assert order.failure_reason == f"payment rejected: unknown token '{unknown}'; tokenize the card first"
            assert s.charge_count() == 0

    run(body())


def test_an_unknown_product_is_not_found_and_nothing_is_stored(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            details = await expect_status(
                s.orders.PlaceOrder(place(await s.token(), "k1", ("sku-0001", 1), ("sku-9999", 1))),
                grpc.StatusCode.NOT_FOUND,
            )
            assert details == "unknown product id 'sku-9999'"
            assert (s.order_count(), s.charge_count()) == (0, 0)

    run(body())


def test_search_down_means_unavailable_and_no_order(tmp_path: Path) -> None:
    async def body() -> None:
        closed = f"127.0.0.1:{free_port()}"
        async with (
            payments_service(tmp_path / "payments") as (payments_address, _),
            orders_service(tmp_path / "orders", Upstreams(closed, payments_address)) as (orders_address, _),
            channel(orders_address) as chan,
            channel(payments_address) as payments_chan,
        ):
            token = (
                await payments_pb2_grpc.PaymentsStub(payments_chan).Tokenize(
                    payments_pb2.TokenizeRequest(card_number=VISA, exp_month=12, exp_year=2031, cvv="123")
                )
            ).token
            stub = orders_pb2_grpc.OrdersStub(chan)
            details = await expect_status(stub.PlaceOrder(place(token, "k1")), grpc.StatusCode.UNAVAILABLE)
            assert details == "search is unavailable; no order was stored"
            assert len((await stub.ListOrders(orders_pb2.ListOrdersRequest())).orders) == 0
        with sqlite3.connect(tmp_path / "orders" / ORDERS_DB) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM order_items").fetchone()[0] == 0

    run(body())


class StalledSearch(search_pb2_grpc.SearchServicer):
    """A search that accepts GetProducts and never answers (until released)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def register(self, server: grpc.aio.Server) -> list[str]:
        search_pb2_grpc.add_SearchServicer_to_server(self, server)
        return ["shopmesh.search.v1.Search"]

    async def GetProducts(self, request: Any, context: Any) -> search_pb2.GetProductsResponse:
        await self.release.wait()
        return search_pb2.GetProductsResponse()


def test_a_search_past_its_deadline_means_unavailable_and_no_order(tmp_path: Path) -> None:
    async def body() -> None:
        stalled = StalledSearch()
        async with (
            running_server(stalled.register, grace=0.1) as search_port,
            payments_service(tmp_path / "payments") as (payments_address, _),
            orders_service(
                tmp_path / "orders", Upstreams(f"127.0.0.1:{search_port}", payments_address), search_deadline=0.3
            ) as (orders_address, _),
            channel(orders_address) as chan,
        ):
            details = await expect_status(
                orders_pb2_grpc.OrdersStub(chan).PlaceOrder(place("tok_" + "1" * 32, "k1")), grpc.StatusCode.UNAVAILABLE
            )
            assert details == "search is unavailable; no order was stored"
            stalled.release.set()
        with sqlite3.connect(tmp_path / "orders" / ORDERS_DB) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 0

    run(body())


def test_mixed_currencies_are_refused(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(
        "id,name,description,category,price_minor,currency\n"
        "sku-0001,Teapot,Brews tea,kitchen,1500,EUR\n"
        "sku-0002,Kettle,Boils water,kitchen,3000,USD\n"
    )

    async def body() -> None:
        async with (
            search_service(tmp_path / "search", catalog_csv=catalog) as (search_address, _),
            payments_service(tmp_path / "payments") as (payments_address, _),
            orders_service(tmp_path / "orders", Upstreams(search_address, payments_address)) as (orders_address, _),
            channel(orders_address) as chan,
        ):
            details = await expect_status(
                orders_pb2_grpc.OrdersStub(chan).PlaceOrder(place("tok_" + "1" * 32, "k1", ("sku-0001", 1), ("sku-0002", 1))),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert details == "the items are priced in different currencies (EUR, USD); place one order per currency"

    run(body())


def test_payments_down_leaves_the_order_pending_and_a_retry_pays_it_once(tmp_path: Path) -> None:
    payments_port = free_port()
    payments_listen = f"127.0.0.1:{payments_port}"

    async def body() -> None:
        async with (
            search_service(tmp_path / "search") as (search_address, _),
            orders_service(tmp_path / "orders", Upstreams(search_address, payments_listen)) as (orders_address, _),
            channel(orders_address) as chan,
        ):
            stub = orders_pb2_grpc.OrdersStub(chan)
            async with payments_service(tmp_path / "payments", payments_listen) as (_, _), channel(payments_listen) as pchan:
                token = (
                    await payments_pb2_grpc.PaymentsStub(pchan).Tokenize(
                        payments_pb2.TokenizeRequest(card_number=VISA, exp_month=12, exp_year=2031, cvv="123")
                    )
                ).token
            # Payments is down now.
            details = await expect_status(stub.PlaceOrder(place(token, "k1", ("sku-0007", 2))), grpc.StatusCode.UNAVAILABLE)
            match = re.fullmatch(
                r"payment not confirmed for order (ord_[0-9a-f]{24}); retry PlaceOrder with the same idempotency_key",
                details,
            )
            assert match, details
            order_id = match.group(1)
            pending = await stub.GetOrder(orders_pb2.GetOrderRequest(order_id=order_id))
            assert pending.state == orders_pb2.ORDER_STATE_PENDING
            assert pending.charge_id == "" and pending.total_minor > 0
            listed = await stub.ListOrders(orders_pb2.ListOrdersRequest())
            assert [o.order_id for o in listed.orders] == [order_id]

            async with payments_service(tmp_path / "payments", payments_listen):
                # The orders channel reconnects with a short backoff; retry as a client would.
                async def retry() -> orders_pb2.Order:
                    return await stub.PlaceOrder(place(token, "k1", ("sku-0007", 2)))

                paid = await eventually(retry)
                assert paid.order_id == order_id
                assert paid.state == orders_pb2.ORDER_STATE_PAID
                assert paid.charge_id.startswith("ch_") and paid.card == "visa •••• 4242"
                # Later retries return the paid order and never charge again.
                assert await retry() == paid
        with sqlite3.connect(tmp_path / "payments" / PAYMENTS_DB) as conn:
            rows = conn.execute("SELECT idempotency_key, status FROM charges").fetchall()
        assert rows == [(f"order:{order_id}", "SUCCEEDED")]

    run(body())


def real_payments(data_dir: Path) -> tuple[PaymentsStore, CardVault, AuditLog]:
    data_dir.mkdir(parents=True, exist_ok=True)
    audit = AuditLog.in_data_dir(data_dir)
    return PaymentsStore.in_data_dir(data_dir), CardVault(LocalCardKeyProvider.in_data_dir(data_dir), audit=audit), audit


class SlowToAnswerPayments(PaymentsServicer):
    """Charges for real, then never sends the first answer (the caller's deadline passes)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(*real_payments(data_dir))
        self.held = asyncio.Event()

    async def Charge(self, request: Any, context: Any) -> payments_pb2.ChargeResponse:
        reply = await super().Charge(request, context)
        if not self.held.is_set():
            self.held.set()
            await asyncio.Event().wait()  # cancelled by gRPC when the call ends
        return reply


def test_a_charge_whose_answer_was_lost_is_not_repeated(tmp_path: Path) -> None:
    """Payments charged but orders timed out: the order stays PENDING, the retry finds the charge."""

    async def body() -> None:
        slow = SlowToAnswerPayments(tmp_path / "payments")
        async with (
            running_server(slow.register, grace=0.1) as payments_port,
            search_service(tmp_path / "search") as (search_address, _),
            orders_service(
                tmp_path / "orders",
                Upstreams(search_address, f"127.0.0.1:{payments_port}"),
                payments_deadline=1.5,  # room for the real charge before the answer is held back
            ) as (orders_address, _),
            channel(orders_address) as chan,
            channel(f"127.0.0.1:{payments_port}") as pchan,
        ):
            token = (
                await payments_pb2_grpc.PaymentsStub(pchan).Tokenize(
                    payments_pb2.TokenizeRequest(card_number=VISA, exp_month=12, exp_year=2031, cvv="123")
                )
            ).token
            stub = orders_pb2_grpc.OrdersStub(chan)
            details = await expect_status(stub.PlaceOrder(place(token, "k1")), grpc.StatusCode.UNAVAILABLE)
            assert details.startswith("payment not confirmed for order ord_")
            assert slow.held.is_set()
            paid = await stub.PlaceOrder(place(token, "k1"))
            assert paid.state == orders_pb2.ORDER_STATE_PAID
        with sqlite3.connect(tmp_path / "payments" / PAYMENTS_DB) as conn:
            assert conn.execute("SELECT count(*) FROM charges").fetchone()[0] == 1

    run(body())


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"items": []}, "items is empty; an order needs 1 to 50 items"),
        ({"items": [("sku-0001", 1)] * 51}, "an order has at most 50 items, got 51"),
        ({"items": [("sku-0001", 1), ("", 1)]}, "items[1].product_id is required"),
        ({"items": [("x" * 65, 1)]}, "items[0].product_id is 65 characters long; the limit is 64"),
        ({"items": [("sku-0001", 0)]}, "items[0].quantity must be 1 to 100, got 0"),
        ({"items": [("sku-0001", 101)]}, "items[0].quantity must be 1 to 100, got 101"),
        ({"items": [("sku-0001", -3)]}, "items[0].quantity must be 1 to 100, got -3"),
        ({"payment_token": ""}, "payment_token must be a card token from Payments.Tokenize"),
        ({"payment_token": VISA}, "payment_token must be a card token from Payments.Tokenize"),
        ({"payment_token": "tok_" + "A" * 32}, "payment_token must be a card token from Payments.Tokenize"),
        ({"payment_token": "tok_" + "a" * 32 + "\n"}, "payment_token must be a card token from Payments.Tokenize"),
        ({"idempotency_key": ""}, "idempotency_key is required"),
        ({"idempotency_key": "k" * 129}, "idempotency_key is 129 characters long; the limit is 128"),
    ],
)
def test_place_order_rejects_bad_requests(tmp_path: Path, request_fields: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"items": [("sku-0001", 1)], "payment_token": "tok_" + "1" * 32, "idempotency_key": "k"}
    fields.update(request_fields)
    request = orders_pb2.PlaceOrderRequest(
        items=[orders_pb2.LineItem(product_id=p, quantity=q) for p, q in fields["items"]],
        payment_token=fields["payment_token"],
        idempotency_key=fields["idempotency_key"],
    )

    async def body() -> None:
        async with shop(tmp_path) as s:
            details = await expect_status(s.orders.PlaceOrder(request), grpc.StatusCode.INVALID_ARGUMENT)
            assert details.startswith(message)
            assert VISA not in details
            assert s.order_count() == 0

    run(body())


def test_get_order_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            unknown = "ord_" + "a" * 24
            details = await expect_status(
                s.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=unknown)), grpc.StatusCode.NOT_FOUND
            )
            assert details == f"unknown order id '{unknown}'"
            for bad in ("", "ord_123", "ORD_" + "a" * 24, "ord_" + "a" * 25, "ord_" + "a" * 24 + "\n"):
                await expect_status(s.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=bad)), grpc.StatusCode.INVALID_ARGUMENT)

    run(body())


def test_list_orders_newest_first_with_pages(tmp_path: Path) -> None:
    async def body() -> None:
        async with shop(tmp_path) as s:
            token = await s.token()
            placed = [
                (await s.orders.PlaceOrder(place(token, f"k{i}", (f"sku-{i + 1:04d}", 1)))).order_id for i in range(5)
            ]
            everything = await s.orders.ListOrders(orders_pb2.ListOrdersRequest())
            assert [o.order_id for o in everything.orders] == placed[::-1]
            assert everything.next_page_token == ""

            seen: list[str] = []
            token_ = ""
            pages = 0
            while True:
                page = await s.orders.ListOrders(orders_pb2.ListOrdersRequest(page_size=2, page_token=token_))
                pages += 1
                seen.extend(o.order_id for o in page.orders)
                token_ = page.next_page_token
                if not token_:
                    break
            assert pages == 3 and seen == placed[::-1]

            for size in (101, -1):
                details = await expect_status(
                    s.orders.ListOrders(orders_pb2.ListOrdersRequest(page_size=size)), grpc.StatusCode.INVALID_ARGUMENT
                )
                assert "page_size must be 1 to 100" in details
            first = await s.orders.ListOrders(orders_pb2.ListOrdersRequest(page_size=2))
            for bad in ("nope", first.next_page_token + "A", first.next_page_token[1:]):
                details = await expect_status(
                    s.orders.ListOrders(orders_pb2.ListOrdersRequest(page_token=bad)), grpc.StatusCode.INVALID_ARGUMENT
                )
                assert details == "page_token is not one this service issued"

    run(body())


class RecordingSearch(SearchServicer):
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog.open(data_dir)
        super().__init__(self.catalog, PageTokens(b"k" * 32, "test"))
        self.seen: list[dict[str, str]] = []

    async def GetProducts(self, request: Any, context: Any) -> search_pb2.GetProductsResponse:
        self.seen.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return await super().GetProducts(request, context)


class RecordingPayments(PaymentsServicer):
    def __init__(self, data_dir: Path) -> None:
        super().__init__(*real_payments(data_dir))
        self.seen: list[dict[str, str]] = []

    async def Charge(self, request: Any, context: Any) -> payments_pb2.ChargeResponse:
        self.seen.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return await super().Charge(request, context)


def test_trace_context_is_passed_to_upstreams(tmp_path: Path) -> None:
    search = RecordingSearch(tmp_path / "search")
    payments = RecordingPayments(tmp_path / "payments")

    async def body() -> None:
        async with (
            running_server(search.register, grace=0.1) as search_port,
            running_server(payments.register, grace=0.1) as payments_port,
            orders_service(
                tmp_path / "orders", Upstreams(f"127.0.0.1:{search_port}", f"127.0.0.1:{payments_port}")
            ) as (orders_address, _),
            channel(orders_address) as chan,
            channel(f"127.0.0.1:{payments_port}") as pchan,
        ):
            token = (
                await payments_pb2_grpc.PaymentsStub(pchan).Tokenize(
                    payments_pb2.TokenizeRequest(card_number=VISA, exp_month=12, exp_year=2031, cvv="123")
                )
            ).token
            order = await orders_pb2_grpc.OrdersStub(chan).PlaceOrder(
                place(token, "k1"),
                metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=1"), ("x-other", "not forwarded")),
            )
            assert order.state == orders_pb2.ORDER_STATE_PAID
            # Without trace context, nothing is invented.
            await orders_pb2_grpc.OrdersStub(chan).PlaceOrder(place(token, "k2"))
        for seen in (search.seen, payments.seen):
            assert seen[0]["traceparent"] == TRACEPARENT and seen[0]["tracestate"] == "vendor=1"
            assert "x-other" not in seen[0]
            assert "traceparent" not in seen[1]

    try:
        run(body())
    finally:
        search.catalog.close()


def test_python_m_services_orders_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_text = check_app_lifecycle(
        "services.orders",
        SERVICE_NAME,
        tmp_path,
        {
            "SHOPMESH_UPSTREAM_SEARCH": f"127.0.0.1:{free_port()}",
            "SHOPMESH_UPSTREAM_PAYMENTS": f"127.0.0.1:{free_port()}",
        },
    )
    assert "listening on 127.0.0.1:" in log_text
