"""Read the spans the local OTLP receiver stored, and show traces in a terminal.

    shopmesh traces                 recent traces: id, start, duration, spans, root span, services
    shopmesh traces TRACE_ID        one trace as a tree: service, span, duration, status

A trace id may be given by a unique prefix (at least 8 hex digits). The
receiver (shopmesh.otlp_receiver) writes <state-dir>/traces/spans.jsonl; the
functions here are what `shopmesh traces` and the mesh tests use to read it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shopmesh.otlp_receiver import SPANS_FILE

TRACES_DIR = "traces"
DEFAULT_LIMIT = 20
MIN_PREFIX_CHARS = 8
_HEX = re.compile(r"[0-9a-f]+")


class TraceLookupError(Exception):
    """No trace (or more than one) matches what was asked for; the message says which."""


@dataclass(frozen=True)
class SpanRecord:
    """One span as the receiver stored it."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    status_code: str  # UNSET, OK or ERROR
    status_message: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    scope: str = ""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "SpanRecord":
        status = raw.get("status") or {}
        return cls(
            trace_id=str(raw["trace_id"]),
            span_id=str(raw["span_id"]),
            parent_span_id=raw.get("parent_span_id") or None,
            name=str(raw.get("name", "")),
            kind=str(raw.get("kind", "")),
            service=str(raw.get("service", "")),
            start_ns=int(raw.get("start_ns", 0)),
            end_ns=int(raw.get("end_ns", 0)),
            status_code=str(status.get("code", "UNSET")),
            status_message=str(status.get("message", "")),
            attributes=dict(raw.get("attributes") or {}),
            events=list(raw.get("events") or []),
            scope=str(raw.get("scope", "")),
        )

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    @property
    def is_error(self) -> bool:
        return self.status_code == "ERROR"

    @property
    def from_envoy(self) -> bool:
        # Envoy's OpenTelemetry tracer tags every span it makes with component=proxy.
        return self.attributes.get("component") == "proxy"

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ms, 3),
            "status": {"code": self.status_code, "message": self.status_message},
            "attributes": self.attributes,
            "events": self.events,
            "scope": self.scope,
        }


def traces_dir(state_dir: Path) -> Path:
    return state_dir / TRACES_DIR


