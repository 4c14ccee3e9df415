"""Tracing without a mesh: configuration, card-number redaction, the OTLP
receiver, `shopmesh traces`, the Envoy tracing config, and the apps' spans
end to end in one process (real servers, real OTLP export to the receiver).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Status, StatusCode

from shopmesh import cli, envoyconfig, otlp_receiver, telemetry, topology, traces
from shopmesh.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENVOY = Path(sys.executable).parent / "envoy"
VISA = "4242424242424242"
DECLINE = "4000000000000002"


# --- redaction ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4242424242424242", "[REDACTED]"),
        ("card 4242 4242 4242 4242 on file", "card [REDACTED] on file"),
        ("pan=4000-0000-0000-0002;", "pan=[REDACTED];"),
        ("amex 378282246310005 ok", "amex [REDACTED] ok"),  # 15 digits
        ("4242 4242 4242 4242 12", "[REDACTED] 12"),  # a number glued on after the card
        ("two: 4242424242424242 and 5555555555554444", "two: [REDACTED] and [REDACTED]"),
    ],
)
def test_card_numbers_are_redacted(text: str, expected: str) -> None:
    assert telemetry.redact_card_numbers(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424241",  # fails Luhn
        "424242424242",  # 12 digits: too short for a card
        "42424242424242424242",  # 20 digits in a row: not a card
        "5b8aa5a2d2c872e8321cf37308d69df2",  # a trace id
        "ord_0123456789abcdef01234567 tok_00000000000000000000000000000000",
        "1732186712000000000",  # a nanosecond timestamp (19 digits, fails Luhn)
    ],
)
def test_other_numbers_are_left_alone(text: str) -> None:
    assert telemetry.redact_card_numbers(text) == text


def test_the_span_processor_redacts_names_attributes_events_links_and_status() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(telemetry.CardNumberRedactor(SimpleSpanProcessor(exporter)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("link target") as target:
        link = Link(target.get_span_context(), {"note": f"card {VISA}"})
    with tracer.start_as_current_span(f"charge {VISA}", links=[link]) as span:
        span.set_attributes({"payments.card": VISA, "payments.cards": [VISA, "x"], "payments.pan_int": int(VISA), "ok": 7})
        span.add_event("declined", {"why": "card 4000 0000 0000 0002 declined"})
        span.set_status(Status(StatusCode.ERROR, f"bad card {VISA}"))
    provider.shutdown()
    exported = exporter.get_finished_spans()[-1]
    assert exported.name == "charge [REDACTED]"
    assert dict(exported.attributes or {}) == {
        "payments.card": "[REDACTED]",
        "payments.cards": ("[REDACTED]", "x"),
        "payments.pan_int": "[REDACTED]",
        "ok": 7,
    }
    assert exported.events[0].attributes == {"why": "card [REDACTED] declined"}
    assert exported.links[0].attributes == {"note": "card [REDACTED]"}
    assert exported.status.status_code == StatusCode.ERROR and exported.status.description == "bad card [REDACTED]"
    # The copy is the same span: ids and parentage survive.
    assert exported.context == span.get_span_context()
    assert VISA not in repr(exported.to_json())


# --- configuration --------------------------------------------------------------


def test_defaults_and_standard_variables() -> None:
    # Nothing configured: spans are made (trace ids in logs, context passed
    # on) but not exported anywhere.
    config = telemetry.tracing_config_from_env({})
    assert (config.enabled, config.exporter, config.sampler) == (True, "none", "parentbased_always_on")
    config = telemetry.tracing_config_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert (config.exporter, config.endpoint, config.insecure) == ("otlp", "http://localhost:4317", True)
    config = telemetry.tracing_config_from_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://10.89.1.1:8442",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector:4317/",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    })
    # The per-signal endpoint wins, as the specification says.
    assert config.exporter == "otlp"
    assert config.endpoint == "https://collector:4317" and not config.insecure
    assert (config.sampler, config.sampler_ratio) == ("parentbased_traceidratio", 0.25)
    assert telemetry.tracing_config_from_env({"OTEL_SDK_DISABLED": "true"}).enabled is False


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT='collector:4317' is not an OTLP/gRPC endpoint URL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector"}, "has no port"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:99999"}, "port is not a number"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=.*has no path"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes' is not a known sampler"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG='half' is not a number"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "outside 0..1"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED='yes' must be"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        telemetry.tracing_config_from_env(environ)


def test_an_app_with_a_bad_otel_variable_exits_with_status_2(tmp_path: Path) -> None:
    env = {"SHOPMESH_DATA_DIR": str(tmp_path), "SHOPMESH_APP_LISTEN": "127.0.0.1:1", "OTEL_TRACES_SAMPLER": "sometimes",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "services.search"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "OTEL_TRACES_SAMPLER='sometimes'" in proc.stderr


def test_log_lines_carry_the_trace_and_span_ids() -> None:
    provider = TracerProvider()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    log_filter = telemetry.TraceContextLogFilter()
    log_filter.filter(record)
    assert record.trace_context == ""  # type: ignore[attr-defined]
    with provider.get_tracer("t").start_as_current_span("s") as span:
        log_filter.filter(record)
    ids = span.get_span_context()
    assert record.trace_context == f" trace_id={ids.trace_id:032x} span_id={ids.span_id:016x}"  # type: ignore[attr-defined]


# --- the OTLP receiver and `shopmesh traces` -----------------------------------------------


def _export_request(*spans: trace_pb2.Span, service: str = "orders") -> trace_service_pb2.ExportTraceServiceRequest:
    resource = trace_pb2.ResourceSpans()
    resource.resource.attributes.add(key="service.name", value=common_pb2.AnyValue(string_value=service))
    resource.scope_spans.add().spans.extend(spans)
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[resource])


def _span(trace_id: str, span_id: str, parent: str, name: str, start_ms: int, end_ms: int, **attributes: Any) -> trace_pb2.Span:
    span = trace_pb2.Span(
        trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent) if parent else b"", name=name,
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000 + start_ms * 1_000_000,
        end_time_unix_nano=1_700_000_000_000_000_000 + end_ms * 1_000_000,
    )
    for key, value in attributes.items():
        span.attributes.add(key=key, value=common_pb2.AnyValue(string_value=str(value)))
    return span


def test_the_receiver_stores_spans_as_json_lines_and_redacts_them(tmp_path: Path) -> None:
    trace_id = "5b8aa5a2d2c872e8321cf37308d69df2"

    async def body() -> None:
        import grpc

        async with otlp_receiver.running_receiver(["127.0.0.1:0"], tmp_path) as ports:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                stub = trace_service_pb2_grpc.TraceServiceStub(channel)
                # Straight to the receiver, past any app-side redactor: as an Envoy could send it.
                root = _span(trace_id, "00000000000000a1", "", "inbound /shop", 0, 40, **{"http.url": f"/pay?card={VISA}"})
                child = _span(trace_id, "00000000000000a2", "00000000000000a1", "orders.charge", 5, 30)
                child.status.code = trace_pb2.Status.STATUS_CODE_ERROR
                child.status.message = "payment failed: card declined"
                await stub.Export(_export_request(root, child), timeout=5)

    asyncio.run(body())
    text = (tmp_path / "spans.jsonl").read_text()
    assert VISA not in text
    assert (tmp_path / "spans.jsonl").stat().st_mode & 0o777 == 0o600
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["name"] for r in rows] == ["inbound /shop", "orders.charge"]
    assert rows[0]["attributes"]["http.url"] == "/pay?card=[REDACTED]"
    assert rows[1] | {"attributes": None} == {
        "trace_id": trace_id, "span_id": "00000000000000a2", "parent_span_id": "00000000000000a1",
        "name": "orders.charge", "kind": "server", "service": "orders",
        "start_ns": 1_700_000_000_005_000_000, "end_ns": 1_700_000_000_030_000_000,
        "status": {"code": "ERROR", "message": "payment failed: card declined"},
        "attributes": None, "events": [], "scope": "",
    }


def test_the_receiver_accepts_the_sdk_exporter_and_rotates_its_file(tmp_path: Path) -> None:
    async def body() -> None:
        async with otlp_receiver.running_receiver(["127.0.0.1:0"], tmp_path, max_bytes=4096) as ports:
            exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{ports[0]}", insecure=True)
            provider = TracerProvider(resource=Resource.create({"service.name": "search"}))
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            tracer = provider.get_tracer("t")

            def emit() -> None:
                for i in range(40):
                    with tracer.start_as_current_span(f"search.query {i}", attributes={"search.term_count": i}):
                        pass
                provider.shutdown()

            await asyncio.to_thread(emit)

    asyncio.run(body())
    assert (tmp_path / "spans.jsonl.1").exists()
    spans = traces.load_spans(tmp_path)
    assert 0 < len(spans) <= 40 and all(s.service == "search" for s in spans)
    assert spans[-1].name == "search.query 39" and spans[-1].attributes["search.term_count"] == 39


def _write_spans(directory: Path, rows: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "spans.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write('{"trace_id": "half a line')  # being written right now: skipped


def _row(trace_id: str, span_id: str, parent: str | None, service: str, name: str, start: int, end: int,
         status: str = "UNSET", message: str = "") -> dict[str, Any]:
    base = 1_700_000_000_000_000_000
    return {"trace_id": trace_id, "span_id": span_id, "parent_span_id": parent, "name": name, "kind": "server",
            "service": service, "start_ns": base + start * 1_000_000, "end_ns": base + end * 1_000_000,
            "status": {"code": status, "message": message}, "attributes": {}, "events": [], "scope": ""}


A = "aaaaaaaa000000000000000000000001"
B = "aaaaaaaa000000000000000000000002"
C = "cccccccc000000000000000000000003"


def _sample(state_dir: Path) -> None:
    _write_spans(traces.traces_dir(state_dir), [
        _row(A, "01", None, "shopmesh-cli", "shopmesh demo", 0, 50),
        _row(A, "02", "01", "ingress", "ingress /shopmesh.orders.v1.Orders/PlaceOrder", 2, 48),
        _row(A, "03", "02", "orders", "/shopmesh.orders.v1.Orders/PlaceOrder", 4, 46),
        _row(A, "05", "03", "orders", "orders.charge", 20, 40, "ERROR", "payment failed:\n  card declined"),
        _row(A, "04", "03", "orders", "orders.price", 5, 15),
        _row(A, "07", "06", "payments", "payments.charge", 25, 35),  # its parent never arrived
        _row(B, "11", None, "ingress", "ingress /shopmesh.search.v1.Search/SearchProducts", 100, 103),
        _row(C, "21", None, "ingress", "ingress /x", 200, 201),
    ])


def test_traces_are_listed_newest_first_and_shown_as_a_tree(tmp_path: Path) -> None:
    _sample(tmp_path)
    spans = traces.load_spans(traces.traces_dir(tmp_path))
    summaries = traces.summarize(spans)
    assert [s.trace_id for s in summaries] == [C, B, A]
    demo = summaries[2]
    assert (demo.root.name, demo.span_count, demo.errors, demo.duration_ms) == ("shopmesh demo", 6, 1, 50.0)
    assert demo.services == ["ingress", "orders", "payments", "shopmesh-cli"]

    tree = traces.render_tree(traces.find_trace(spans, A)).splitlines()
    assert tree[0] == f"trace {A}: 6 spans, 4 services, 50.0 ms, started 2023-11-14 22:13:20 UTC"
    body = [line.rstrip() for line in tree[3:]]
    assert [line.split()[0] for line in body] == ["shopmesh-cli", "ingress", "orders", "orders", "orders", "payments"]
    assert "│  " not in body[0] and body[1].split("  ")[-3:] != []
    assert "└─ ingress /shopmesh.orders.v1.Orders/PlaceOrder" in body[1]
    # Children in start order, with the tree drawn; a multi-line status on one line.
    assert "   └─ /shopmesh.orders.v1.Orders/PlaceOrder" in body[2]
    assert "├─ orders.price" in body[3] and body[3].endswith("10.0 ms  ok")
    assert "└─ orders.charge" in body[4] and body[4].endswith("20.0 ms  ERROR payment failed: card declined")
    assert "payments.charge  (parent 06 not received)" in body[5]


def test_traces_lookup_by_prefix_and_clear_errors(tmp_path: Path) -> None:
    _sample(tmp_path)
    spans = traces.load_spans(traces.traces_dir(tmp_path))
    assert {s.trace_id for s in traces.find_trace(spans, "CCCCCCCC")} == {C}
    with pytest.raises(traces.TraceLookupError, match="matches 2 traces"):
        traces.find_trace(spans, "aaaaaaaa")
    with pytest.raises(traces.TraceLookupError, match="too short"):
        traces.find_trace(spans, "aaa")
    with pytest.raises(traces.TraceLookupError, match="no trace 'dddddddd'"):
        traces.find_trace(spans, "dddddddd")
    with pytest.raises(traces.TraceLookupError, match="not a trace id"):
        traces.find_trace(spans, "ord_123")


def test_shopmesh_traces_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["traces", "--state-dir", str(tmp_path)]) == 1
    assert "no spans under" in capsys.readouterr().err
    _sample(tmp_path)
    assert cli.main(["traces", "--limit", "2", "--state-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["TRACE", "ID", "STARTED", "(UTC)", "DURATION", "SPANS", "ERRORS", "ROOT", "SPAN", "SERVICES"]
    assert [line.split()[0] for line in listing[1:]] == [C, B]
    assert cli.main(["traces", A, "--json", "--state-dir", str(tmp_path)]) == 0
    spans = json.loads(capsys.readouterr().out)
    assert [s["span_id"] for s in spans] == ["01", "02", "03", "04", "05", "07"]
    assert spans[0]["duration_ms"] == 50.0
    assert cli.main(["traces", "dddddddd", "--state-dir", str(tmp_path)]) == 1
    assert "no trace 'dddddddd'" in capsys.readouterr().err


# --- Envoy --------------------------------------------------------------------------


def _pods() -> dict[str, envoyconfig.PodAddresses]:
    return {
        name: envoyconfig.PodAddresses(
            name=name, host=f"10.89.1.{10 + i}", inbound_bind=f"10.89.1.{10 + i}",
            inbound_port=topology.INBOUND_PORT, app_port=topology.APP_PORT,
            admin_port=topology.ADMIN_PORT, outbound_ports=dict(topology.OUTBOUND_PORTS),
        )
        for i, name in enumerate(topology.WORKLOADS)
    }


def _managers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        listener["name"]: listener["filter_chains"][0]["filters"][0]["typed_config"]
        for listener in config["static_resources"]["listeners"]
    }


@pytest.mark.parametrize("name", list(topology.WORKLOADS))
def test_every_connection_manager_traces_to_the_collector(tmp_path: Path, name: str) -> None:
    pods = _pods()
    text = envoyconfig.render(pods[name], pods, sds_socket=tmp_path / "a.sock", ttl_s=60, otlp_collector="10.89.1.1:8442")
    config = yaml.safe_load(text)
    managers = _managers(config)
    assert managers, name
    service = name if name == "ingress" else f"{name}-sidecar"
    for listener, manager in managers.items():
        tracing = manager["tracing"]
        assert tracing["spawn_upstream_span"] is True, listener
        assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
        assert tracing["provider"]["typed_config"]["service_name"] == service
        assert tracing["provider"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "otel-collector"
        direction = "ingress" if name == "ingress" else ("inbound" if listener == "inbound" else "outbound")
        assert tracing["operation"] == f"{direction} %REQ(:PATH)%"
    collector = next(c for c in config["static_resources"]["clusters"] if c["name"] == "otel-collector")
    assert collector["type"] == "STATIC"
    assert collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "10.89.1.1", "port_value": 8442,
    }
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_collector_by_dns_name_and_no_collector() -> None:
    pods = _pods()
    compose = yaml.safe_load(envoyconfig.render(pods["orders"], pods, sds_socket=Path("/a.sock"), ttl_s=60, otlp_collector="jaeger:4317"))
    collector = next(c for c in compose["static_resources"]["clusters"] if c["name"] == "otel-collector")
    assert collector["type"] == "STRICT_DNS"
    plain = yaml.safe_load(envoyconfig.render(pods["orders"], pods, sds_socket=Path("/a.sock"), ttl_s=60))
    assert all("tracing" not in m for m in _managers(plain).values())
    assert "otel-collector" not in {c["name"] for c in plain["static_resources"]["clusters"]}
    with pytest.raises(ConfigError, match="OTLP collector address='jaeger' is not an address"):
        envoyconfig.render(pods["orders"], pods, sds_socket=Path("/a.sock"), ttl_s=60, otlp_collector="jaeger")


# --- the apps' spans, in one process ------------------------------------------------------

# Runs in a fresh interpreter: the global TracerProvider can be set once per
# process, and the other service tests must keep running without one.
APP_TRACE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path

    import grpc
    sys.path.insert(0, {tests!r})
    from _services import orders_service, payments_service, search_service
    from services.orders.server import Upstreams
    from shopmesh import otlp_receiver, telemetry
    from shopmesh.logs import setup_logging
    from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
    from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc

    async def main(tmp: Path) -> None:
        async with otlp_receiver.running_receiver(["127.0.0.1:0"], tmp / "traces") as ports:
            os.environ.update(telemetry.app_environment("shop", f"127.0.0.1:{{ports[0]}}"))
            setup_logging("shop")
            tracing = telemetry.setup_tracing("shop")
            tracer = telemetry.tracer("test-client")
            async with (
                search_service(tmp / "search") as (search, _),
                payments_service(tmp / "payments") as (payments, _),
                orders_service(tmp / "orders", Upstreams(search, payments)) as (orders, _),
                grpc.aio.insecure_channel(orders, interceptors=telemetry.client_interceptors()) as oc,
                grpc.aio.insecure_channel(payments) as pc,
            ):
                results = {{}}
                for label, number in (("paid", {visa!r}), ("declined", {decline!r})):
                    token = (await payments_pb2_grpc.PaymentsStub(pc).Tokenize(payments_pb2.TokenizeRequest(
                        card_number=number, exp_month=12, exp_year=2031, cvv="123"))).token
                    with tracer.start_as_current_span("client " + label) as root:
                        order = await orders_pb2_grpc.OrdersStub(oc).PlaceOrder(orders_pb2.PlaceOrderRequest(
                            items=[orders_pb2.LineItem(product_id="sku-0001", quantity=2)],
                            payment_token=token, idempotency_key=label))
                    results[label] = {{"trace_id": format(root.get_span_context().trace_id, "032x"),
                                      "order_id": order.order_id, "state": order.state}}
            # The receiver runs on this event loop: flush from another thread.
            await asyncio.to_thread(tracing.shutdown)
        print(json.dumps(results))

    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_one_order_is_one_trace_across_the_apps(tmp_path: Path) -> None:
    script = APP_TRACE_SCRIPT.format(tests=str(ROOT / "tests"), visa=VISA, decline=DECLINE)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    spans = traces.load_spans(tmp_path / "traces")
    everything = (tmp_path / "traces" / "spans.jsonl").read_text()
    assert VISA not in everything and DECLINE not in everything

    for label, expected_state in (("paid", "PAID"), ("declined", "PAYMENT_FAILED")):
        trace_id = results[label]["trace_id"]
        members = traces.find_trace(spans, trace_id)
        by_name = {s.name: s for s in members}
        # One trace: the client's root, orders' server span under its client
        # span, search and payments under orders' client spans.
        assert set(by_name) >= {
            f"client {label}", "/shopmesh.orders.v1.Orders/PlaceOrder", "orders.price", "orders.persist",
            "orders.charge", "orders.settle", "/shopmesh.search.v1.Search/GetProducts", "search.lookup",
            "/shopmesh.payments.v1.Payments/Charge",
        }, sorted(by_name)
        assert traces.roots(members) == [by_name[f"client {label}"]]

        def parent_of(name: str, kind: str | None = None) -> str:
            span = next(s for s in members if s.name == name and (kind is None or s.kind == kind))
            parent = next(s for s in members if s.span_id == span.parent_span_id)
            return f"{parent.name}/{parent.kind}"

        assert parent_of("/shopmesh.orders.v1.Orders/PlaceOrder", "server") == "/shopmesh.orders.v1.Orders/PlaceOrder/client"
        assert parent_of("/shopmesh.orders.v1.Orders/PlaceOrder", "client") == f"client {label}/internal"
        assert parent_of("/shopmesh.search.v1.Search/GetProducts", "client") == "orders.price/internal"
        assert parent_of("/shopmesh.search.v1.Search/GetProducts", "server") == "/shopmesh.search.v1.Search/GetProducts/client"
        assert parent_of("/shopmesh.payments.v1.Payments/Charge", "client") == "orders.charge/internal"
        assert parent_of("/shopmesh.payments.v1.Payments/Charge", "server") == "/shopmesh.payments.v1.Payments/Charge/client"
        assert parent_of("orders.settle") == "orders.charge/internal"

        server = next(s for s in members if s.name == "/shopmesh.orders.v1.Orders/PlaceOrder" and s.kind == "server")
        assert server.attributes["orders.item_count"] == 1
        assert server.attributes["orders.order_id"] == results[label]["order_id"]
        charge = by_name["orders.charge"]
        assert charge.attributes["orders.state"] == expected_state
        assert by_name["orders.settle"].attributes["orders.state"] == expected_state
        if label == "declined":
            assert charge.is_error and charge.status_message == "payment failed: card declined: card_declined"
        else:
            assert not charge.is_error
    # Every log line written while serving the declined order names its trace.
    declined = results["declined"]
    assert any(
        f"order {declined['order_id']} PAYMENT_FAILED" in line and f"trace_id={declined['trace_id']}" in line
        for line in proc.stderr.splitlines()
    ), proc.stderr


def test_the_otlp_protos_are_opentelemetry_protos_not_the_older_copy_in_xds_protos() -> None:
    """xds-protos ships an older opentelemetry/proto tree over the same files;
    `make setup` reinstalls opentelemetry-proto last so OTLP export works."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope"), "run `make setup` (opentelemetry-proto must be installed last)"
