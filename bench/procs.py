"""Processes the benchmarks start and read: the load generator, servers, /proc counters.

Every process is started with its output in a log file and stopped by its
own pid (pki.testing.Process); every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pki.testing import Process, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark could not run; the message says which step and where the logs are."""


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return Process(argv, log_path, {"PYTHONPATH": str(ROOT), **(env or {})}).start()


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_listening(address: str, what: str, process: Process | None = None, timeout: float = 30.0) -> None:
    def up() -> bool:
        if process is not None and process.popen.poll() is not None:
            raise BenchError(f"{what} exited with {process.popen.returncode}; see {process.log_path}")
        return port_open(address)

    logs = (process.log_path,) if process is not None else ()
    wait_for(up, f"{what} on {address}", timeout=timeout, logs=logs)


def run_loadgen(spec: dict[str, Any], exec_prefix: list[str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run bench.loadgen in its own process and return its result."""
    limit = timeout if timeout is not None else float(spec["duration_s"]) + float(spec.get("warmup_s", 1.0)) + 60
    proc = subprocess.run(
        [*(exec_prefix or []), *python_module("bench.loadgen", json.dumps(spec))],
        capture_output=True, text=True, timeout=limit, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise BenchError(f"the load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds used so far and resident memory, of one process (all its threads)."""

    cpu_s: float
    rss_mb: float  # all resident pages, the binary's included
    private_mb: float  # anonymous resident pages (heap, stacks): what another copy of it would add
    at: float  # time.monotonic()


def proc_sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    memory_kb = {"VmRSS": 0, "RssAnon": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in memory_kb:
            memory_kb[name] = int(value.split()[0])
    return ProcSample(cpu, memory_kb["VmRSS"] / 1024, memory_kb["RssAnon"] / 1024, time.monotonic())


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


__all__ = ["BenchError", "Process", "ProcSample", "free_port", "load_average", "port_open", "proc_sample",
           "python_module", "run_loadgen", "start", "wait_for", "wait_listening"]
