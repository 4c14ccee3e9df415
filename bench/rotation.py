"""Benchmarks 2 and 3b: rotation under load, and issuance-to-serving propagation.

One real mesh (`shopmesh up` through shopmesh.testing.start_mesh) with a
10-second SVID TTL, so every workload renews about every 5 seconds. While
bench.loadgen places orders through the ingress at a steady open-loop rate
(every order crosses all four sidecars: ingress, orders, search, payments),
one bench.certwatch per pod polls its Envoy's admin /certs (inside the pod's
network namespace) and notes when each new serial is served.

- Rotations: the renewals the CA recorded in its ledger (<state>/ca/ca.db,
  `issued_svids`, method 'renew') during the traffic, for the four
  workloads, that Envoy went on to serve.
- Propagation: for each of them, Envoy serving the serial (first poll that
  shows it) minus the ledger's issued_at (written right after signing). The
  poll interval is the resolution, and the figure is an upper bound.
- Rotation windows: from a renewal's signature until half a second after
  Envoy served it. A call overlapping any window is "inside"; latency p99
  inside versus outside, and failed calls in each.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.loadgen import percentiles
from bench.procs import Process, python_module, run_loadgen, start, wait_for
from shopmesh import topology
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.testing import TEST_CARD, Mesh, start_mesh, stop_mesh

WINDOW_AFTER_SERVED_S = 0.5
POLL_INTERVAL_S = 0.02

Log = Callable[[str], None]


def tokenize_test_card(ingress: str) -> str:
    with grpc.insecure_channel(ingress) as channel:
        reply = payments_pb2_grpc.PaymentsStub(channel).Tokenize(
            payments_pb2.TokenizeRequest(card_number=TEST_CARD, exp_month=12, exp_year=time.gmtime().tm_year + 3, cvv="123"),
            timeout=10,
        )
    return str(reply.token)


def _start_watchers(mesh: Mesh, work_dir: Path, duration_s: float) -> dict[str, tuple[Process, Path]]:
    record = mesh.record
    watchers = {}
    for name, pod in record.pods.items():
        out = work_dir / f"certwatch-{name}.txt"
        out.write_text("")
        argv = [*record.exec_prefix(name), *python_module(
            "bench.certwatch", "--admin", f"127.0.0.1:{pod.admin_port}", "--spiffe-id", pod.spiffe_id,
            "--out", str(out), "--interval", str(POLL_INTERVAL_S), "--duration", str(duration_s + 60),
        )]
        watchers[name] = (start(argv, work_dir / f"certwatch-{name}.log"), out)
    return watchers


def _ledger(state_dir: Path, since: float, until: float) -> list[tuple[str, str, float]]:
    """(serial, spiffe_id, issued_at) of workload renewals the CA signed in [since, until]."""
    workload_ids = [topology.spiffe_id_for(name) for name in topology.WORKLOADS]
    marks = ",".join("?" * len(workload_ids))
    with sqlite3.connect(state_dir / "ca" / "ca.db", timeout=10) as conn:
        rows = conn.execute(
            f"SELECT serial, spiffe_id, issued_at FROM issued_svids WHERE method = 'renew' AND spiffe_id IN ({marks}) "
            "AND issued_at BETWEEN ? AND ? ORDER BY issued_at", (*workload_ids, since, until),
        ).fetchall()
    return [(str(s).lower(), str(i), float(t)) for s, i, t in rows]


def _served(watch_file: Path) -> dict[str, float]:
    """serial → when the watcher first saw Envoy serve it."""
    seen: dict[str, float] = {}
    for line in watch_file.read_text().splitlines():
        at, _, serial = line.partition(" ")
        seen.setdefault(serial.lower(), float(at))
    return seen


def run(work_dir: Path, *, duration_s: float = 60.0, rate: float = 20.0, ttl: str = "10s", log: Log = print) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"  starting a mesh with a {ttl} TTL")
    mesh = start_mesh(work_dir / "mesh", ttl)
    state_dir = mesh.state_dir
    watchers: dict[str, tuple[Process, Path]] = {}
    id_to_name = {topology.spiffe_id_for(name): name for name in topology.WORKLOADS}
    try:
        token = tokenize_test_card(mesh.ingress)
        watchers = _start_watchers(mesh, work_dir, duration_s)
        wait_for(lambda: all(out.read_text() for _, out in watchers.values()), "every watcher's first poll",
                 timeout=30, logs=tuple(p.log_path for p, _ in watchers.values()))
        samples = work_dir / "rotation-samples.txt"
        began = time.time()
        log(f"  placing orders at {rate:g}/s for {duration_s:g} s")
        traffic = run_loadgen({
            "target": mesh.ingress, "call": {"kind": "place_order", "token": token}, "mode": "open", "rate": rate,
            "duration_s": duration_s, "warmup_s": 0.0, "timeout_s": 10.0, "samples_file": str(samples),
        }, timeout=duration_s + 120)
        ended = time.time()
        ledger = _ledger(state_dir, began, ended)

        def all_served() -> bool:
            served = {name: _served(out) for name, (_, out) in watchers.items()}
            return all(serial in served[id_to_name[spiffe_id]] for serial, spiffe_id, _ in ledger)

        # A renewal signed just before the end gets its chance to be served;
        # one that never is counts as not served.
        with contextlib.suppress(AssertionError):
            wait_for(all_served, "Envoy to serve the last renewals", timeout=5)
    finally:
        for process, _ in watchers.values():
            process.stop()
        stop_mesh(mesh)
    served = {name: _served(out) for name, (_, out) in watchers.items()}
    rotations: list[dict[str, Any]] = []
    unserved = 0
    for serial, spiffe_id, issued_at in ledger:
        name = id_to_name[spiffe_id]
        seen = served[name].get(serial)
        if seen is None:
            unserved += 1
            continue
        rotations.append({"workload": name, "serial": serial, "issued_at": issued_at, "served_at": seen,
                          "propagation_ms": max(0.0, (seen - issued_at) * 1000)})
    return summarize(rotations, unserved, samples, traffic, duration_s=duration_s, rate=rate, ttl=ttl)


def summarize(rotations: list[dict[str, Any]], unserved: int, samples: Path, traffic: dict[str, Any], *,
              duration_s: float, rate: float, ttl: str) -> dict[str, Any]:
    windows = sorted((r["issued_at"], r["served_at"] + WINDOW_AFTER_SERVED_S) for r in rotations)
    inside: list[float] = []
    outside: list[float] = []
    failed = {"inside": 0, "outside": 0}
    for line in samples.read_text().splitlines():
        start_s, latency_s, status = line.split()
        start, latency = float(start_s), float(latency_s)
        end = start + latency / 1000
        hit = any(w0 <= end and start <= w1 for w0, w1 in windows)
        (inside if hit else outside).append(latency)
        if status != "OK":
            failed["inside" if hit else "outside"] += 1
    propagation = percentiles([r["propagation_ms"] for r in rotations])
    per_workload: dict[str, int] = {}
    for r in rotations:
        per_workload[r["workload"]] = per_workload.get(r["workload"], 0) + 1
    return {
        "ttl": ttl,
        "duration_s": duration_s,
        "rate_rps": rate,
        "traffic": "PlaceOrder through the ingress (ingress → orders → search and payments), open loop",
        "calls": traffic["completed"],
        "ok": traffic["ok"],
        "failed_rpcs": sum(traffic["errors"].values()),
        "errors": traffic["errors"],
        "error_samples": traffic["error_samples"],
        "rotations": len(rotations),
        "rotations_per_workload": per_workload,
        "renewals_not_seen_served": unserved,
        "p99_inside_ms": percentiles(inside).get("p99", float("nan")),
        "p99_outside_ms": percentiles(outside).get("p99", float("nan")),
        "p50_inside_ms": percentiles(inside).get("p50", float("nan")),
        "p50_outside_ms": percentiles(outside).get("p50", float("nan")),
        "calls_inside": len(inside),
        "calls_outside": len(outside),
        "failed_inside": failed["inside"],
        "failed_outside": failed["outside"],
        "window": f"from the CA's signature to {WINDOW_AFTER_SERVED_S:g} s after Envoy served the new SVID",
        "propagation": {
            "p50_ms": propagation.get("p50", float("nan")),
            "p99_ms": propagation.get("p99", float("nan")),
            "max_ms": propagation.get("max", float("nan")),
            "samples": len(rotations),
            "poll_interval_ms": POLL_INTERVAL_S * 1000,
        },
    }
