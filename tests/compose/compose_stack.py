"""Drive the real compose.yaml under a real Docker engine, for tests/compose.

The same compose file a user runs, with two kinds of substitution only, both
announced on the test output:

- the base image (PYTHON_IMAGE): the official python:3.11-slim-bookworm when
  the engine has it or can pull it, otherwise the local stand-in built by
  docker/base/build.sh (a debootstrapped Debian bookworm with Python 3.11);
- Jaeger: the official image when the engine has it or can pull it, otherwise
  tests/compose/jaeger-standin.yaml puts the project's own OTLP receiver in
  the jaeger service's place.

Compose v2 (`docker compose`) is used when present, else v1 (`docker-compose`).
v2 brings the stack up with `up --wait`; v1 has no --wait, so the same
condition (every container running and healthy) is polled here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
JAEGER_STANDIN = REPO / "tests" / "compose" / "jaeger-standin.yaml"
BASE_BUILD = REPO / "docker" / "base" / "build.sh"
LOCAL_BASE_IMAGE = "shopmesh/python-base:3.11-bookworm"
PROJECT = "shopmesh-test"
LOG_DIR = REPO / "build" / "compose-test"

UP_TIMEOUT_S = 240.0
BUILD_TIMEOUT_S = 1200.0
ENGINE_TIMEOUT_S = 20.0


class StackError(RuntimeError):
    """The stack could not be built, started or inspected; the message says which step and why."""


def say(message: str) -> None:
    """Announce on the test output (pytest -s not needed: written to the terminal's stderr)."""
    sys.stderr.write(f"\n[compose] {message}\n")
    sys.stderr.flush()


def read_env_file(path: Path = REPO / ".env") -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True,
         capture: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, text=True, timeout=timeout,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
    except subprocess.TimeoutExpired as err:
        raise StackError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from err
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").splitlines()[-40:])
        raise StackError(f"`{' '.join(argv)}` exited with status {proc.returncode}:\n{tail}")
    return proc


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`docker info` got no answer from the engine within {ENGINE_TIMEOUT_S:.0f}s"
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"no Docker engine answers (`docker info`: {detail[0]})"
    if compose_command() is None:
        return "neither `docker compose` (v2) nor `docker-compose` (v1) is installed"
    return None


def compose_command() -> list[str] | None:
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=ENGINE_TIMEOUT_S).returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def image_present(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60).returncode == 0


