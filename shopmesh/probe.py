"""Call a sidecar the way another workload would, or the way an attacker might.

A minimal gRPC-over-HTTP/2 client on a raw TLS socket: it presents any
certificate you give it (or none), skips hostname checks (SVIDs carry a URI
SAN, not a DNS name, which stock gRPC clients insist on) and reports the
gRPC status exactly as the server sent it. Tests use it to prove who may
call what; you can use it to poke at a running mesh.
"""

from __future__ import annotations

import socket
import ssl
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events


class ProbeError(ConnectionError):
    """The connection or TLS handshake failed before any gRPC status arrived."""


@dataclass
class ProbeResult:
    grpc_status: int | None
    grpc_message: str
    http_status: int | None
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    peer_cert_der: bytes | None = None


def _tls_context(cert_pem: bytes | None, key_pem: bytes | None, ca_pem: bytes | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca_pem:
        ctx.load_verify_locations(cadata=ca_pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert_pem and key_pem:
        # ssl loads client keys only from files: keep them in a private
        # temporary directory for the moment it takes.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(cert_pem)
            key.touch(mode=0o600)
            key.write_bytes(key_pem)
            ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def grpc_unary(
    address: str,
    path: str,
    request: bytes = b"",
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    ca_pem: bytes | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout_s: float = 5.0,
    tls: bool = True,
) -> ProbeResult:
    """One unary gRPC call to `address` (host:port) for method `path`."""
    host, port = address.rsplit(":", 1)
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as exc:
        raise ProbeError(f"connect to {address}: {exc}") from exc
    try:
        if tls:
            try:
                sock: socket.socket = _tls_context(cert_pem, key_pem, ca_pem).wrap_socket(raw)
            except (ssl.SSLError, OSError) as exc:
                raise ProbeError(f"TLS handshake with {address}: {exc}") from exc
            peer = sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        else:
            sock, peer = raw, None
        return _exchange(sock, address, path, request, metadata, peer, tls)
    finally:
        raw.close()


def _exchange(
    sock: socket.socket, address: str, path: str, request: bytes,
    metadata: tuple[tuple[str, str], ...], peer: bytes | None, tls: bool,
) -> ProbeResult:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [
        (":method", "POST"), (":scheme", "https" if tls else "http"), (":path", path),
        (":authority", address), ("content-type", "application/grpc"), ("te", "trailers"),
        *metadata,
    ])
    conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(request)) + request, end_stream=True)
    headers: dict[str, str] = {}
    body = b""
    try:
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                raise ProbeError(f"{address} closed the connection before answering")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update({k: v for k, v in event.headers})  # type: ignore[misc]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    raise ProbeError(f"{address} reset the stream (error code {event.error_code})")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ProbeError(f"{address} ended the connection (error code {event.error_code})")
                elif isinstance(event, h2.events.StreamEnded):
                    status = headers.get("grpc-status")
                    return ProbeResult(
                        grpc_status=int(status) if status is not None else None,
                        grpc_message=headers.get("grpc-message", ""),
                        http_status=int(headers[":status"]) if ":status" in headers else None,
                        body=body[5:] if len(body) >= 5 else body,
                        headers=headers,
                        peer_cert_der=peer,
                    )
            sock.sendall(conn.data_to_send())
    except (ssl.SSLError, OSError) as exc:
        raise ProbeError(f"{address}: {exc}") from exc