def load_spans(directory: Path) -> list[SpanRecord]:
    """Every span stored under `directory` (the rotated file first), in file order.

    A line that is not a complete span (the receiver writing it right now, or
    a damaged file) is skipped, not fatal: the rest is still worth showing.
    """
    spans = []
    for path in (directory / f"{SPANS_FILE}.1", directory / SPANS_FILE):
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                spans.append(SpanRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    return spans


def by_trace(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return dict(traces)


def roots(spans: list[SpanRecord]) -> list[SpanRecord]:
    """Spans without a parent in `spans` (the real root, and orphans whose parent
    never arrived), earliest first."""
    ids = {s.span_id for s in spans}
    return sorted((s for s in spans if s.parent_span_id not in ids), key=lambda s: s.start_ns)


def children(spans: list[SpanRecord]) -> dict[str, list[SpanRecord]]:
    out: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.parent_span_id:
            out[span.parent_span_id].append(span)
    return out


@dataclass(frozen=True)
class TraceSummary:
    trace_id: str
    root: SpanRecord
    span_count: int
    start_ns: int
    end_ns: int
    services: list[str]
    errors: int

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "root": {"service": self.root.service, "name": self.root.name},
            "span_count": self.span_count,
            "start_ns": self.start_ns,
            "duration_ms": round(self.duration_ms, 3),
            "services": self.services,
            "errors": self.errors,
        }


def summarize(spans: Iterable[SpanRecord]) -> list[TraceSummary]:
    """One summary per trace, the most recent first."""
    out = []
    for trace_id, members in by_trace(spans).items():
        out.append(
            TraceSummary(
                trace_id=trace_id,
                root=roots(members)[0],
                span_count=len(members),
                start_ns=min(s.start_ns for s in members),
                end_ns=max(s.end_ns for s in members),
                services=sorted({s.service for s in members}),
                errors=sum(1 for s in members if s.is_error),
            )
        )
    return sorted(out, key=lambda t: t.start_ns, reverse=True)


def find_trace(spans: Iterable[SpanRecord], trace_id: str) -> list[SpanRecord]:
    """The spans of the trace whose id is `trace_id` or starts with it."""
    wanted = trace_id.strip().lower()
    if not _HEX.fullmatch(wanted) or len(wanted) > 32:
        raise TraceLookupError(f"'{trace_id}' is not a trace id (32 hex digits, or a prefix of at least {MIN_PREFIX_CHARS})")
    traces = by_trace(spans)
    if wanted in traces:
        return traces[wanted]
    if len(wanted) < MIN_PREFIX_CHARS:
        raise TraceLookupError(f"'{trace_id}' is too short to look up; give at least {MIN_PREFIX_CHARS} hex digits")
    matches = [t for t in traces if t.startswith(wanted)]
    if not matches:
        raise TraceLookupError(f"no trace '{trace_id}' among the {len(traces)} stored; `shopmesh traces` lists them")
    if len(matches) > 1:
        shown = ", ".join(sorted(matches)[:3]) + (", …" if len(matches) > 3 else "")
        raise TraceLookupError(f"'{trace_id}' matches {len(matches)} traces ({shown}); give more digits")
    return traces[matches[0]]


# --- rendering ---------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _utc(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


MAX_STATUS_CHARS = 100


def _status(span: SpanRecord) -> str:
    """The status column: "ok", or "ERROR" and why, on one line. Envoy marks a failed call with
    ERROR but no message; its gRPC status code says what happened."""
    if not span.is_error:
        return "ok"
    why = " ".join(span.status_message.split())
    if not why and "grpc.status_code" in span.attributes:
        why = f"grpc-status {span.attributes['grpc.status_code']}"
    if len(why) > MAX_STATUS_CHARS:
        why = why[: MAX_STATUS_CHARS - 1] + "…"
    return f"ERROR {why}".rstrip()


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_list(summaries: list[TraceSummary]) -> str:
    if not summaries:
        return "no traces yet"
    header = ("TRACE ID", "STARTED (UTC)", "DURATION", "SPANS", "ERRORS", "ROOT SPAN", "SERVICES")
    rows = [
        (
            t.trace_id,
            _utc(t.start_ns),
            _ms(t.duration_ms),
            str(t.span_count),
            str(t.errors),
            f"{t.root.service}: {t.root.name}",
            ", ".join(t.services),
        )
        for t in summaries
    ]
    return _table(header, rows, right={2, 3, 4})


def render_tree(spans: list[SpanRecord]) -> str:
    """The trace as an indented tree: service, span name, duration, status."""
    kids = children(spans)
    rows: list[tuple[str, ...]] = []
    ids = {s.span_id for s in spans}

    def walk(span: SpanRecord, prefix: str, branch: str) -> None:
        name = span.name
        if span.parent_span_id and span.parent_span_id not in ids:
            name += f"  (parent {span.parent_span_id} not received)"
        rows.append((span.service, f"{prefix}{branch}{name}", _ms(span.duration_ms), _status(span)))
        below = kids.get(span.span_id, [])
        child_prefix = prefix + ("" if not branch else ("   " if branch == "└─ " else "│  "))
        for index, child in enumerate(below):
            walk(child, child_prefix, "└─ " if index == len(below) - 1 else "├─ ")

    for root in roots(spans):
        walk(root, "", "")
    summary = summarize(spans)[0]
    head = (
        f"trace {summary.trace_id}: {summary.span_count} spans, {len(summary.services)} services, "
        f"{_ms(summary.duration_ms)}, started {_utc(summary.start_ns)} UTC"
    )
    return head + "\n\n" + _table(("SERVICE", "SPAN", "DURATION", "STATUS"), rows, right={2})


# --- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace_id", nargs="?", help="show this trace as a tree (a unique prefix of 8+ hex digits will do)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="how many recent traces to list (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="the summaries, or the trace's spans, as JSON")


def run(state_dir: Path, args: argparse.Namespace) -> int:
    """`shopmesh traces [TRACE_ID]`: print, and return the exit status."""
    directory = traces_dir(state_dir)
    if not directory.is_dir():
        print(f"shopmesh traces: no spans under {directory}; start the mesh with `shopmesh up` and send it a request", file=sys.stderr)
        return 1
    if args.limit < 1:
        print(f"shopmesh traces: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    spans = load_spans(directory)
    if args.trace_id is None:
        summaries = summarize(spans)[: args.limit]
        if args.json:
            print(json.dumps([t.to_json() for t in summaries], indent=2))
        else:
            print(render_list(summaries))
        return 0
    try:
        members = find_trace(spans, args.trace_id)
    except TraceLookupError as exc:
        print(f"shopmesh traces: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([s.to_json() for s in sorted(members, key=lambda s: s.start_ns)], indent=2))
    else:
        print(render_tree(members))
    return 0
