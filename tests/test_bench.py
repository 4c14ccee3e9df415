"""Smoke test of `make bench`: every benchmark runs, briefly, and the outputs have their shape.

`python -m bench --quick` runs each benchmark with tiny parameters (a few
hundred calls, a few seconds of rotation) into temporary files. Its figures
mean nothing and nothing here judges them: benchmarks are not timed tests.
What is checked is that the headline keys of bench/results.json exist with
numbers, that the markdown has its tables, and that every process the
benchmarks started is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mesh

ROOT = Path(__file__).resolve().parent.parent
HEADLINE_KEYS = (
    "mesh.throughput_ratio", "mesh.p90_added_ms", "mesh.p99_added_ms", "mesh.rate_rps", "rotation.failed_rpcs",
    "rotation.rotations", "propagation.p99_ms", "issuance.svids_per_s", "payments.kms_calls_per_1000",
    "orders.throughput_rps",
)


def _our_processes(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in argv:
            found.append(f"{entry.name}: {argv[:200]}")
    return found


def test_every_benchmark_runs_and_writes_its_results(tmp_path: Path) -> None:
    results, doc, work = tmp_path / "results.json", tmp_path / "benchmarks.md", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results", str(results), "--doc", str(doc), "--work-dir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, f"python -m bench --quick exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    document = json.loads(results.read_text())
    for key in HEADLINE_KEYS:
        assert isinstance(document.get(key), (int, float)), f"{key} missing or not a number: {document.get(key)!r}"
    # The same figures, nested under their benchmark, for readers of the details.
    assert document["mesh"]["throughput_ratio"] == document["mesh.throughput_ratio"]
    assert document["rotation"]["propagation"]["p99_ms"] == document["propagation.p99_ms"]
    assert document["machine"]["cores"] == os.cpu_count()
    assert document["run"]["quick"] is True
    # The quick run is still a real one: orders were paid, rotations happened, KMS was called.
    assert document["orders"]["saturation"]["errors"] == {}
    assert document["rotation.rotations"] > 0
    assert document["payments"]["cache_on"]["tokenize"]["kms_calls"] > 0
    text = doc.read_text()
    for heading in ("## The run", "## Headline figures, beside the published ones", "## 1. Mesh overhead",
                    "## 2. Rotation under load", "## 3. Issuance and propagation", "## 4. Payments",
                    "## 5. End to end: PlaceOrder"):
        assert heading in text
    assert "| what | this run | published | goal | met |" in text
    assert "Istio 1.20: 0.228 ms" in text
    assert _our_processes(str(work)) == []
