"""Run `moto` as a real HTTP server, for tests and local demos of the AWS paths.

boto3 reaches it like any AWS endpoint (AWS_ENDPOINT_URL, or the per-service
AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL_ACM_PCA), so the code under test is
the code that runs against AWS: no patched or stubbed clients.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Credentials moto accepts; never real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class MotoServer:
    pid: int
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, endpoint_host: str | None = None) -> dict[str, str]:
        """The environment that points boto3 at this server."""
        host = endpoint_host or ("127.0.0.1" if self.host == "0.0.0.0" else self.host)
        return {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{self.port}"}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server(
    host: str = "127.0.0.1", log_file: Path | None = None, timeout_s: float = 30, module: str = "moto.server",
) -> Iterator[MotoServer]:
    """Start `moto_server` on host (0.0.0.0 when pods in other network
    namespaces must reach it through their bridge) and stop it on exit.
    `module` runs another moto entry point with the same flags
    (pki.testing_moto: moto taught the ACM PCA templates AWS documents)."""
    port = _free_port("127.0.0.1" if host == "0.0.0.0" else host)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "-H", host, "-p", str(port)],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **FAKE_AWS_ENV},
    )
    server = MotoServer(proc.pid, host, port)
    try:
        deadline = time.monotonic() + timeout_s
        probe = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/moto-api/"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {proc.returncode} before answering on {probe}")
            try:
                urllib.request.urlopen(probe, timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{module} did not answer on {probe} within {timeout_s:.0f}s") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_file:
            out.close()  # type: ignore[union-attr]


if __name__ == "__main__":
    # `python -m shopmesh.awsstub`: a moto server for trying the AWS paths by hand.
    with moto_server("0.0.0.0") as server:
        print(f"moto on {server.endpoint}; export:")
        for k, v in server.env().items():
            print(f"  export {k}={v}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
