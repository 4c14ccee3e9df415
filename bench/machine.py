"""The machine a benchmark ran on: what docs/benchmarks.md prints beside the figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _envoy_version() -> str:
    import subprocess
    import sys

    envoy = Path(sys.executable).parent / "envoy"
    try:
        out = subprocess.run([str(envoy), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "unknown"
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    return out.strip().rsplit("version:", 1)[-1].strip() or "unknown"


def describe() -> dict[str, Any]:
    uname = os.uname()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": f"{uname.sysname} {uname.release}",
        "python": platform.python_version(),
        "envoy": _envoy_version(),
    }
