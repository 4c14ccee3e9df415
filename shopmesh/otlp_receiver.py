"""A small OTLP/gRPC trace receiver for local runs: spans to JSON lines on disk.

    python -m shopmesh.otlp_receiver --listen 10.89.7.1:8442 [--listen 127.0.0.1:8442] --out .state/traces

`shopmesh up` starts one per mesh, where every pod can reach it (the pod
bridge's host address, or 127.0.0.1 when pods share loopback). Apps (the
OpenTelemetry SDK) and Envoys (envoy.tracers.opentelemetry) export to it with
the standard TraceService/Export call; `shopmesh traces` reads what it wrote.
In compose, Jaeger takes its place: nothing here is needed there.

Each span becomes one JSON object on one line of <out>/spans.jsonl:

    {"trace_id": "5b8a…", "span_id": "…", "parent_span_id": "…" or null,
     "name": "…", "kind": "server", "service": "orders",
     "start_ns": …, "end_ns": …, "status": {"code": "ERROR", "message": "…"},
     "attributes": {…}, "events": [{"name": …, "time_ns": …, "attributes": {…}}],
     "scope": "opentelemetry.instrumentation.grpc"}

The file is rotated to spans.jsonl.1 when it passes --max-bytes, so a mesh
left running does not fill the disk. Card numbers are redacted once more on
the way in (shopmesh.telemetry.redact_card_numbers): the apps already redact
their own spans, but this file is plaintext on disk and Envoy spans did not
pass through the apps' redactor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from shopmesh.config import ConfigError, ensure_private_dir, format_address, parse_address
from shopmesh.logs import setup_logging
from shopmesh.telemetry import redact_attributes, redact_card_numbers

log = logging.getLogger("shopmesh.otlp_receiver")

SPANS_FILE = "spans.jsonl"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# OTLP exporters batch spans; Envoy's default batch and the SDK's 512-span
# batches are far below this.
MAX_RECEIVE_MESSAGE_BYTES = 16 * 1024 * 1024
SHUTDOWN_GRACE_S = 2.0

_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}
_STATUS = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


# --- OTLP → JSON -------------------------------------------------------------------


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as a plain JSON value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return key_values(value.kvlist_value.values)
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def key_values(items: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {item.key: any_value(item.value) for item in items}


def span_records(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """One JSON-ready dict per span of an Export request, card numbers redacted."""
    records = []
    for resource_spans in request.resource_spans:
        resource = key_values(resource_spans.resource.attributes)
        service = str(resource.get("service.name") or "unknown_service")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "name": redact_card_numbers(span.name),
                        "kind": _KINDS.get(span.kind, "unspecified"),
                        "service": service,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status": {
                            "code": _STATUS.get(span.status.code, "UNSET"),
                            "message": redact_card_numbers(span.status.message),
                        },
                        "attributes": redact_attributes(key_values(span.attributes)),
                        "events": [
                            {
                                "name": redact_card_numbers(event.name),
                                "time_ns": event.time_unix_nano,
                                "attributes": redact_attributes(key_values(event.attributes)),
                            }
                            for event in span.events
                        ],
                        "scope": scope_spans.scope.name,
                    }
                )
    return records


# --- storage ---------------------------------------------------------------------------


class SpanFile:
    """Appends span records to <dir>/spans.jsonl, one line each, rotating at max_bytes."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = ensure_private_dir(directory, what="--out")
        self.path = directory / SPANS_FILE
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        # One write per batch, of whole lines: a reader never sees half a span
        # (it skips a trailing line without a newline anyway).
        data = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > self.max_bytes:
                self.path.replace(self.path.with_name(SPANS_FILE + ".1"))


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, spans: SpanFile) -> None:
        self._spans = spans
        self.received = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        records = span_records(request)
        try:
            await asyncio.to_thread(self._spans.append, records)
        except OSError as exc:
            log.error("cannot store %d spans in %s: %s", len(records), self._spans.path, exc)
            # UNAVAILABLE: exporters retry it, and the batch is not lost if the disk recovers.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the receiver cannot write its span file: {exc.strerror}")
        self.received += len(records)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.asynccontextmanager
async def running_receiver(
    listens: list[str], out: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> AsyncIterator[list[int]]:
    """Serve TraceService on every address in `listens`; yield the bound ports."""
    spans = SpanFile(out, max_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceReceiver(spans), server)
    ports = []
    for listen in listens:
        host, port = parse_address(listen, what="--listen", allow_port_zero=True)
        address = format_address(host, port)
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"--listen {listen}: cannot bind: {exc}") from None
        if bound == 0:
            raise ConfigError(f"--listen {listen}: cannot bind (the address is in use or not on this machine)")
        ports.append(bound)
    await server.start()
    try:
        log.info("OTLP/gRPC receiver on %s, spans in %s", ", ".join(listens), spans.path)
        yield ports
    finally:
        await server.stop(SHUTDOWN_GRACE_S)


async def serve(listens: list[str], out: Path, max_bytes: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_receiver(listens, out, max_bytes=max_bytes):
        await stop.wait()
    log.info("stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shopmesh.otlp_receiver", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", action="append", required=True, metavar="HOST:PORT", help="address to serve OTLP/gRPC on (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="directory for spans.jsonl (created 0700)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="rotate spans.jsonl past this size (default: %(default)s)")
    args = p.parse_args(argv)
    if args.max_bytes < 1024:
        p.error(f"argument --max-bytes: {args.max_bytes} is too small; give at least 1024")
    for listen in args.listen:
        try:
            parse_address(listen, what="--listen")
        except ConfigError as exc:
            p.error(f"argument {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("shopmesh.otlp_receiver")
    try:
        asyncio.run(serve(args.listen, args.out.absolute(), args.max_bytes))
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