def image_available(image: str) -> bool:
    """Present, or pulled now. Without a registry the pull fails at once (DNS), not after a timeout."""
    if image_present(image):
        return True
    try:
        return subprocess.run(["docker", "pull", "-q", image], capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """One compose project of the real compose.yaml, with the test's variables."""

    command: list[str]
    files: list[Path]
    env: dict[str, str]
    notes: list[str] = field(default_factory=list)
    project: str = PROJECT

    def variant(self, project: str, **env: str) -> "Stack":
        """Another project from the same files and images, with more variables (e.g. COMPOSE_PROFILES)."""
        return Stack(self.command, self.files, {**self.env, "SHOPMESH_INGRESS_PORT": str(free_port()),
                                                "SHOPMESH_JAEGER_UI_PORT": str(free_port()), **env},
                     self.notes, project)

    @property
    def v2(self) -> bool:
        return self.command == ["docker", "compose"]

    @property
    def ingress(self) -> str:
        return f"127.0.0.1:{self.env['SHOPMESH_INGRESS_PORT']}"

    @property
    def jaeger_standin(self) -> bool:
        return JAEGER_STANDIN in self.files

    def compose(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self.command, "-p", self.project, *(a for f in self.files for a in ("-f", str(f))), *args]
        return _run(argv, timeout=timeout, env=self.env, check=check)

    def build(self, *services: str) -> None:
        # One build per image: every mesh service (ca, ingress, the sidecars,
        # the Jaeger stand-in) shares the image `ca` builds.
        started = time.monotonic()
        self.compose("build", *(services or ("ca", "orders", "payments", "search")), timeout=BUILD_TIMEOUT_S)
        say(f"images built in {time.monotonic() - started:.0f}s")

    def up(self) -> None:
        started = time.monotonic()
        if self.v2:
            self.compose("up", "-d", "--wait", timeout=UP_TIMEOUT_S)
        else:
            # v1's `up` already waits for each depends_on condition; --wait's
            # "every container running and healthy" is polled below.
            self.compose("up", "-d", timeout=UP_TIMEOUT_S)
            self.wait_healthy(UP_TIMEOUT_S)
        say(f"stack up and healthy in {time.monotonic() - started:.0f}s ({' '.join(self.command)})")

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        if not ids:
            raise StackError(f"no container for service {service}")
        return ids[0]

    def states(self) -> dict[str, str]:
        """service -> 'running/healthy', 'running/starting', 'exited(1)', …"""
        ids = self.compose("ps", "-q").stdout.split()
        if not ids:
            return {}
        raw = _run(["docker", "inspect", *ids], timeout=60).stdout
        out = {}
        for c in json.loads(raw):
            service = c["Config"]["Labels"].get("com.docker.compose.service", c["Name"])
            state = c["State"]
            status = state["Status"] if state["Status"] != "exited" else f"exited({state['ExitCode']})"
            health = (state.get("Health") or {}).get("Status")
            out[service] = f"{status}/{health}" if health else status
        return out

    def wait_healthy(self, timeout_s: float, services: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.states()
            pending = {s: v for s, v in states.items() if (services is None or s in services)
                       and v not in ("running/healthy", "running")}
            if states and not pending and (services is None or all(s in states for s in services)):
                return
            if time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout_s:.0f}s: {pending or 'no containers'}")
            time.sleep(1.0)  # polling Docker for health with a deadline

    def exec(self, service: str, *argv: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker", "exec", self.container(service), *argv], timeout=timeout, check=check)

    def sidecar_status(self, service: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.exec(service, "cat", "/run/shopmesh/status.json").stdout)
        return doc

    def network(self) -> str:
        raw = _run(["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", self.container("ca")],
                   timeout=60).stdout
        names = list(json.loads(raw))
        if len(names) != 1:
            raise StackError(f"expected the ca container on one network, found {names}")
        return names[0]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", timeout=120, check=False).stdout or ""

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False)


def prepare(ttl: str) -> Stack:
    """Pick the compose tool, the base image and Jaeger; return the stack (not started)."""
    command = compose_command()
    assert command is not None
    defaults = read_env_file()
    env = {**os.environ}
    notes = []
    python_image = os.environ.get("PYTHON_IMAGE") or defaults["PYTHON_IMAGE"]
    if not image_available(python_image):
        if os.environ.get("PYTHON_IMAGE"):
            raise StackError(f"PYTHON_IMAGE={python_image} is neither present nor pullable")
        say(f"base image {python_image} cannot be pulled here: building the local stand-in {LOCAL_BASE_IMAGE} "
            f"({BASE_BUILD.relative_to(REPO)}; a few minutes the first time)")
        _run([str(BASE_BUILD)], timeout=BUILD_TIMEOUT_S, env={**os.environ, "IMAGE": LOCAL_BASE_IMAGE})
        python_image = LOCAL_BASE_IMAGE
        notes.append(f"base image: {LOCAL_BASE_IMAGE} (local stand-in for {defaults['PYTHON_IMAGE']}, no registry here)")
    else:
        notes.append(f"base image: {python_image}")
    files = [COMPOSE_FILE]
    jaeger_image = os.environ.get("SHOPMESH_JAEGER_IMAGE") or defaults["SHOPMESH_JAEGER_IMAGE"]
    if image_available(jaeger_image):
        notes.append(f"traces: Jaeger ({jaeger_image})")
    else:
        files.append(JAEGER_STANDIN)
        notes.append(f"traces: Jaeger's image {jaeger_image} cannot be had here, so the jaeger service runs the "
                     f"project's own OTLP receiver instead ({JAEGER_STANDIN.relative_to(REPO)})")
    env.update({
        "PYTHON_IMAGE": python_image,
        "SHOPMESH_HOST_IP": "127.0.0.1",
        # Free host ports: proves they are overridable, and no clash with a
        # local mesh or a user's stack on 8080/16686.
        "SHOPMESH_INGRESS_PORT": str(free_port()),
        "SHOPMESH_JAEGER_UI_PORT": str(free_port()),
        "SHOPMESH_TTL": ttl,
    })
    env.pop("COMPOSE_PROFILES", None)
    for note in notes:
        say(note)
    return Stack(command=command, files=files, env=env, notes=notes)
