"""The shared app library: config validation, server bootstrap, error mapping, page tokens."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from _services import channel, expect_status, free_port, run
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shopmesh.config import ConfigError, app_config_from_env, env_address, load_or_create_secret, parse_address
from shopmesh.pagination import InvalidPageToken, PageTokens, resolve_page_size
from shopmesh.search.v1 import search_pb2, search_pb2_grpc
from shopmesh.server import InvalidArgument, StartupError, rpc_errors, running_server, serve

SECRET = "4242424242424242"


@pytest.mark.parametrize(
    ("value", "message_part"),
    [
        ("127.0.0.1", "not an address of the form HOST:PORT"),
        (":80", "not an address of the form HOST:PORT"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:70000", "port 70000 is outside 1..65535"),
        ("127.0.0.1:0", "port 0 is outside 1..65535"),
    ],
)
def test_bad_addresses_name_the_setting_and_value(value: str, message_part: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(value, what="SHOPMESH_X")
    assert f"SHOPMESH_X={value!r}" in str(info.value) and message_part in str(info.value)


def test_upstream_addresses_must_be_loopback() -> None:
    assert env_address("UP", environ={"UP": "127.0.0.1:9102"}) == ("127.0.0.1", 9102)
    assert env_address("UP", environ={"UP": "[::1]:9102"}) == ("::1", 9102)
    assert env_address("UP", "127.0.0.1:9103", environ={}) == ("127.0.0.1", 9103)
    for bad, part in (("10.0.0.5:9102", "not a loopback address"), ("localhost:9102", "not an IP address")):
        with pytest.raises(ConfigError) as info:
            env_address("UP", environ={"UP": bad})
        assert f"UP={bad!r}" in str(info.value) and part in str(info.value)
    with pytest.raises(ConfigError, match="UP is not set"):
        env_address("UP", environ={})


def test_app_config_from_env(tmp_path: Path) -> None:
    config = app_config_from_env({"SHOPMESH_APP_LISTEN": "127.0.0.1:50070", "SHOPMESH_DATA_DIR": str(tmp_path / "d")})
    assert config.listen == "127.0.0.1:50070"
    assert config.data_dir == tmp_path / "d" and config.data_dir.stat().st_mode & 0o777 == 0o700
    assert app_config_from_env({"SHOPMESH_DATA_DIR": str(tmp_path / "d")}).listen == "127.0.0.1:50051"
    data_dir = {"SHOPMESH_DATA_DIR": str(tmp_path / "d")}
    cases = [
        ({}, "SHOPMESH_DATA_DIR is not set"),
        ({"SHOPMESH_DATA_DIR": "  "}, "SHOPMESH_DATA_DIR is not set"),
        ({**data_dir, "SHOPMESH_APP_LISTEN": "0.0.0.0:50051"}, "apps bind 127.0.0.1 only"),
        ({**data_dir, "SHOPMESH_APP_LISTEN": "[::1]:50051"}, "apps bind 127.0.0.1 only"),
        ({**data_dir, "SHOPMESH_APP_LISTEN": "127.0.0.1:0"}, "port 0 is for tests"),
        ({**data_dir, "SHOPMESH_APP_LISTEN": "127.0.0.1:x"}, "SHOPMESH_APP_LISTEN='127.0.0.1:x'"),
    ]
    for env, part in cases:
        with pytest.raises(ConfigError) as info:
            app_config_from_env(env)
        assert part in str(info.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="SHOPMESH_DATA_DIR="):
        app_config_from_env({"SHOPMESH_DATA_DIR": str(tmp_path / "file")})


def test_secrets_are_created_once_atomically_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "k.key"
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(path, 32))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results[0]) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["k.key"], "no temporary files left behind"
    assert load_or_create_secret(path, 32) == results[0]
    with pytest.raises(ConfigError, match="holds 32 bytes, expected 16"):
        load_or_create_secret(path, 16)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="has mode 0640; it must be 0600"):
        load_or_create_secret(path, 32)


def test_page_sizes_and_tokens() -> None:
    assert [resolve_page_size(n) for n in (0, 1, 100)] == [20, 1, 100]
    for bad in (-1, 101):
        with pytest.raises(InvalidArgument, match="page_size must be 1 to 100"):
            resolve_page_size(bad)
    tokens = PageTokens(b"k" * 32, "orders.v1.ListOrders")
    token = tokens.issue({"before": 42})
    assert tokens.parse(token) == {"before": 42}
    # Same key, another method: not valid there.
    with pytest.raises(InvalidPageToken):
        PageTokens(b"k" * 32, "search.v1.SearchProducts").parse(token)
    with pytest.raises(InvalidPageToken):
        PageTokens(b"j" * 32, "orders.v1.ListOrders").parse(token)
    for bad in ("", "abc", token + ".x", "!!.??", "e30.AAAA"):
        with pytest.raises(InvalidPageToken):
            tokens.parse(bad)


class Exploding(search_pb2_grpc.SearchServicer):
    """A servicer whose methods fail in the ways rpc_errors must handle."""

    def register(self, server: grpc.aio.Server) -> list[str]:
        search_pb2_grpc.add_SearchServicer_to_server(self, server)
        return ["shopmesh.search.v1.Search"]

    @rpc_errors(redact_unexpected=True)
    async def SearchProducts(self, request: Any, context: Any) -> search_pb2.SearchProductsResponse:
        if request.query == "bad":
            raise InvalidArgument("query 'bad' is bad")
        raise RuntimeError(f"library failure quoting its input {SECRET}")

    @rpc_errors()
    async def GetProducts(self, request: Any, context: Any) -> search_pb2.GetProductsResponse:
        raise KeyError("unexpected")


def test_rpc_errors_map_service_errors_and_hide_unexpected_ones(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body() -> None:
        async with running_server(Exploding().register, grace=0.1) as port, channel(f"127.0.0.1:{port}") as chan:
            stub = search_pb2_grpc.SearchStub(chan)
            details = await expect_status(
                stub.SearchProducts(search_pb2.SearchProductsRequest(query="bad")), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert details == "query 'bad' is bad"
            details = await expect_status(
                stub.SearchProducts(search_pb2.SearchProductsRequest(query="x")), grpc.StatusCode.INTERNAL
            )
            assert details == "SearchProducts failed with an internal error; see the service log"
            await expect_status(stub.GetProducts(search_pb2.GetProductsRequest()), grpc.StatusCode.INTERNAL)

    run(body())
    assert SECRET not in caplog.text
    assert "SearchProducts failed: unexpected RuntimeError (details withheld)" in caplog.text
    # Without redaction the traceback is logged, for debugging.
    assert "GetProducts failed unexpectedly" in caplog.text and "KeyError" in caplog.text


def test_servers_bind_127_0_0_1_only() -> None:
    async def body() -> None:
        for listen in ("0.0.0.0:0", "[::]:0", "localhost:0", "192.0.2.1:0"):
            with pytest.raises(ConfigError, match="apps bind 127.0.0.1 only"):
                async with running_server(Exploding().register, listen):
                    pass

    run(body())


def test_a_taken_port_fails_start_up() -> None:
    async def body() -> None:
        async with running_server(Exploding().register, grace=0.1) as port:
            with pytest.raises(StartupError, match=f"cannot bind 127.0.0.1:{port}"):
                async with running_server(Exploding().register, f"127.0.0.1:{port}"):
                    pass

    run(body())


def test_serve_reports_health_and_turns_not_serving_when_stopping() -> None:
    async def body() -> None:
        stop = asyncio.Event()
        address = f"127.0.0.1:{free_port()}"
        serving = asyncio.create_task(serve(address, Exploding().register, grace=1.0, stop=stop))
        async with channel(address) as chan:
            health = health_pb2_grpc.HealthStub(chan)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="shopmesh.search.v1.Search"), wait_for_ready=True)
            statuses = [(await watch.read()).status]
            assert statuses == [health_pb2.HealthCheckResponse.SERVING]
            stop.set()
            statuses.append((await watch.read()).status)
            assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        await asyncio.wait_for(serving, timeout=10)

    run(body())
