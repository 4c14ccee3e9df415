"""Search: ranked full-text search, pagination, lookup by id, catalog loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from _services import ROOT, channel, check_app_lifecycle, expect_status, run, search_service
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.search.server import SERVICE_NAME, fts_query_for
from services.search.storage import DB_NAME, CatalogError, Catalog
from shopmesh.search.v1 import search_pb2, search_pb2_grpc

BAD_TOKEN = "page_token is not one this service issued"


def test_catalog_ships_about_300_products_generated_by_the_script(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    try:
        assert catalog.count() == 300
    finally:
        catalog.close()
    # The committed CSV is exactly what the committed generator produces.
    result = subprocess.run(
        [sys.executable, "scripts/make_catalog.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_search_ranks_and_returns_products(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            response = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="skillet"))
            assert response.total_matches > 0
            assert all("skillet" in p.name.lower() for p in response.products)
            first = response.products[0]
            assert first.id.startswith("sku-") and first.currency == "EUR" and first.price_minor > 0
            # Prefix match: a word being typed still finds results.
            partial = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="skil"))
            assert [p.id for p in partial.products] == [p.id for p in response.products]
            # Words are ANDed.
            both = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="skillet sand"))
            assert 0 < both.total_matches < response.total_matches
            assert {p.id for p in both.products} == {"sku-0051", "sku-0056", "sku-0246"}

    run(body())


def test_a_name_match_outranks_a_description_match(tmp_path: Path) -> None:
    csv_path = tmp_path / "catalog.csv"
    csv_path.write_text(
        "id,name,description,category,price_minor,currency\n"
        "sku-0001,Reading Chair,A chair to read in next to your lantern at night,home,10000,EUR\n"
        "sku-0002,Storm Lantern,Warm light for the porch,outdoor,2500,EUR\n"
        "sku-0003,Teapot,Brews tea,kitchen,1500,EUR\n"
    )

    async def body() -> None:
        async with search_service(tmp_path / "data", catalog_csv=csv_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            response = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="lantern"))
            assert [p.id for p in response.products] == ["sku-0002", "sku-0001"]
            assert response.total_matches == 2
            assert response.next_page_token == ""

    run(body())


def test_pagination_walks_every_match_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            # Every description starts with "The": all 300 products match.
            first = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="the"))
            assert first.total_matches == 300
            assert len(first.products) == 20  # page_size 0 means 20
            seen: list[str] = []
            token = ""
            pages = 0
            while True:
                page = await stub.SearchProducts(
                    search_pb2.SearchProductsRequest(query="the", page_size=70, page_token=token)
                )
                pages += 1
                assert page.total_matches == 300
                seen.extend(p.id for p in page.products)
                token = page.next_page_token
                if not token:
                    break
            assert pages == 5  # 70 + 70 + 70 + 70 + 20
            assert len(seen) == 300 == len(set(seen))

    run(body())


def test_page_tokens_are_validated(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            page = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="the", page_size=5))
            token = page.next_page_token
            assert token
            for bad in ("garbage", token + "x", "x" + token, token[:-2], "a.b", "." * 600):
                details = await expect_status(
                    stub.SearchProducts(search_pb2.SearchProductsRequest(query="the", page_token=bad)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                assert details == BAD_TOKEN
            # A token is bound to its query.
            details = await expect_status(
                stub.SearchProducts(search_pb2.SearchProductsRequest(query="lamp", page_token=token)),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert details == BAD_TOKEN
            # The genuine token works, and differently sized pages may follow.
            second = await stub.SearchProducts(
                search_pb2.SearchProductsRequest(query="the", page_size=7, page_token=token)
            )
            assert len(second.products) == 7
            assert not {p.id for p in second.products} & {p.id for p in page.products}

    run(body())


def test_page_tokens_survive_a_restart_but_not_another_data_dir(tmp_path: Path) -> None:
    async def first_token(data_dir: Path) -> str:
        async with search_service(data_dir) as (address, _), channel(address) as chan:
            page = await search_pb2_grpc.SearchStub(chan).SearchProducts(
                search_pb2.SearchProductsRequest(query="the", page_size=5)
            )
            return page.next_page_token

    async def body() -> None:
        token = await first_token(tmp_path / "a")
        async with search_service(tmp_path / "a") as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            page = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="the", page_token=token))
            assert page.products
        async with search_service(tmp_path / "b") as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            details = await expect_status(
                stub.SearchProducts(search_pb2.SearchProductsRequest(query="the", page_token=token)),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert details == BAD_TOKEN

    run(body())


@pytest.mark.parametrize(
    ("request_fields", "message_part"),
    [
        ({"query": ""}, "query is required"),
        ({"query": "   \t\n"}, "query is required"),
        ({"query": "x" * 257}, "257 characters long; the limit is 256"),
        ({"query": "mug", "page_size": 101}, "page_size must be 1 to 100"),
        ({"query": "mug", "page_size": -1}, "page_size must be 1 to 100"),
        ({"query": '"*()'}, "no words to search for"),
    ],
)
def test_search_rejects_bad_requests(tmp_path: Path, request_fields: dict[str, object], message_part: str) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            details = await expect_status(
                search_pb2_grpc.SearchStub(chan).SearchProducts(search_pb2.SearchProductsRequest(**request_fields)),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert message_part in details

    run(body())


def test_search_accepts_the_longest_allowed_query(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            response = await search_pb2_grpc.SearchStub(chan).SearchProducts(
                search_pb2.SearchProductsRequest(query="mug " * 64)
            )
            assert response.total_matches > 0

    run(body())


FTS_SYNTAX = [
    '"', '""', '"mug', 'mug"', "mug*", "*", "(", ")", "(mug", "NEAR(mug lamp)", "name:mug", "description : x",
    "mug AND lamp", "AND", "OR", "NOT", "mug OR", "-mug", "+mug", "^mug", "{name}: mug", "mug NOT", "'; DROP TABLE products; --",
    "mug\x00lamp", "café", "日本", "🙂", "a" * 256,
]


@pytest.mark.parametrize("query", FTS_SYNTAX)
def test_user_text_never_breaks_fts5_syntax(tmp_path: Path, query: str) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            try:
                await stub.SearchProducts(search_pb2.SearchProductsRequest(query=query))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                assert "no words to search for" in (err.details() or "")

    run(body())


def test_fts_operators_in_user_text_are_searched_literally(tmp_path: Path) -> None:
    assert fts_query_for('mug AND "lamp" (x*') == '"mug"* "AND"* "lamp"* "x"*'

    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            # "and" appears in many descriptions; as an operator it would be a syntax error.
            response = await stub.SearchProducts(search_pb2.SearchProductsRequest(query="AND"))
            assert response.total_matches > 0
            assert all(" and" in p.description.lower() for p in response.products)

    run(body())


def test_get_products_in_the_order_asked(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            ids = ["sku-0300", "sku-0001", "sku-0150", "sku-0001"]
            response = await stub.GetProducts(search_pb2.GetProductsRequest(ids=ids))
            assert [p.id for p in response.products] == ids
            assert all(p.name and p.price_minor > 0 and p.currency == "EUR" for p in response.products)
            hundred = [f"sku-{i:04d}" for i in range(1, 101)]
            assert len((await stub.GetProducts(search_pb2.GetProductsRequest(ids=hundred))).products) == 100

    run(body())


def test_get_products_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            details = await expect_status(
                stub.GetProducts(search_pb2.GetProductsRequest(ids=["sku-0001", "sku-9999"])), grpc.StatusCode.NOT_FOUND
            )
            assert details == "unknown product id 'sku-9999'"
            details = await expect_status(
                stub.GetProducts(search_pb2.GetProductsRequest(ids=["sku-9998", "sku-0002", "sku-9999", "sku-9998"])),
                grpc.StatusCode.NOT_FOUND,
            )
            assert details == "unknown product ids 'sku-9998', 'sku-9999'"
            details = await expect_status(stub.GetProducts(search_pb2.GetProductsRequest()), grpc.StatusCode.INVALID_ARGUMENT)
            assert "ids is empty" in details
            too_many = [f"sku-{i:04d}" for i in range(1, 102)]
            details = await expect_status(
                stub.GetProducts(search_pb2.GetProductsRequest(ids=too_many)), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert "101 ids" in details
            details = await expect_status(
                stub.GetProducts(search_pb2.GetProductsRequest(ids=["sku-0001", ""])), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert details == "ids[1] is empty"

    run(body())


def test_oversized_requests_are_refused_by_grpc(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            await expect_status(
                search_pb2_grpc.SearchStub(chan).SearchProducts(
                    search_pb2.SearchProductsRequest(query="x" * (2 * 1024 * 1024))
                ),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )

    run(body())


def test_health_reports_serving_for_the_server_and_the_service(tmp_path: Path) -> None:
    async def body() -> None:
        async with search_service(tmp_path) as (address, _), channel(address) as chan:
            health = health_pb2_grpc.HealthStub(chan)
            for name in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await expect_status(
                health.Check(health_pb2.HealthCheckRequest(service="shopmesh.nope.v1.Nope")), grpc.StatusCode.NOT_FOUND
            )

    run(body())


def test_catalog_is_rebuilt_only_when_the_csv_changes(tmp_path: Path) -> None:
    csv_path = tmp_path / "catalog.csv"
    header = "id,name,description,category,price_minor,currency\n"
    csv_path.write_text(header + "sku-0001,Teapot,Brews tea,kitchen,1500,EUR\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()

    Catalog.open(data_dir, csv_path).close()
    inode = os.stat(data_dir / DB_NAME).st_ino
    Catalog.open(data_dir, csv_path).close()
    assert os.stat(data_dir / DB_NAME).st_ino == inode, "unchanged CSV: the database is reused"

    csv_path.write_text(header + "sku-0001,Teapot,Brews tea,kitchen,1500,EUR\nsku-0002,Kettle,Boils water,kitchen,3000,EUR\n")
    catalog = Catalog.open(data_dir, csv_path)
    try:
        assert catalog.count() == 2
        assert set(catalog.get(["sku-0002"])) == {"sku-0002"}
    finally:
        catalog.close()
    assert os.stat(data_dir / DB_NAME).st_ino != inode


@pytest.mark.parametrize(
    ("rows", "message_part"),
    [
        ("sku-0001,Teapot,Brews tea,kitchen,abc,EUR\n", "line 2: price_minor 'abc' is not an integer"),
        ("sku-0001,Teapot,Brews tea,kitchen,100,EUR\nsku-0001,Pot,x,kitchen,1,EUR\n", "line 3: duplicate id 'sku-0001'"),
        ("sku-0001,Teapot,Brews tea,kitchen,100,euro\n", "line 2: currency 'euro'"),
        ("sku-0001,Teapot,Brews tea\n", "line 2: expected 6 fields"),
    ],
)
def test_a_bad_catalog_row_stops_start_up_naming_the_line(tmp_path: Path, rows: str, message_part: str) -> None:
    csv_path = tmp_path / "catalog.csv"
    csv_path.write_text("id,name,description,category,price_minor,currency\n" + rows)
    with pytest.raises(CatalogError) as info:
        Catalog.open(tmp_path, csv_path)
    assert message_part in str(info.value)
    assert not (tmp_path / DB_NAME).exists(), "nothing half-built is left behind"


def test_python_m_services_search_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_text = check_app_lifecycle("services.search", SERVICE_NAME, tmp_path)
    assert "listening on 127.0.0.1:" in log_text
