"""Benchmark 5: PlaceOrder end to end, through the ingress of a real mesh.

`shopmesh up` (through shopmesh.testing.start_mesh, the CLI's default TTL of
ten minutes, so no rotation happens while it is measured), one card
tokenized, then bench.loadgen places orders through the ingress: ingress →
orders (→ search GetProducts, → payments Charge), every hop through the
sidecars with mTLS, tracing on as `shopmesh up` runs it.

- closed loop with `concurrency` callers: throughput and latency at saturation;
- open loop at half that throughput: latency at a load the mesh sustains.

With `profile_dir`, py-spy records each app during the closed-loop run
(bench.profile) and the hottest functions go into the results.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import profile
from bench.procs import proc_sample, run_loadgen
from bench.rotation import tokenize_test_card
from shopmesh.testing import start_mesh, stop_mesh

Log = Callable[[str], None]
APPS = ("orders", "payments", "search")


def _pids(mesh_record: Any) -> dict[str, int]:
    """The mesh's processes by role: apps, Envoys (children of their agents), CA and OTLP receiver."""
    pids: dict[str, int] = {}
    for name, pod in mesh_record.pods.items():
        if pod.app_pid:
            pids[f"{name} app"] = pod.app_pid
        if pod.agent_pid:
            pids[f"{name} agent"] = pod.agent_pid
            for task in os.listdir(f"/proc/{pod.agent_pid}/task"):
                try:
                    children = Path(f"/proc/{pod.agent_pid}/task/{task}/children").read_text().split()
                except OSError:
                    continue
                for child in children:
                    pids[f"{name} envoy"] = int(child)
    if mesh_record.ca_pid:
        pids["ca"] = mesh_record.ca_pid
    if mesh_record.otlp_pid:
        pids["otlp receiver"] = mesh_record.otlp_pid
    return pids


def run(work_dir: Path, *, duration_s: float = 10.0, concurrency: int = 8, ttl: str = "10m",
        profile_dir: Path | None = None, log: Log = print) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"  starting a mesh with a {ttl} TTL")
    mesh = start_mesh(work_dir / "mesh", ttl)
    try:
        token = tokenize_test_card(mesh.ingress)
        record = mesh.record
        pids = _pids(record)
        call = {"kind": "place_order", "token": token}
        profilers = profile.start({app: record.pods[app].app_pid for app in APPS if record.pods[app].app_pid},
                                  profile_dir, duration_s) if profile_dir else {}
        before = {role: proc_sample(pid) for role, pid in pids.items()}
        closed = run_loadgen({"target": mesh.ingress, "call": call, "mode": "closed", "concurrency": concurrency,
                              "duration_s": duration_s, "warmup_s": 1.0, "timeout_s": 10.0})
        after = {role: proc_sample(pid) for role, pid in pids.items()}
        hot = profile.finish(profilers) if profilers else {}
        log(f"  closed loop ({concurrency} callers): {closed['throughput_rps']:.1f} orders/s, "
            f"p50 {closed['latency_ms']['p50']:.1f} ms, p99 {closed['latency_ms']['p99']:.1f} ms")
        orders_done = max(1.0, closed["throughput_rps"] * (duration_s + 1.0))
        cpu_ms_per_order = {role: (after[role].cpu_s - before[role].cpu_s) / orders_done * 1000 for role in pids}
        rate = max(1.0, round(closed["throughput_rps"] / 2))
        opened = run_loadgen({"target": mesh.ingress, "call": call, "mode": "open", "rate": rate,
                              "duration_s": duration_s, "warmup_s": 1.0, "timeout_s": 10.0})
        log(f"  open loop at {rate:g}/s: p50 {opened['latency_ms']['p50']:.1f} ms, p99 {opened['latency_ms']['p99']:.1f} ms"
            + ("" if opened["sustained"] else " (not sustained)"))
    finally:
        stop_mesh(mesh)
    return {
        "ttl": ttl,
        "path": "client → ingress → orders → (search GetProducts, payments Charge), mTLS between every pod, tracing on",
        "throughput_rps": closed["throughput_rps"],
        "concurrency": concurrency,
        "duration_s": duration_s,
        "saturation": {"p50_ms": closed["latency_ms"]["p50"], "p90_ms": closed["latency_ms"]["p90"],
                       "p99_ms": closed["latency_ms"]["p99"], "errors": closed["errors"],
                       "error_samples": closed["error_samples"]},
        "fixed_rate": {"rate_rps": rate, "p50_ms": opened["latency_ms"]["p50"], "p90_ms": opened["latency_ms"]["p90"],
                       "p99_ms": opened["latency_ms"]["p99"], "sustained": opened["sustained"],
                       "errors": opened["errors"]},
        "cpu_ms_per_order": dict(sorted(cpu_ms_per_order.items(), key=lambda kv: -kv[1])),
        "profile": hot,
    }
