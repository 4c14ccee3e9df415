"""OpenTelemetry for the apps: tracing configured by the standard OTEL_* variables.

    tracing = setup_tracing("orders")      # once per process, before any server or channel
    ...
    tracing.shutdown()                      # flushes the spans still queued

What an app gets:
- a TracerProvider whose resource carries $OTEL_SERVICE_NAME (default: the
  name passed in) and $OTEL_RESOURCE_ATTRIBUTES, sampled by
  $OTEL_TRACES_SAMPLER / $OTEL_TRACES_SAMPLER_ARG and exported by
  $OTEL_TRACES_EXPORTER (`otlp` to $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
  $OTEL_EXPORTER_OTLP_ENDPOINT over gRPC; `console`; `none`).
  $OTEL_SDK_DISABLED=true turns it all off. Unlike the SDK's own default, an
  app given no exporter and no endpoint exports nothing: an app run alone
  should not log a failed export to localhost:4317 every few seconds.
- every span passes through CardNumberRedactor before export: anything that
  looks like a card number (13 to 19 digits, optionally grouped with spaces or
  dashes, Luhn-valid) in a span name, attribute, event, link or status is
  replaced. Payments never puts a card number in a span; this is the second
  line of defence for the day someone does by mistake.
- gRPC server and client interceptors (opentelemetry-instrumentation-grpc)
  that extract and inject W3C trace context, so an app's spans join the
  trace its sidecar started and its upstream calls continue it. They are
  installed whether or not tracing is configured: without an SDK they still
  carry the incoming context through to the outgoing calls.
- TraceContextLogFilter, which appends the current trace and span ids to
  every log line written inside a span.

Also here: app_environment(), the OTEL_* variables the local runner gives each
app, and client_trace(), a root span for a command-line client such as
`shopmesh demo`.

Bad values stop the app at start-up with a ConfigError naming the variable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import health_check, negate
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Status

from shopmesh.config import ConfigError

SDK_DISABLED_ENV = "OTEL_SDK_DISABLED"
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
SAMPLER_ENV = "OTEL_TRACES_SAMPLER"
SAMPLER_ARG_ENV = "OTEL_TRACES_SAMPLER_ARG"

EXPORTERS = ("otlp", "console", "none")
DEFAULT_SAMPLER = "parentbased_always_on"
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
SAMPLERS = ("always_on", "always_off", "parentbased_always_on", "parentbased_always_off", *RATIO_SAMPLERS)
# What OTLP/gRPC exporters use when no endpoint is given (the spec's default).
DEFAULT_OTLP_ENDPOINT = "http://localhost:4317"

REDACTED = "[REDACTED]"

log = logging.getLogger(__name__)


# --- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class TracingConfig:
    """The OTEL_* settings this module honours, validated."""

    enabled: bool
    exporter: str  # one of EXPORTERS
    endpoint: str  # http(s)://host:port, for the otlp exporter
    sampler: str  # one of SAMPLERS
    sampler_ratio: float  # for the ratio samplers

    @property
    def insecure(self) -> bool:
        # The OTLP convention: an http:// endpoint means no TLS.
        return self.endpoint.startswith("http://")


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _check_endpoint(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={value!r} is not an OTLP/gRPC endpoint URL such as http://127.0.0.1:4317")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name}={value!r}: the port is not a number in 1..65535") from None
    if port is None:
        raise ConfigError(f"{name}={value!r} has no port (OTLP/gRPC listens on 4317 by convention)")
    if parts.path not in ("", "/"):
        # A path is an OTLP/HTTP habit (/v1/traces); gRPC would ignore it, so
        # an endpoint with one was almost certainly meant for another exporter.
        raise ConfigError(f"{name}={value!r}: an OTLP/gRPC endpoint has no path (drop {parts.path!r})")
    return value.rstrip("/")


def tracing_config_from_env(environ: Mapping[str, str] | None = None) -> TracingConfig:
    """Read and validate the OTEL_* variables (the process environment by default)."""
    env = os.environ if environ is None else environ
    disabled = _env(env, SDK_DISABLED_ENV).lower()
    if disabled not in ("", "true", "false"):
        raise ConfigError(f"{SDK_DISABLED_ENV}={disabled!r} must be 'true' or 'false'")
    endpoint_name = TRACES_ENDPOINT_ENV if _env(env, TRACES_ENDPOINT_ENV) else ENDPOINT_ENV
    endpoint = _env(env, endpoint_name)
    exporter = _env(env, EXPORTER_ENV).lower() or ("otlp" if endpoint else "none")
    if exporter not in EXPORTERS:
        raise ConfigError(f"{EXPORTER_ENV}={exporter!r} is not supported here; use one of {', '.join(EXPORTERS)}")
    endpoint = _check_endpoint(endpoint_name, endpoint) if endpoint else DEFAULT_OTLP_ENDPOINT
    sampler = _env(env, SAMPLER_ENV).lower() or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        raise ConfigError(f"{SAMPLER_ENV}={sampler!r} is not a known sampler; use one of {', '.join(SAMPLERS)}")
    ratio = 1.0
    ratio_text = _env(env, SAMPLER_ARG_ENV)
    if sampler in RATIO_SAMPLERS and ratio_text:
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise ConfigError(f"{SAMPLER_ARG_ENV}={ratio_text!r} is not a number; give a ratio in 0..1") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"{SAMPLER_ARG_ENV}={ratio_text!r} is outside 0..1")
    return TracingConfig(
        enabled=disabled != "true",
        exporter=exporter,
        endpoint=endpoint,
        sampler=sampler,
        sampler_ratio=ratio,
    )


def _sampler(config: TracingConfig) -> sampling.Sampler:
    fixed: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
    }
    if config.sampler == "traceidratio":
        return sampling.TraceIdRatioBased(config.sampler_ratio)
    if config.sampler == "parentbased_traceidratio":
        return sampling.ParentBased(sampling.TraceIdRatioBased(config.sampler_ratio))
    return fixed[config.sampler]


def _exporter(config: TracingConfig) -> SpanExporter | None:
    if config.exporter == "none":
        return None
    if config.exporter == "console":
        return ConsoleSpanExporter()
    # Imported here: it pulls in the OTLP protos, which only this path needs.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint, insecure=config.insecure)


def _resource(default_service_name: str) -> Resource:
    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
    # the app's own name is only the fallback, so the environment wins.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    return resource


@dataclass
class Tracing:
    """What setup_tracing installed; shutdown() flushes and stops the export."""

    config: TracingConfig
    provider: TracerProvider | None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing:
    """Install the global TracerProvider for this process from the OTEL_* variables.

    Call once, before servers and channels are created. Raises ConfigError for
    a bad value.
    """
    config = tracing_config_from_env(environ)
    if not config.enabled:
        log.info("tracing disabled (%s=true)", SDK_DISABLED_ENV)
        return Tracing(config, None)
    provider = TracerProvider(resource=_resource(service_name), sampler=_sampler(config))
    exporter = _exporter(config)
    if exporter is not None:
        provider.add_span_processor(CardNumberRedactor(BatchSpanProcessor(exporter)))
    trace.set_tracer_provider(provider)
    log.info(
        "tracing as %r: exporter %s%s, sampler %s",
        provider.resource.attributes.get(SERVICE_NAME),
        config.exporter,
        f" to {config.endpoint}" if config.exporter == "otlp" else "",
        config.sampler,
    )
    return Tracing(config, provider)


# --- gRPC instrumentation ----------------------------------------------------------


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for grpc.aio.server(): a SERVER span per call, parented by
    the caller's traceparent. Health checks are left out: the agent polls them
    every second and they would bury the traces people look for."""
    return [aio_server_interceptor(filter_=negate(health_check()))]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for grpc.aio channels: a CLIENT span per call and the W3C
    traceparent/tracestate headers on the request."""
    return list(aio_client_interceptors(filter_=negate(health_check())))


def tracer(name: str) -> trace.Tracer:
    """The tracer for an app's manual spans (e.g. tracer(__name__))."""
    return trace.get_tracer(name)


