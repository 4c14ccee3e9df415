"""Run `moto` as a real HTTP server, for tests and local demos of the AWS paths.

boto3 reaches it like any AWS endpoint (AWS_ENDPOINT_URL, or the per-service
AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL_ACM_PCA), so the code under test is
the code that runs against AWS: no patched or stubbed clients.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# -- counting KMS calls ----------------------------------------------------------
#
# A counting HTTP proxy in front of moto's KMS, for the payments KMS tests and
# the payments benchmark. It counts KMS operations the way CloudTrail would
# (by the X-Amz-Target header: `TrentService.GenerateDataKey` →
# "GenerateDataKey") without touching boto3, and it can be taken down and
# brought back on the same port: `stop()` closes the listening socket, so
# clients get "connection refused", as when KMS is unreachable.

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class KmsProxy:
    def __init__(self, upstream: MotoServer) -> None:
        self.upstream = ("127.0.0.1" if upstream.host == "0.0.0.0" else upstream.host, upstream.port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def count(self, operation: str) -> int:
        with self._lock:
            return self.counts[operation]

    def start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.headers.get("X-Amz-Target", "")
                with proxy._lock:
                    proxy.counts[target.rpartition(".")[2] or self.path] += 1
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=10)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    upstream.request("POST", self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    upstream.close()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kms-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._server = None


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
