"""Server bootstrap shared by the apps: one grpc.aio server per process.

    async with running_server(register, "127.0.0.1:0") as port:   # tests
        ...
    await serve("127.0.0.1:50051", register)                       # __main__

`register(server)` adds the app's servicers and returns their full service
names; the bootstrap adds grpc.health.v1 and reports "" and each of those
names SERVING once the port is bound. On SIGTERM/SIGINT every name turns
NOT_SERVING (so the sidecar and the runner stop sending traffic) and the
server stops with a grace period for calls in flight.

The module also maps a small error hierarchy (ServiceError and its
subclasses) to gRPC statuses, so servicers raise domain errors and one
decorator turns them into `context.abort(code, message)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shopmesh.config import AppConfig, ConfigError, app_config_from_env, format_address, parse_listen_address
from shopmesh.logs import setup_logging
from shopmesh.telemetry import server_interceptors, setup_tracing

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], Iterable[str]]

# Requests to these services are small (a search query, a few order lines);
# anything bigger is refused by gRPC itself with RESOURCE_EXHAUSTED before a
# handler sees it.
MAX_RECEIVE_MESSAGE_BYTES = 1024 * 1024
SHUTDOWN_GRACE_SECONDS = 5.0


class StartupError(Exception):
    """The server could not start (e.g. the port is taken)."""


class _Health:
    """grpc.health.v1 for the registered services."""

    def __init__(self, service_names: list[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]

    async def set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in self.names:
            await self.servicer.set(name, status)


@contextlib.asynccontextmanager
async def running_server(
    register: Register,
    listen: str = "127.0.0.1:0",
    *,
    grace: float = SHUTDOWN_GRACE_SECONDS,
) -> AsyncIterator[int]:
    """Start a server on `listen` and yield the bound port; stop it gracefully on exit."""
    async with _started(register, listen, grace) as port:
        yield port


@contextlib.asynccontextmanager
async def _started(register: Register, listen: str, grace: float) -> AsyncIterator[int]:
    host, port = parse_listen_address(listen)
    server = grpc.aio.server(
        # A span per call (except health checks), joined to the caller's trace.
        interceptors=server_interceptors(),
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default, which lets a second copy of
            # an app bind the same port and silently take half the traffic;
            # a port conflict must fail start-up instead.
            ("grpc.so_reuseport", 0),
        ]
    )
    names = list(register(server))
    health_state = _Health(names)
    health_pb2_grpc.add_HealthServicer_to_server(health_state.servicer, server)
    # Until the port is bound and the servicers are in place, nothing should
    # route here: start NOT_SERVING, flip to SERVING after start().
    await health_state.set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot bind {address}: {exc}") from exc
    if bound == 0:
        raise StartupError(f"cannot bind {address}: the address is in use or not available")
    await server.start()
    try:
        await health_state.set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s (%s)", format_address(host, bound), ", ".join(names))
        yield bound
    finally:
        # NOT_SERVING first, so health checkers (the sidecar, the runner)
        # stop routing here while calls in flight finish within the grace.
        await health_state.servicer.enter_graceful_shutdown()
        log.info("stopping: NOT_SERVING, %g s grace for calls in flight", grace)
        await server.stop(grace)
        log.info("stopped")


async def serve(
    listen: str,
    register: Register,
    *,
    grace: float = SHUTDOWN_GRACE_SECONDS,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then stop gracefully.

    Health turns NOT_SERVING first, then in-flight calls get `grace` seconds.
    """
    stop_event = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _request_stop, stop_event, sig)
        installed.append(sig)
    try:
        async with _started(register, listen, grace):
            await stop_event.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _request_stop(stop_event: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    stop_event.set()


# --- errors → gRPC statuses -------------------------------------------------


class ServiceError(Exception):
    """A request failed in a way the caller can act on; the message says how.

    Messages go to the caller verbatim, so they must never contain secrets.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
Handler = Callable[[_Servicer, _Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Response]]


def rpc_errors(
    *, redact_unexpected: bool = False
) -> Callable[[Handler[_Servicer, _Request, _Response]], Handler[_Servicer, _Request, _Response]]:
    """Decorate a servicer method: ServiceError → its status, anything else → INTERNAL.

    With redact_unexpected, an unexpected exception is logged by type only,
    without message or traceback: payments handles card numbers, and a
    library's exception text could quote its input.
    """

    def decorate(method: Handler[_Servicer, _Request, _Response]) -> Handler[_Servicer, _Request, _Response]:
        method_log = logging.getLogger(method.__module__)

        @functools.wraps(method)
        async def wrapper(self: _Servicer, request: _Request, context: grpc.aio.ServicerContext[Any, Any]) -> _Response:
            try:
                return await method(self, request, context)
            except ServiceError as exc:
                failure = exc
            except Exception as exc:
                if redact_unexpected:
                    method_log.error("%s failed: unexpected %s (details withheld)", method.__name__, type(exc).__name__)
                else:
                    method_log.exception("%s failed unexpectedly", method.__name__)
                failure = Internal(f"{method.__name__} failed with an internal error; see the service log")
            # Outside the except blocks, so the abort carries no exception
            # context that could quote the original error.
            await context.abort(failure.code, failure.message)
            raise AssertionError("context.abort returned")  # abort always raises

        return wrapper

    return decorate


# --- process entry point ------------------------------------------------------


def run_app(service_name: str, main: Callable[[AppConfig], Awaitable[None]]) -> int:
    """The body of every app's `__main__`: config, logging, asyncio.run, exit status.

    Returns 0 after a graceful stop, 2 for a configuration error (the message
    names the variable and value), 1 if the app could not start.
    """
    app_log = setup_logging(service_name)
    try:
        config = app_config_from_env()
        tracing = setup_tracing(service_name)
        try:
            asyncio.run(main(config))
        finally:
            tracing.shutdown()  # export the spans still queued
    except ConfigError as exc:
        print(f"{service_name}: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        app_log.error("cannot start: %s", exc)
        return 1
    return 0
