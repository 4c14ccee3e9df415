"""Sample running apps with py-spy and name their hottest functions.

    profilers = start({"payments": pid, …}, out_dir, duration_s)
    … load …
    hot = finish(profilers)   # {"payments": {"samples": N, "self": [...], "inclusive": [...]}, …}

py-spy (pinned in the [dev] extra) attaches to a process by pid and samples
its Python stacks without changing it; it needs ptrace rights (root, or
CAP_SYS_PTRACE). The raw output (folded stacks, one file per app) stays in
out_dir for flame graphs (`py-spy` or any folded-stack viewer); the summary
keeps the functions of this repository only.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.procs import ROOT

OURS = ("services/", "shopmesh/", "pki/")
BOOTSTRAP = ("run_app (", "<module> (")
TOP = 12


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pids: dict[str, int], out_dir: Path, duration_s: float) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    binary = py_spy()
    if binary is None:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    running = {}
    for name, pid in pids.items():
        out = out_dir / f"{name}.folded"
        argv = [binary, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))), "--rate", "200",
                "--format", "raw", "--output", str(out), "--nonblocking"]
        running[name] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    return running


def _ours(frame: str) -> bool:
    return any(part in frame for part in OURS) and "site-packages" not in frame


def _short(frame: str) -> str:
    # "Class.method (/abs/path/services/payments/storage.py:118)" → "Class.method (services/payments/storage.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    try:
        path = str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return f"{name} ({path})"


def summarize(folded: Path) -> dict[str, Any]:
    total = 0
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        ours = [_short(f) for f in frames if _ours(f)]
        if ours:
            innermost = ours[-1]
            if innermost.startswith(BOOTSTRAP):
                # Only the app's entry point is on the stack: the event loop,
                # gRPC and asyncio at work between handlers.
                innermost = "(event loop, gRPC, asyncio: no handler on the stack)"
            own[innermost] += n  # the innermost function of ours: where our code spent it
        for frame in dict.fromkeys(ours):
            inclusive[frame] += n
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "innermost_ours": [{"function": f, "percent": share(n)} for f, n in own.most_common(TOP)],
        "inclusive": [{"function": f, "percent": share(n)} for f, n in inclusive.most_common(TOP)],
    }


def finish(running: dict[str, tuple[subprocess.Popen[bytes], Path]], timeout: float = 60) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (proc, folded) in running.items():
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if folded.exists():
            out[name] = {**summarize(folded), "folded": str(folded)}
    return out
