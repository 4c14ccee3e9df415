"""The load generator: an asyncio gRPC client in its own process.

    python -m bench.loadgen '<spec as JSON>'    # prints one JSON result on stdout

It runs apart from the benchmark driver and from the servers it loads, so its
own CPU shows up as its own process (it reports it) and never as the
server's. Two ways to send:

- open loop ("mode": "open", "rate": R): requests leave at R per second on a
  fixed schedule whatever the answers do, as real clients would; a server
  that falls behind shows as growing latency and a shortfall in completed
  requests, not as a politely slower client. Latency is measured from the
  moment the request left. How late the generator itself sent (`lag_ms`) is
  reported next to it: a large lag means the generator, not the server, was
  the limit, and the run is marked not sustained.
- closed loop ("mode": "closed", "concurrency": C): C callers each send the
  next request as soon as the previous one answered, for saturation
  throughput.

Calls ("call": {"kind": …}):
- "echo": `path` with `payload_bytes` random bytes (no protobuf work), for
  bench.echo_server behind or without the sidecars;
- "tokenize": Payments.Tokenize with a new valid card number every time;
- "charge": Payments.Charge of one of `tokens`, a new idempotency key every time;
- "place_order": Orders.PlaceOrder with `token` (must end PAID to count as ok);
- "search": Search.SearchProducts.

Spec keys besides: target (host:port), duration_s, warmup_s (sent but not
measured), timeout_s, metadata ([[key, value], …]), channels (HTTP/2
connections, default 1), samples_file (optional: one line per measured call,
"<epoch start> <latency ms> <status>", for the rotation benchmark).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import grpc

from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.search.v1 import search_pb2, search_pb2_grpc

Call = Callable[[], Awaitable[None]]

# An open-loop run whose generator sent this late (p99) measured itself, not the server.
MAX_SUSTAINED_LAG_MS = 5.0
# ... or that completed fewer than this share of the requests it meant to send in time.
MIN_SUSTAINED_SHARE = 0.98


class NotPaid(Exception):
    """PlaceOrder answered OK but the order did not end PAID: a failed call."""


def luhn_card(rng: random.Random, prefix: str = "4") -> str:
    """A random 16-digit, Luhn-valid card number (a Visa test range by default)."""
    body = prefix + "".join(rng.choice("0123456789") for _ in range(15 - len(prefix)))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # these digits are doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def _make_call(channel: grpc.aio.Channel, call: dict[str, Any], metadata: tuple[tuple[str, str], ...],
               timeout: float, rng: random.Random) -> Call:
    kind = call["kind"]
    md = metadata or None
    if kind == "echo":
        method = channel.unary_unary(call["path"])  # no serializers: bytes in, bytes out
        payload = os.urandom(int(call.get("payload_bytes", 1024)))

        async def echo() -> None:
            await method(payload, timeout=timeout, metadata=md)

        return echo
    if kind == "tokenize":
        payments = payments_pb2_grpc.PaymentsStub(channel)
        year = datetime.now(timezone.utc).year + 3

        async def tokenize() -> None:
            await payments.Tokenize(payments_pb2.TokenizeRequest(
                card_number=luhn_card(rng), exp_month=12, exp_year=year, cvv="123"), timeout=timeout, metadata=md)

        return tokenize
    if kind == "charge":
        payments = payments_pb2_grpc.PaymentsStub(channel)
        tokens = list(call["tokens"])

        async def charge() -> None:
            # Letters around the hex digits: payments refuses an idempotency key
            # holding a Luhn-valid run of digits (it could be a card number), and
            # a dashed UUID is one about once in a thousand.
            await payments.Charge(payments_pb2.ChargeRequest(
                token=rng.choice(tokens), amount_minor=1299, currency="EUR",
                idempotency_key=f"bench{uuid.uuid4().hex}x"), timeout=timeout, metadata=md)

        return charge
    if kind == "place_order":
        orders = orders_pb2_grpc.OrdersStub(channel)
        token = str(call["token"])
        product = str(call.get("product_id", "sku-0001"))

        async def place() -> None:
            order = await orders.PlaceOrder(orders_pb2.PlaceOrderRequest(
                items=[orders_pb2.LineItem(product_id=product, quantity=1)],
                payment_token=token, idempotency_key=str(uuid.uuid4())), timeout=timeout, metadata=md)
            if order.state != orders_pb2.ORDER_STATE_PAID:
                raise NotPaid(orders_pb2.OrderState.Name(order.state))

        return place
    if kind == "search":
        search = search_pb2_grpc.SearchStub(channel)

        async def query() -> None:
            await search.SearchProducts(search_pb2.SearchProductsRequest(query="coffee", page_size=5),
                                        timeout=timeout, metadata=md)

        return query
    raise ValueError(f"unknown call kind {kind!r}: expected echo, tokenize, charge, place_order or search")


@dataclass
class Recorder:
    measure_from: float  # loop time: calls started before this are warm-up
    latencies_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    keep_samples: bool = False
    ok: int = 0

    async def run(self, call: Call, started: float, lag_ms: float, measured: bool) -> None:
        wall = time.time()
        status = "OK"
        try:
            await call()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            status = code.name if code is not None else type(exc).__name__
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else ""
            self._error(status, f"{status}: {detail}")
        except NotPaid as exc:
            status = "NOT_PAID"
            self._error(status, f"order ended {exc}")
        else:
            if measured:
                self.ok += 1
        latency = (time.perf_counter() - started) * 1000
        if measured:
            self.latencies_ms.append(latency)
            self.lags_ms.append(lag_ms)
            if self.keep_samples:
                self.samples.append(f"{wall:.6f} {latency:.3f} {status}")

    def _error(self, status: str, sample: str) -> None:
        self.errors[status] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(sample)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9, mean and max (nearest rank), in the values' unit."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {
        "p50": rank(50), "p90": rank(90), "p99": rank(99), "p99.9": rank(99.9),
        "mean": sum(ordered) / len(ordered), "max": ordered[-1],
    }


async def _open_loop(calls: list[Call], rec: Recorder, rate: float, warmup: float, duration: float) -> int:
    """Fire on a fixed schedule; return how many requests were sent in the measured window."""
    interval = 1.0 / rate
    total = int(round((warmup + duration) * rate))
    first_measured = int(round(warmup * rate))
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.01
    i = 0
    while i < total:
        now = time.perf_counter()
        # Everything due by now leaves now (the event loop wakes up at
        # millisecond granularity; the lag is reported).
        while i < total and start + i * interval <= now:
            due = start + i * interval
            sent = time.perf_counter()
            # Measured by its place in the schedule, not by when it left: a
            # warm-up call sent late stays a warm-up call.
            task = asyncio.create_task(rec.run(calls[i % len(calls)], sent, (sent - due) * 1000, i >= first_measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
    if tasks:
        await asyncio.wait(tasks)
    return total - first_measured


async def _closed_loop(calls: list[Call], rec: Recorder, concurrency: int, warmup: float, duration: float) -> int:
    start = time.perf_counter()
    rec.measure_from = start + warmup
    end = rec.measure_from + duration
    sent = 0

    async def worker(n: int) -> None:
        nonlocal sent
        call = calls[n % len(calls)]
        while time.perf_counter() < end:
            t = time.perf_counter()
            measured = t >= rec.measure_from
            if measured:
                sent += 1
            await rec.run(call, t, 0.0, measured)

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return sent


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    mode = spec.get("mode", "open")
    duration = float(spec["duration_s"])
    warmup = float(spec.get("warmup_s", 1.0))
    timeout = float(spec.get("timeout_s", 5.0))
    metadata = tuple((str(k), str(v)) for k, v in spec.get("metadata", []))
    rng = random.Random(spec.get("seed"))
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel, really
    channels = [grpc.aio.insecure_channel(spec["target"], options=options) for _ in range(int(spec.get("channels", 1)))]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        calls = [_make_call(channel, spec["call"], metadata, timeout, rng) for channel in channels]
        rec = Recorder(measure_from=0.0, keep_samples=bool(spec.get("samples_file")))
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        if mode == "open":
            rate = float(spec["rate"])
            sent = await _open_loop(calls, rec, rate, warmup, duration)
        elif mode == "closed":
            sent = await _closed_loop(calls, rec, int(spec.get("concurrency", 16)), warmup, duration)
        else:
            raise ValueError(f"mode must be 'open' or 'closed', not {mode!r}")
        elapsed = time.perf_counter() - began
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for channel in channels:
            await channel.close()
    completed = len(rec.latencies_ms)
    lag = percentiles(rec.lags_ms)
    result: dict[str, Any] = {
        "mode": mode,
        "target": spec["target"],
        "call": spec["call"]["kind"],
        "duration_s": duration,
        "sent": sent,
        "completed": completed,
        "ok": rec.ok,
        "errors": dict(rec.errors),
        "error_samples": rec.error_samples,
        "throughput_rps": rec.ok / duration,
        "latency_ms": percentiles(rec.latencies_ms),
        "loadgen_cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
        "elapsed_s": elapsed,
    }
    if mode == "open":
        result["rate"] = float(spec["rate"])
        result["lag_ms"] = {k: lag[k] for k in ("p50", "p99", "max")} if lag else {}
        result["sustained"] = bool(
            sent and rec.ok >= MIN_SUSTAINED_SHARE * sent and not rec.errors
            and lag.get("p99", 0.0) <= MAX_SUSTAINED_LAG_MS
            # Every answer arrived within a second of the schedule's end: no backlog.
            and elapsed <= warmup + duration + 1.0
        )
    else:
        result["concurrency"] = int(spec.get("concurrency", 16))
    if spec.get("samples_file"):
        with open(spec["samples_file"], "w") as out:
            out.write("\n".join(rec.samples) + ("\n" if rec.samples else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.loadgen '<spec JSON>'", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    print(json.dumps(asyncio.run(run(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