# --- logs ------------------------------------------------------------------------


class TraceContextLogFilter(logging.Filter):
    """Sets `record.trace_context` to " trace_id=… span_id=…" inside a span, else "".

    Attached to a handler, it applies to every record the handler writes, so
    a log line can be matched with its trace (`shopmesh traces TRACE_ID`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_context = f" trace_id={trace.format_trace_id(context.trace_id)} span_id={trace.format_span_id(context.span_id)}"
        else:
            record.trace_context = ""
        return True


# --- card number redaction ------------------------------------------------------------

MIN_CARD_DIGITS = 13
MAX_CARD_DIGITS = 19
# Runs of digit groups separated by single spaces or dashes, not glued to
# further digits. Candidates inside a run are checked group-aligned below, so
# a card number followed by other numbers ("4242 4242 4242 4242 12") is still
# found.
_DIGIT_RUN = re.compile(r"(?<!\d)\d+(?:[ \-]\d+)*(?!\d)")
_GROUP = re.compile(r"\d+")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each card-number-looking stretch of `text`."""
    for run in _DIGIT_RUN.finditer(text):
        groups = [(g.start() + run.start(), g.end() + run.start(), g.group()) for g in _GROUP.finditer(run.group())]
        for first in range(len(groups)):
            digits = ""
            for last in range(first, len(groups)):
                digits += groups[last][2]
                if len(digits) > MAX_CARD_DIGITS:
                    break
                if len(digits) >= MIN_CARD_DIGITS and _luhn_valid(digits):
                    yield groups[first][0], groups[last][1]


