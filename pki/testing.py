"""Helpers for tests that run the CA server and agents as real processes.

Used by tests/test_join_tokens.py, test_agent.py, test_sds_envoy.py, and
available to the mesh tests. Nothing here sleeps to synchronise: every wait
polls a condition until a deadline and fails with the process logs attached.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pki.ca import CA_SERVER_DNS_NAME

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    timeout: float = 15.0,
    interval: float = 0.05,
    logs: tuple[Path, ...] = (),
) -> T:
    """Poll probe() until it returns something other than None/False; fail naming what we waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{dump_logs(logs)}")
        time.sleep(interval)  # polling interval between probes, bounded by the deadline


def dump_logs(paths: tuple[Path, ...], tail: int = 60) -> str:
    parts = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()[-tail:]
        except OSError as err:
            lines = [f"(cannot read: {err})"]
        parts.append(f"--- {path} (last {tail} lines) ---\n" + "\n".join(lines))
    return "\n".join(parts)


@dataclass
class Process:
    """A child process with its stdout+stderr in log_path; stop() by pid."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None  # added to this process's environment
    popen: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env} if self.env else None,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to timeout, then SIGKILL; return the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()


def sync_ca_channel(
    address: str, bundle_pem: bytes, key: bytes | None = None, chain: bytes | None = None
) -> grpc.Channel:
    """A blocking twin of pki.client.ca_channel, for tests."""
    creds = grpc.ssl_channel_credentials(root_certificates=bundle_pem, private_key=key, certificate_chain=chain)
    options = [("grpc.ssl_target_name_override", CA_SERVER_DNS_NAME), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(address, creds, options=options)


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str | None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class CaServer:
    state_dir: Path
    join_address: str
    renew_address: str
    process: Process

    @property
    def bundle_path(self) -> Path:
        return self.state_dir / "ca" / "root.pem"

    @property
    def ports(self) -> tuple[int, int]:
        """(join, renew): pass them back to run_ca_server to restart the CA where agents expect it."""
        return int(self.join_address.rsplit(":", 1)[1]), int(self.renew_address.rsplit(":", 1)[1])

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def health_status(self) -> int | None:
        """grpc.health.v1 status of the join port, None if it does not answer."""
        try:
            bundle = self.bundle_path.read_bytes()
        except FileNotFoundError:
            return None
        with sync_ca_channel(self.join_address, bundle) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return None
        return int(reply.status)


@contextlib.contextmanager
def run_ca_server(
    state_dir: Path,
    ttl: str = "10s",
    log_dir: Path | None = None,
    ports: tuple[int, int] | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> Iterator[CaServer]:
    """Start `python -m pki.ca_server` (on free ports unless given); wait until SERVING; stop it on exit.

    extra: more flags (e.g. ["--ca", "acm-pca", "--pca-create"]); env: added environment (e.g. AWS_*).
    """
    join_port, renew_port = ports or (free_port(), free_port())
    join, renew = f"127.0.0.1:{join_port}", f"127.0.0.1:{renew_port}"
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or state_dir) / "ca-server.log"
    argv = [
        sys.executable, "-m", "pki.ca_server",
        "--state-dir", str(state_dir), "--join-listen", join, "--renew-listen", renew, "--ttl", ttl,
        *(extra or []),
    ]  # fmt: skip
    server = CaServer(state_dir, join, renew, Process(argv, log_path, env).start())
    try:
        def serving() -> bool:
            if server.process.popen.poll() is not None:
                raise AssertionError(f"the CA server exited with {server.process.popen.returncode}\n{dump_logs((log_path,))}")
            return bool(server.health_status() == health_pb2.HealthCheckResponse.SERVING)

        wait_for(serving, "the CA server to report SERVING", timeout=timeout, logs=(log_path,))
        yield server
    finally:
        server.process.stop()


@dataclass
class AgentProcess:
    process: Process
    status_file: Path
    data_dir: Path
    token_file: Path
    sds_socket: Path

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return doc

    def status_where(
        self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 15.0, logs: tuple[Path, ...] = ()
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            doc = self.status()
            return doc if doc is not None and doc.get("pid") == self.process.pid and condition(doc) else None

        return wait_for(probe, what, timeout, logs=(self.process.log_path, *logs))


def agent_argv(
    spiffe_id: str,
    ca: CaServer,
    pod_dir: Path,
    extra: list[str] | None = None,
) -> list[str]:
    return [
        sys.executable, "-m", "pki.agent",
        "--spiffe-id", spiffe_id,
        "--ca-join", ca.join_address,
        "--ca-renew", ca.renew_address,
        "--join-token-file", str(pod_dir / "join-token"),
        "--bundle-file", str(ca.bundle_path),
        "--data-dir", str(pod_dir / "agent"),
        "--sds-socket", str(pod_dir / "sds.sock"),
        "--status-file", str(pod_dir / "status.json"),
        "--backoff-max", "1s",
        *(extra or []),
    ]  # fmt: skip


def start_agent(spiffe_id: str, ca: CaServer, pod_dir: Path, extra: list[str] | None = None) -> AgentProcess:
    """Start `python -m pki.agent` for a pod directory laid out like the runner's."""
    pod_dir.mkdir(parents=True, exist_ok=True)
    process = Process(agent_argv(spiffe_id, ca, pod_dir, extra), pod_dir / "agent.log").start()
    return AgentProcess(
        process=process,
        status_file=pod_dir / "status.json",
        data_dir=pod_dir / "agent",
        token_file=pod_dir / "join-token",
        sds_socket=pod_dir / "sds.sock",
    )
