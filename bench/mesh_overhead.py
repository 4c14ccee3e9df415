"""Benchmark 1: what the client and server sidecars add to one unary gRPC call.

The same echo server (bench.echo_server) is called with a 1 kB payload
directly (plaintext, no sidecars) and through a client and a server sidecar
with mutual TLS (bench.sidecars), by bench.loadgen in its own process:

- open loop at fixed rates (200, 500, 1000 rps): latency p50/p90/p99 of each
  path, what the sidecars add (mesh minus direct), and the sidecars' CPU
  seconds per 1000 requests (= vCPU per 1000 rps) and resident memory, read
  from /proc/<pid> of each Envoy;
- closed loop (a fixed number of callers, each sending as soon as the last
  answer came) for saturation throughput, and the CPU each process spent
  per request there.

Runs alternate (direct, mesh, then mesh, direct in the next round …) and
are repeated; the figures are medians over rounds and the added latency is
the median of the per-round differences, so a noisy neighbour moves both
sides of a difference rather than one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.echo_server import PATH as ECHO_PATH
from bench.procs import ProcSample, proc_sample, run_loadgen
from bench.sidecars import SidecarPair, sidecar_pair

RATES = (200, 500, 1000)
PAYLOAD_BYTES = 1024
LOAD_GENERATOR = (
    "bench.loadgen: an asyncio gRPC client (grpc.aio) in its own process, one HTTP/2 connection; "
    "open loop at fixed rates (requests leave on schedule whatever the answers do) and closed loop for saturation"
)

Log = Callable[[str], None]


def _spec(target: str, **extra: Any) -> dict[str, Any]:
    return {"target": target, "call": {"kind": "echo", "path": ECHO_PATH, "payload_bytes": PAYLOAD_BYTES}, **extra}


def _measured(pair: SidecarPair, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], dict[str, float]]:
    """Run the load generator; return its result, CPU seconds per process, and memory (MB) per process after."""
    processes = {"client_envoy": pair.client_envoy.pid, "server_envoy": pair.server_envoy.pid, "server_app": pair.server_app.pid}
    before: dict[str, ProcSample] = {name: proc_sample(pid) for name, pid in processes.items()}
    result = run_loadgen(spec)
    after = {name: proc_sample(pid) for name, pid in processes.items()}
    cpu = {name: after[name].cpu_s - before[name].cpu_s for name in processes}
    memory = {name: {"rss": after[name].rss_mb, "private": after[name].private_mb} for name in processes}
    return result, cpu, memory


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(work_dir: Path, *, rates: tuple[int, ...] = RATES, rounds: int = 3, duration_s: float = 5.0,
        warmup_s: float = 1.0, concurrency: int = 16, log: Log = print) -> dict[str, Any]:
    paths = ("direct", "mesh")
    fixed: dict[int, dict[str, list[dict[str, Any]]]] = {rate: {p: [] for p in paths} for rate in rates}
    saturation: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    with sidecar_pair(work_dir) as pair:
        targets = {"direct": pair.direct, "mesh": pair.meshed}
        for round_no in range(rounds):
            order = paths if round_no % 2 == 0 else tuple(reversed(paths))
            for rate in rates:
                for path in order:
                    result, cpu, memory = _measured(pair, _spec(targets[path], mode="open", rate=rate,
                                                              duration_s=duration_s, warmup_s=warmup_s))
                    sent_total = rate * (duration_s + warmup_s)
                    fixed[rate][path].append({**result, "cpu_s": cpu, "memory_mb": memory, "requests": sent_total})
                    lat = result["latency_ms"]
                    log(f"  round {round_no + 1} {rate:>5} rps {path:<6} p50 {lat['p50']:.3f} p90 {lat['p90']:.3f} "
                        f"p99 {lat['p99']:.3f} ms  ok {result['ok']}/{result['sent']}  "
                        f"{'sustained' if result['sustained'] else 'NOT sustained'}")
            for path in order:
                result, cpu, memory = _measured(pair, _spec(targets[path], mode="closed", concurrency=concurrency,
                                                          duration_s=duration_s, warmup_s=warmup_s))
                saturation[path].append({**result, "cpu_s": cpu, "memory_mb": memory})
                log(f"  round {round_no + 1} saturation {path:<6} {result['throughput_rps']:.0f} rps "
                    f"(p50 {result['latency_ms']['p50']:.2f} ms, {concurrency} callers)")
        ttl = pair.ttl
    return summarize(fixed, saturation, rates=rates, rounds=rounds, duration_s=duration_s, warmup_s=warmup_s,
                     concurrency=concurrency, ttl=ttl)


def _path_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "p50_ms": _median([r["latency_ms"]["p50"] for r in runs]),
        "p90_ms": _median([r["latency_ms"]["p90"] for r in runs]),
        "p99_ms": _median([r["latency_ms"]["p99"] for r in runs]),
        "throughput_rps": _median([r["throughput_rps"] for r in runs]),
        "sustained_rounds": sum(1 for r in runs if r["sustained"]),
        "rounds": len(runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "loadgen_cpu_share": _median([r["loadgen_cpu_s"] / r["elapsed_s"] for r in runs]),
    }


def summarize(fixed: dict[int, dict[str, list[dict[str, Any]]]], saturation: dict[str, list[dict[str, Any]]], *,
              rates: tuple[int, ...], rounds: int, duration_s: float, warmup_s: float, concurrency: int,
              ttl: str) -> dict[str, Any]:
    per_rate: dict[str, Any] = {}
    sustained_rates = []
    for rate in rates:
        direct, mesh = fixed[rate]["direct"], fixed[rate]["mesh"]
        added = {
            q: _median([m["latency_ms"][q] - d["latency_ms"][q] for d, m in zip(direct, mesh)])
            for q in ("p50", "p90", "p99")
        }
        # A rate counts as sustained when both paths kept up in most rounds.
        both = all(2 * s["sustained_rounds"] > s["rounds"] for s in (_path_summary(direct), _path_summary(mesh)))
        if both:
            sustained_rates.append(rate)
        per_rate[str(rate)] = {
            "direct": _path_summary(direct),
            "mesh": _path_summary(mesh),
            "added_ms": {f"{q}": v for q, v in added.items()},
            "sustained": both,
            # CPU seconds per 1000 requests is vCPU per 1000 rps.
            "sidecar_vcpu_per_1000_rps": {
                side: _median([m["cpu_s"][f"{side}_envoy"] / m["requests"] * 1000 for m in mesh])
                for side in ("client", "server")
            },
            "sidecar_rss_mb": {side: max(m["memory_mb"][f"{side}_envoy"]["rss"] for m in mesh) for side in ("client", "server")},
            "sidecar_private_mb": {side: max(m["memory_mb"][f"{side}_envoy"]["private"] for m in mesh)
                                   for side in ("client", "server")},
            "server_app_vcpu_per_1000_rps": {
                path: _median([r["cpu_s"]["server_app"] / r["requests"] * 1000 for r in fixed[rate][path]])
                for path in ("direct", "mesh")
            },
        }
    chosen = max(sustained_rates) if sustained_rates else min(rates)
    sat = {path: _median([r["throughput_rps"] for r in saturation[path]]) for path in ("direct", "mesh")}
    ratios = [m["throughput_rps"] / d["throughput_rps"] for d, m in zip(saturation["direct"], saturation["mesh"])
              if d["throughput_rps"]]

    def cpu_ms_per_request(path: str) -> dict[str, float]:
        runs = saturation[path]
        out = {"loadgen": _median([r["loadgen_cpu_s"] / max(1, r["completed"]) * 1000 for r in runs])}
        names = ("server_app",) if path == "direct" else ("server_app", "client_envoy", "server_envoy")
        for name in names:
            # Warm-up requests burn CPU too: divide by everything sent in the window.
            out[name] = _median([r["cpu_s"][name] / max(1, r["throughput_rps"] * (duration_s + warmup_s)) * 1000
                                 for r in runs])
        return out

    top = per_rate[str(chosen)]
    return {
        "load_generator": LOAD_GENERATOR,
        "payload_bytes": PAYLOAD_BYTES,
        "rounds": rounds,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "svid_ttl": ttl,
        "rates": per_rate,
        "rate_rps": chosen,
        "rate_sustained": bool(sustained_rates),
        "p50_added_ms": top["added_ms"]["p50"],
        "p90_added_ms": top["added_ms"]["p90"],
        "p99_added_ms": top["added_ms"]["p99"],
        "sidecar_vcpu_per_1000_rps": top["sidecar_vcpu_per_1000_rps"],
        "sidecar_rss_mb": top["sidecar_rss_mb"],
        "sidecar_private_mb": top["sidecar_private_mb"],
        "saturation": {
            "concurrency": concurrency,
            "direct_rps": sat["direct"],
            "mesh_rps": sat["mesh"],
            "ratios": ratios,
            "latency_ms": {
                path: {q: _median([r["latency_ms"][q] for r in saturation[path]]) for q in ("p50", "p90", "p99")}
                for path in ("direct", "mesh")
            },
            "cpu_ms_per_request": {path: cpu_ms_per_request(path) for path in ("direct", "mesh")},
        },
        "throughput_ratio": _median(ratios),
    }
