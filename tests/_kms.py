"""A counting HTTP proxy in front of moto's KMS, for the payments KMS tests.

It counts KMS operations the way CloudTrail would (by the X-Amz-Target
header: `TrentService.GenerateDataKey` → "GenerateDataKey") without touching
boto3, and it can be taken down and brought back on the same port: `stop()`
closes the listening socket, so clients get "connection refused", as when
KMS is unreachable.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import socket
import threading
from typing import Any

from shopmesh.awsstub import FAKE_AWS_ENV, MotoServer

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
