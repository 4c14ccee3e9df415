"""Run the benchmarks: `make bench`, or `python -m bench [--only mesh,rotation] [--quick]`.

Prints each benchmark's figures as it goes, then writes bench/results.json
(headline figures under dotted keys such as "mesh.throughput_ratio", and
every benchmark's details under its name) and docs/benchmarks.md.

--quick runs every benchmark briefly with tiny parameters (the smoke test
uses it); its figures mean nothing, so give it other --results/--doc paths.
Work files (mesh state, logs, profiles) go to --work-dir, default
build/bench/ (ignored by git); it is emptied first.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import issuance, machine, mesh_overhead, orders, payments, report, rotation
from bench.procs import ROOT, load_average

BENCHMARKS = ("mesh", "rotation", "issuance", "payments", "orders")

# (results.json key, benchmark, path inside its results)
HEADLINE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("mesh.throughput_ratio", "mesh", ("throughput_ratio",)),
    ("mesh.p90_added_ms", "mesh", ("p90_added_ms",)),
    ("mesh.p99_added_ms", "mesh", ("p99_added_ms",)),
    ("mesh.rate_rps", "mesh", ("rate_rps",)),
    ("mesh.sidecar_vcpu_per_1000_rps", "mesh", ("sidecar_vcpu_per_1000_rps",)),
    ("mesh.sidecar_rss_mb", "mesh", ("sidecar_rss_mb",)),
    ("mesh.sidecar_private_mb", "mesh", ("sidecar_private_mb",)),
    ("rotation.failed_rpcs", "rotation", ("failed_rpcs",)),
    ("rotation.rotations", "rotation", ("rotations",)),
    ("rotation.p99_inside_ms", "rotation", ("p99_inside_ms",)),
    ("rotation.p99_outside_ms", "rotation", ("p99_outside_ms",)),
    ("propagation.p50_ms", "rotation", ("propagation", "p50_ms")),
    ("propagation.p99_ms", "rotation", ("propagation", "p99_ms")),
    ("issuance.svids_per_s", "issuance", ("svids_per_s",)),
    ("payments.kms_calls_per_1000", "payments", ("kms_calls_per_1000",)),
    ("payments.kms_calls_per_1000_charges", "payments", ("kms_calls_per_1000_charges",)),
    ("payments.tokenizations_per_s", "payments", ("tokenizations_per_s",)),
    ("payments.charges_per_s", "payments", ("charges_per_s",)),
    ("orders.throughput_rps", "orders", ("throughput_rps",)),
    ("orders.p50_ms", "orders", ("saturation", "p50_ms")),
    ("orders.p99_ms", "orders", ("saturation", "p99_ms")),
)

# Parameters: the full run fits in under ten minutes on two cores; quick mode in about a minute.
FULL: dict[str, dict[str, Any]] = {
    "mesh": {"rounds": 3, "duration_s": 5.0, "warmup_s": 1.0},
    "rotation": {"duration_s": 60.0, "rate": 20.0},
    "issuance": {"duration_s": 8.0},
    "payments": {"duration_s": 8.0},
    "orders": {"duration_s": 10.0},
}
QUICK: dict[str, dict[str, Any]] = {
    "mesh": {"rounds": 1, "duration_s": 0.5, "warmup_s": 0.2, "rates": (100,)},
    "rotation": {"duration_s": 6.0, "rate": 5.0},
    "issuance": {"duration_s": 0.5},
    "payments": {"duration_s": 0.5},
    "orders": {"duration_s": 1.0},
}


def _dig(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _clean(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny parameters: checks that everything runs")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--no-profile", action="store_true", help="do not run py-spy on the apps during the orders benchmark")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    params = QUICK if args.quick else FULL
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def log(line: str) -> None:
        print(line, flush=True)

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "mesh": lambda: mesh_overhead.run(work / "mesh", log=log, **params["mesh"]),
        "rotation": lambda: rotation.run(work / "rotation", log=log, **params["rotation"]),
        "issuance": lambda: issuance.run(work / "issuance", log=log, **params["issuance"]),
        "payments": lambda: payments.run(work / "payments", log=log, **params["payments"]),
        "orders": lambda: orders.run(work / "orders", log=log, profile_dir=None if args.no_profile else work / "profiles",
                                     **params["orders"]),
    }
    began = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "run": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "load_before": load_average(),
                "quick": args.quick, "benchmarks": chosen},
    }
    m = results["machine"]
    log(f"ShopMesh benchmarks on {m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, {m['kernel']}; "
        f"load average {results['run']['load_before']:.2f}")
    for name in BENCHMARKS:
        if name not in chosen:
            continue
        log(f"[{name}]")
        started = time.monotonic()
        results[name] = runners[name]()
        results[name]["elapsed_s"] = time.monotonic() - started
    results["run"]["load_after"] = load_average()
    results["run"]["elapsed_s"] = time.monotonic() - began
    headline = {key: _dig(results[bench], path) for key, bench, path in HEADLINE if bench in results}
    document = _clean({**headline, **results})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(report.render(document))
    log("")
    log("headline figures:")
    for key, value in headline.items():
        log(f"  {key:38} {json.dumps(_clean(value))}")
    log(f"load average {results['run']['load_before']:.2f} before, {results['run']['load_after']:.2f} after; "
        f"{results['run']['elapsed_s']:.0f} s")
    log(f"wrote {args.results} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
