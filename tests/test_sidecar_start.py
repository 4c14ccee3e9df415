"""Row 24: a sidecar that starts before its agent (or before the CA answers)
refuses inbound connections until it has a certificate — never plaintext."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pki.testing import Process, free_port, run_ca_server, start_agent, wait_for
from shopmesh import envoyconfig, topology
from shopmesh.probe import ProbeError, grpc_unary

ENVOY = Path(sys.executable).parent / "envoy"


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_inbound_refuses_until_the_agent_delivers_a_certificate(tmp_path: Path) -> None:
    pod_dir = tmp_path / "payments"
    pod_dir.mkdir()
    inbound_port, admin_port = free_port(), free_port()
    pod = envoyconfig.PodAddresses(
        name="payments", host="127.0.0.1", inbound_bind="127.0.0.1", inbound_port=inbound_port,
        app_port=free_port(), admin_port=admin_port, outbound_ports={},
    )
    config = pod_dir / "envoy.yaml"
    config.write_text(envoyconfig.render(pod, {"payments": pod}, sds_socket=pod_dir / "sds.sock", ttl_s=60))
    envoy = Process([str(ENVOY), "-c", str(config), "--disable-hot-restart", "--log-level", "info"],
                    tmp_path / "envoy.log").start()
    try:
        # Envoy is up (its admin answers) but has no certificate: the inbound
        # listener is not even bound, so nothing can connect, in TLS or not.
        wait_for(lambda: not _refused(("127.0.0.1", admin_port)), "Envoy's admin", logs=(tmp_path / "envoy.log",))
        assert _refused(("127.0.0.1", inbound_port))
        with pytest.raises(ProbeError):
            grpc_unary(f"127.0.0.1:{inbound_port}", "/shopmesh.payments.v1.Payments/Tokenize", tls=False)

        with run_ca_server(tmp_path / "state", ttl="1m") as ca:
            from pki.tokens import create_join_token, write_token_file

            spiffe_id = topology.spiffe_id_for("payments")
            write_token_file(pod_dir / "join-token", create_join_token(ca.state_dir, spiffe_id))
            agent = start_agent(spiffe_id, ca, pod_dir)
            try:
                # Once the agent serves the SVID over SDS, the listener opens —
                # with mutual TLS only.
                wait_for(lambda: not _refused(("127.0.0.1", inbound_port)), "the inbound listener to open",
                         timeout=30, logs=(tmp_path / "envoy.log", agent.process.log_path))
                with pytest.raises(ProbeError):
                    grpc_unary(f"127.0.0.1:{inbound_port}", "/shopmesh.payments.v1.Payments/Tokenize", tls=False)
                with pytest.raises(ProbeError):
                    grpc_unary(f"127.0.0.1:{inbound_port}", "/shopmesh.payments.v1.Payments/Tokenize")
            finally:
                agent.process.stop()
    finally:
        envoy.stop()