def redact_card_numbers(text: str) -> str:
    """`text` with every card-number-looking stretch replaced by [REDACTED]."""
    if len(text) < MIN_CARD_DIGITS:
        return text
    spans = sorted(_card_spans(text))
    if not spans:
        return text
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, position = [], 0
    for start, end in merged:
        out.append(text[position:start])
        out.append(REDACTED)
        position = end
    out.append(text[position:])
    return "".join(out)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_card_numbers(value)
    if isinstance(value, (list, tuple)):
        return tuple(_redact_value(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool) and MIN_CARD_DIGITS <= len(str(abs(value))) <= MAX_CARD_DIGITS:
        # An integer attribute can hold a card number just as well as a string.
        return REDACTED if redact_card_numbers(str(abs(value))) != str(abs(value)) else value
    return value


def redact_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {redact_card_numbers(k): _redact_value(v) for k, v in (attributes or {}).items()}


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of a finished span with card numbers removed from every text it carries."""
    status = span.status
    if status.description:
        status = Status(status.status_code, redact_card_numbers(status.description))
    return ReadableSpan(
        name=redact_card_numbers(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=redact_attributes(span.attributes),
        events=[
            Event(redact_card_numbers(e.name), redact_attributes(e.attributes), e.timestamp) for e in span.events
        ],
        links=[Link(link.context, redact_attributes(link.attributes)) for link in span.links],
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class CardNumberRedactor(SpanProcessor):
    """Wraps the exporting processor and hands it redacted copies of finished spans."""

    def __init__(self, export: SpanProcessor) -> None:
        self._export = export

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._export.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self._export.on_end(redact_span(span))

    def shutdown(self) -> None:
        self._export.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._export.force_flush(timeout_millis)


# --- the process contract -------------------------------------------------------------


def app_environment(service_name: str, collector: str) -> dict[str, str]:
    """The OTEL_* variables the local runner gives an app whose spans go to `collector` ("host:port")."""
    return {
        SERVICE_NAME_ENV: service_name,
        EXPORTER_ENV: "otlp",
        ENDPOINT_ENV: f"http://{collector}",
        SAMPLER_ENV: DEFAULT_SAMPLER,
        # Export every half second instead of every five, so a trace is
        # complete in `shopmesh traces` right after the request.
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }


# --- command-line clients ----------------------------------------------------------------


class ClientTrace:
    """The root span of a command-line client's work (see client_trace)."""

    def __init__(self, provider: TracerProvider, span: trace.Span) -> None:
        self._provider = provider
        self.span = span

    @property
    def trace_id(self) -> str:
        return trace.format_trace_id(self.span.get_span_context().trace_id)

    def channel(self, channel: grpc.Channel) -> grpc.Channel:
        """`channel` with a CLIENT span per call under the root span, and the
        W3C traceparent on every request, so the mesh continues this trace."""
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        return intercept_channel(channel, client_interceptor(tracer_provider=self._provider))  # type: ignore[no-any-return]


@contextlib.contextmanager
def client_trace(name: str, collector: str | None, service_name: str = "shopmesh-cli") -> Iterator[ClientTrace]:
    """A root span named `name` for a client such as `shopmesh demo`, exported
    to `collector` ("host:port"; None: ids only, nothing exported) and flushed
    when the block ends, so the trace is complete once the command returns.

    The provider is this block's own, not the global one: a CLI command is not
    an app, and nothing else in the process should start tracing because of it.
    """
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}), sampler=sampling.ALWAYS_ON)
    if collector:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(CardNumberRedactor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://{collector}", insecure=True))))
    try:
        with provider.get_tracer("shopmesh.cli").start_as_current_span(name) as span:
            yield ClientTrace(provider, span)
    finally:
        provider.shutdown()
