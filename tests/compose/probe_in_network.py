"""Run INSIDE a container on the stack's network: what can a neighbour reach?

    python /probe/probe_in_network.py orders search payments

For each pod (by its service name) it tries:
- the sidecar's inbound port 8443 by TCP: must connect (the control: the
  pod is reachable, so the refusals below mean something);
- plaintext HTTP/2 (the gRPC connection preface) to 8443: the connection
  must close without a single HTTP/2 frame coming back (a TLS alert is
  Envoy's TLS layer refusing, and is all it may say);
- TLS without a client certificate to 8443: no HTTP/2 frame may come back;
- the app port 50051 and Envoy admin 9901 by TCP: must be unreachable
  (they listen on the pod's 127.0.0.1 only).
It prints one JSON object; the test decides.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

APP_PORT = 50051
ADMIN_PORT = 9901
INBOUND_PORT = 8443
TIMEOUT_S = 3.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def tcp(host: str, port: int) -> str:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except OSError as err:
        return f"unreachable: {err.__class__.__name__}: {err}"
    return "connected"


def _read_some(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while len(data) < 9:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    return data


def describe(data: bytes) -> str:
    """What came back: nothing, a TLS alert record (Envoy refusing), or anything else."""
    if not data:
        return "closed without an answer"
    if data[:1] == b"\x15" and len(data) >= 7:
        return f"closed with TLS alert {data[6]} (not HTTP/2)"
    return f"answered {len(data)} bytes: {data[:16].hex()}"


def plaintext_h2(host: str) -> str:
    try:
        sock = socket.create_connection((host, INBOUND_PORT), timeout=TIMEOUT_S)
    except OSError as err:
        return f"refused at connect: {err}"
    with sock:
        try:
            sock.sendall(H2_PREFACE + H2_SETTINGS)
        except OSError as err:
            return f"closed while sending: {err.__class__.__name__}"
        data = _read_some(sock)
    return describe(data)


def tls_without_client_cert(host: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, INBOUND_PORT), timeout=TIMEOUT_S)
    except OSError as err:
        return f"refused at connect: {err}"
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            # TLS 1.3: the server's verdict on our (missing) certificate arrives
            # after the client's side of the handshake is done.
            tls.sendall(H2_PREFACE + H2_SETTINGS)
            data = _read_some(tls)
    except (OSError, ssl.SSLError) as err:
        return f"handshake failed: {err.__class__.__name__}: {err}"
    return describe(data)


def main() -> int:
    out = {}
    for host in sys.argv[1:]:
        out[host] = {
            "inbound_tcp": tcp(host, INBOUND_PORT),
            "plaintext_h2": plaintext_h2(host),
            "tls_no_client_cert": tls_without_client_cert(host),
            "app_port": tcp(host, APP_PORT),
            "admin_port": tcp(host, ADMIN_PORT),
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
