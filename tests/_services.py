"""Helpers for the service tests: in-process servers, channels, polling, subprocesses.

Tests are plain sync functions that call `run(body())`; pytest-asyncio is not
used. Servers are real grpc.aio servers on ephemeral 127.0.0.1 ports, with
real SQLite files under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.orders.server import OrdersServicer, Upstreams, orders_servicer
from services.payments.server import PaymentsServicer, payments_servicer
from services.search.server import SearchServicer, search_servicer
from shopmesh.server import running_server

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

# A caller identity as the app's own Envoy would present it.
ORDERS_XFCC = (
    "x-forwarded-client-cert",
    "By=spiffe://shopmesh.internal/ns/shop/sa/payments;Hash=00ff;URI=spiffe://shopmesh.internal/ns/shop/sa/orders",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def free_port() -> int:
    """A port that was free a moment ago (for subprocesses that need a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def search_service(data_dir: Path, listen: str = "127.0.0.1:0", **kwargs: Any) -> AsyncIterator[tuple[str, SearchServicer]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with search_servicer(data_dir, **kwargs) as servicer:
        async with running_server(servicer.register, listen, grace=0.5) as port:
            yield f"127.0.0.1:{port}", servicer


@contextlib.asynccontextmanager
async def payments_service(data_dir: Path, listen: str = "127.0.0.1:0", **kwargs: Any) -> AsyncIterator[tuple[str, PaymentsServicer]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with payments_servicer(data_dir, **kwargs) as servicer:
        async with running_server(servicer.register, listen, grace=0.5) as port:
            yield f"127.0.0.1:{port}", servicer


@contextlib.asynccontextmanager
async def orders_service(
    data_dir: Path, upstreams: Upstreams, listen: str = "127.0.0.1:0", **kwargs: Any
) -> AsyncIterator[tuple[str, OrdersServicer]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    async with orders_servicer(data_dir, upstreams, **kwargs) as servicer:
        async with running_server(servicer.register, listen, grace=0.5) as port:
            yield f"127.0.0.1:{port}", servicer


@contextlib.asynccontextmanager
async def channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(address) as chan:
        yield chan


async def expect_status(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await an RPC that must fail with `code`; return its details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, f"expected {code.name}, got {info.value.code().name}: {info.value.details()}"
    return info.value.details() or ""


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.05) -> T:
    """Retry an async check until it returns without raising, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except (AssertionError, grpc.aio.AioRpcError):
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)


# --- subprocesses -----------------------------------------------------------------


def wait_serving(address: str, service: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> None:
    """Poll grpc.health.v1 Check until `service` is SERVING (fail if the process exits first)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"process exited with {proc.returncode} before serving:\n{log_path.read_text()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = f"{err.code().name}"  # type: ignore[attr-defined]
            time.sleep(0.05)
    pytest.fail(f"{service or 'server'} at {address} not SERVING within {timeout} s (last: {last}):\n{log_path.read_text()}")


@contextlib.contextmanager
def app_process(module: str, env: Mapping[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start `python -m module` with env added; kill it by pid on exit if still running."""
    full_env = {**os.environ, **env}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def check_app_lifecycle(module: str, service: str, tmp_path: Path, extra_env: Mapping[str, str] | None = None) -> str:
    """Start the app as the runner would, wait for SERVING, SIGTERM it, expect exit 0. Returns its log."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        "SHOPMESH_APP_LISTEN": address,
        "SHOPMESH_DATA_DIR": str(tmp_path / "data"),
        **(extra_env or {}),
    }
    log_path = tmp_path / f"{module}.log"
    with app_process(module, env, log_path) as proc:
        wait_serving(address, "", proc, log_path)
        wait_serving(address, service, proc, log_path)
        os.kill(proc.pid, signal.SIGTERM)
        returncode = proc.wait(timeout=15)
    log_text = log_path.read_text()
    assert returncode == 0, f"exit code {returncode}:\n{log_text}"
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    return log_text
