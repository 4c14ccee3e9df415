"""Shared fixtures. Mesh tests (marked `mesh`) run the real local mesh: the
`shopmesh` CLI, the CA server, agents, the real Envoy binary, one network
namespace per pod."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shopmesh import runner

SHOPMESH = [sys.executable, "-m", "shopmesh.cli"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mesh: runs the real local mesh (Envoy, CA, agents, apps)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mesh:
    """A running local mesh and the ways tests poke at it."""

    state_dir: Path

    @property
    def record(self) -> runner.MeshRecord:
        return runner.MeshRecord.load(self.state_dir)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*SHOPMESH, *args, "--state-dir", str(self.state_dir)],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"shopmesh {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> dict[str, dict]:
        return {e["name"]: e for e in json.loads(self.cli("status", "--json", check=False).stdout)}

    def stats(self, pod: str) -> dict[str, int]:
        return runner.envoy_stats(self.record, pod)

    def log(self, name: str) -> str:
        return (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, pattern: str, timeout_s: float = 15) -> None:
        """Poll a log until a line matches `pattern` (Envoy flushes its access log periodically)."""
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.log(name)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in {name}.log within {timeout_s}s")
            time.sleep(0.2)

    def dump_logs(self) -> str:
        out = []
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-40:]
            out.append(f"===== {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("mesh tests need root for one network namespace per pod (run `make test` as root)")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """One mesh for the session, with a 10-second certificate TTL so rotation
    happens many times while the tests run."""
    _need_root()
    state_dir = tmp_path_factory.mktemp("mesh-state")
    m = Mesh(state_dir)
    proc = subprocess.run(
        [*SHOPMESH, "up", "-d", "--ttl", "10s", "--network", "netns",
         "--ingress-port", str(free_port()), "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"shopmesh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{m.dump_logs()}")
    failed_before = request.session.testsfailed
    try:
        yield m
    finally:
        if request.session.testsfailed > failed_before:
            print("\n--- mesh logs (a mesh test failed) ---\n" + m.dump_logs())
        down = subprocess.run([*SHOPMESH, "down", "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"shopmesh down failed:\n{down.stdout}\n{down.stderr}"
