"""Call a sidecar the way another workload would, or the way an attacker might.

A minimal gRPC-over-HTTP/2 client on a raw TLS socket: it presents any
certificate you give it (or none), skips hostname checks (SVIDs carry a URI
SAN, not a DNS name, which stock gRPC clients insist on) and reports the
gRPC status exactly as the server sent it. A `GrpcConnection` keeps one
connection open across calls, to see what happens to it when certificates
rotate or it grows old. Tests use it to prove who may call what; you can use
it to poke at a running mesh.
"""

from __future__ import annotations

import socket
import ssl
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import h2.config
import h2.connection
import h2.events
from cryptography import x509


class ProbeError(ConnectionError):
    """The connection or TLS handshake failed, or the connection ended, before a gRPC status arrived."""


@dataclass
class ProbeResult:
    grpc_status: int | None
    grpc_message: str
    http_status: int | None
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    peer_cert_der: bytes | None = None

    @property
    def peer_serial(self) -> str | None:
        """The serial of the certificate the server presented, in lowercase hex."""
        if self.peer_cert_der is None:
            return None
        return format(x509.load_der_x509_certificate(self.peer_cert_der).serial_number, "x")


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


class GrpcConnection:
    """One HTTP/2 connection to a gRPC server, for several unary calls.

    `closed_by_server` turns true when the server sends GOAWAY or closes the
    connection (Envoy does both when `max_connection_duration` is reached)."""

    def __init__(
        self,
        address: str,
        *,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        ca_pem: bytes | None = None,
        timeout_s: float = 5.0,
        tls: bool = True,
    ) -> None:
        self.address = address
        self.tls = tls
        self.closed_by_server = False
        host, port = address.rsplit(":", 1)
        try:
            raw = socket.create_connection((host, int(port)), timeout=timeout_s)
        except OSError as exc:
            raise ProbeError(f"connect to {address}: {exc}") from exc
        self._raw = raw
        self.peer_cert_der: bytes | None = None
        if tls:
            try:
                sock: socket.socket = _tls_context(cert_pem, key_pem, ca_pem).wrap_socket(raw)
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                raise ProbeError(f"TLS handshake with {address}: {exc}") from exc
            self.peer_cert_der = sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        else:
            sock = raw
        self._sock = sock
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._conn.initiate_connection()

    def __enter__(self) -> GrpcConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()
        self._raw.close()

    def _send(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._sock.sendall(data)

    def call(self, path: str, request: bytes = b"", metadata: tuple[tuple[str, str], ...] = ()) -> ProbeResult:
        if self.closed_by_server:
            raise ProbeError(f"{self.address} has closed this connection")
        stream_id = self._conn.get_next_available_stream_id()
        self._conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "https" if self.tls else "http"), (":path", path),
            (":authority", self.address), ("content-type", "application/grpc"), ("te", "trailers"),
            *metadata,
        ])
        self._conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(request)) + request, end_stream=True)
        headers: dict[str, str] = {}
        body = b""
        try:
            self._send()
            while True:
                data = self._sock.recv(65536)
                if not data:
                    self.closed_by_server = True
                    raise ProbeError(f"{self.address} closed the connection before answering")
                for event in self._conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        # GOAWAY: streams up to last_stream_id are still answered.
                        self.closed_by_server = True
                        if event.last_stream_id is not None and event.last_stream_id < stream_id:
                            raise ProbeError(f"{self.address} sent GOAWAY before this stream (error code {event.error_code})")
                    elif getattr(event, "stream_id", None) != stream_id:
                        continue  # connection-level events (settings, pings) and other streams
                    elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        headers.update({k: v for k, v in event.headers})  # type: ignore[misc]
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        raise ProbeError(f"{self.address} reset the stream (error code {event.error_code})")
                    elif isinstance(event, h2.events.StreamEnded):
                        self._send()
                        status = headers.get("grpc-status")
                        return ProbeResult(
                            grpc_status=int(status) if status is not None else None,
                            grpc_message=headers.get("grpc-message", ""),
                            http_status=int(headers[":status"]) if ":status" in headers else None,
                            body=body[5:] if len(body) >= 5 else body,
                            headers=headers,
                            peer_cert_der=self.peer_cert_der,
                        )
                self._send()
        except (ssl.SSLError, OSError) as exc:
            if isinstance(exc, ProbeError):
                raise
            raise ProbeError(f"{self.address}: {exc}") from exc

    def wait_closed(self, timeout_s: float) -> bool:
        """Read until the server ends the connection (GOAWAY or close) or the
        timeout passes; True if it ended it."""
        self._sock.settimeout(timeout_s)
        try:
            while not self.closed_by_server:
                data = self._sock.recv(65536)
                if not data:
                    self.closed_by_server = True
                    break
                for event in self._conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        self.closed_by_server = True
                self._send()
        except (TimeoutError, socket.timeout):
            return False
        except (ssl.SSLError, OSError):
            self.closed_by_server = True
        return self.closed_by_server


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
    """One unary gRPC call to `address` (host:port) for method `path`, on a connection of its own."""
    with GrpcConnection(address, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem, timeout_s=timeout_s, tls=tls) as conn:
        return conn.call(path, request, metadata)
