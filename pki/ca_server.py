"""The CA server: issues X.509-SVIDs over gRPC.

    python -m pki.ca_server --state-dir D --join-listen HOST:PORT --renew-listen HOST:PORT --ttl 10s

Two ports, because a Python gRPC server cannot make client certificates
optional per method:

- JOIN (server-authenticated TLS): Join trades a one-time join token for an
  SVID; GetBundle returns the trust bundle. Without a valid token an
  anonymous caller gets nothing.
- RENEW (mutual TLS, client certificate verified against the bundle): Renew
  issues a new SVID for exactly the identity of the client certificate.

Both ports serve grpc.health.v1. The server's own TLS certificate is issued by
the same root at start-up (URI SAN spiffe://<td>/shopmesh/ca-server, DNS SAN
ca.shopmesh.internal); its key lives only in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pki import db, flags
from pki.ca import CA_SERVER_DNS_NAME, LocalCA, csr_spiffe_id, load_csr, serial_hex
from pki.errors import (
    CsrError,
    InvalidSpiffeIdError,
    JoinTokenError,
    JoinTokenIdentityError,
    PkiError,
    SvidError,
)
from pki.spiffe_ids import DEFAULT_TRUST_DOMAIN
from pki.tokens import JoinTokenStore
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc
from shopmesh.topology import CA_JOIN_PORT, CA_RENEW_PORT

log = logging.getLogger("pki.ca_server")

SERVICE_NAME = "shopmesh.ca.v1.CertificateAuthority"
# Smallest TTL accepted: below this an agent spends more time renewing than serving.
MIN_TTL = timedelta(seconds=2)
SHUTDOWN_GRACE_S = 5.0


def ca_server_spiffe_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/shopmesh/ca-server"


class CertificateAuthorityServicer(ca_pb2_grpc.CertificateAuthorityServicer):
    """Join, Renew and GetBundle over one LocalCA; the same instance serves both ports."""

    def __init__(self, ca: LocalCA, tokens: JoinTokenStore, ttl: timedelta) -> None:
        self._ca = ca
        self._tokens = tokens
        self._ttl = ttl
        self._reserved_ids = {ca_server_spiffe_id(ca.trust_domain)}

    async def Join(self, request: ca_pb2.JoinRequest, context: grpc.aio.ServicerContext) -> ca_pb2.SvidResponse:
        spiffe_id = request.spiffe_id
        try:
            if spiffe_id in self._reserved_ids:
                raise InvalidSpiffeIdError(f"invalid SPIFFE ID '{spiffe_id}': reserved for the CA server")
            # Check the request before spending the token: a typo in the CSR
            # must not burn a single-use token.
            self._ca.check_csr(request.csr_pem, spiffe_id)
            self._tokens.redeem(request.join_token, spiffe_id)
        except (InvalidSpiffeIdError, CsrError) as err:
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.INVALID_ARGUMENT, err)
        except JoinTokenIdentityError as err:
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.PERMISSION_DENIED, err)
        except JoinTokenError as err:
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.UNAUTHENTICATED, err)
        return self._issue(request.csr_pem, spiffe_id, "join", context)

    async def Renew(self, request: ca_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> ca_pb2.SvidResponse:
        peer_certs = context.auth_context().get("x509_pem_cert")
        if not peer_certs:
            await self._refuse(
                context,
                "Renew",
                "(no client certificate)",
                grpc.StatusCode.UNAUTHENTICATED,
                PkiError("Renew needs mutual TLS with your current SVID: call the CA's renew port"),
            )
        spiffe_id = "(unverified)"
        try:
            # The TLS layer already verified the chain against the bundle and
            # the validity period; check again here so that this handler is
            # safe even if it is ever mounted behind a laxer listener.
            peer = x509.load_pem_x509_certificate(peer_certs[0])
            spiffe_id = self._ca.verify_peer_svid(peer)
            if spiffe_id in self._reserved_ids:
                raise SvidError(f"'{spiffe_id}' is the CA server's own identity, not a workload")
        except (SvidError, ValueError) as err:
            await self._refuse(context, "Renew", spiffe_id, grpc.StatusCode.UNAUTHENTICATED, err)
        try:
            csr = load_csr(request.csr_pem)
            asked = csr_spiffe_id(csr)
        except CsrError as err:
            await self._refuse(context, "Renew", spiffe_id, grpc.StatusCode.INVALID_ARGUMENT, err)
        if asked is not None and asked != spiffe_id:
            await self._refuse(
                context,
                "Renew",
                spiffe_id,
                grpc.StatusCode.PERMISSION_DENIED,
                PkiError(f"your certificate identifies you as '{spiffe_id}' but the CSR asks for '{asked}'"),
            )
        return self._issue(request.csr_pem, spiffe_id, "renew", context)

    async def GetBundle(
        self, request: ca_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetBundleResponse:
        return ca_pb2.GetBundleResponse(bundle_pem=self._ca.bundle_pem)

    def _issue(
        self, csr_pem: str, spiffe_id: str, method: str, context: grpc.aio.ServicerContext
    ) -> ca_pb2.SvidResponse:
        chain_pem, bundle_pem = self._ca.issue_svid(csr_pem, spiffe_id, self._ttl)
        leaf = x509.load_pem_x509_certificate(chain_pem.encode())
        serial = serial_hex(leaf)
        not_after = leaf.not_valid_after_utc
        db.record_issuance(self._ca.state_dir, serial, spiffe_id, method, not_after.timestamp())
        log.info(
            "issued SVID spiffe_id=%s serial=%s not_after=%s via=%s peer=%s",
            spiffe_id,
            serial,
            not_after.isoformat(),
            method,
            context.peer(),
        )
        ts = Timestamp()
        ts.FromDatetime(not_after)
        return ca_pb2.SvidResponse(
            spiffe_id=spiffe_id, cert_chain_pem=chain_pem, bundle_pem=bundle_pem, not_after=ts, serial=serial
        )

    @staticmethod
    async def _refuse(
        context: grpc.aio.ServicerContext, method: str, spiffe_id: str, code: grpc.StatusCode, err: Exception
    ) -> NoReturn:
        # Inputs are echoed in messages; keep each log line one line.
        message = str(err).replace("\r", "\\r").replace("\n", "\\n")
        log.warning(
            "refused %s spiffe_id=%s peer=%s: %s: %s",
            method,
            spiffe_id.replace("\n", "\\n"),
            context.peer(),
            code.name,
            message,
        )
        await context.abort(code, message)


@dataclass(frozen=True)
class Config:
    state_dir: Path
    join_listen: tuple[str, int]
    renew_listen: tuple[str, int]
    ttl: timedelta
    trust_domain: str
    log_level: str


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m pki.ca_server", description="The ShopMesh CA server.")
    parser.add_argument("--state-dir", type=Path, required=True, help="CA state (keys, database) goes to STATE/ca")
    parser.add_argument(
        "--join-listen",
        type=flags.host_port,
        default=f"127.0.0.1:{CA_JOIN_PORT}",
        help=f"Join/GetBundle, server-authenticated TLS (default 127.0.0.1:{CA_JOIN_PORT})",
    )
    parser.add_argument(
        "--renew-listen",
        type=flags.host_port,
        default=f"127.0.0.1:{CA_RENEW_PORT}",
        help=f"Renew, mutual TLS (default 127.0.0.1:{CA_RENEW_PORT})",
    )
    parser.add_argument("--ttl", type=flags.duration, default="5m", help="SVID lifetime, e.g. 10s, 5m (default 5m)")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    parser.add_argument("--log-level", choices=flags.LOG_LEVELS, default="info")
    args = parser.parse_args(argv)
    if args.ttl < MIN_TTL:
        parser.error(f"argument --ttl: {args.ttl.total_seconds():g}s is below the minimum of {MIN_TTL.seconds}s")
    if args.join_listen == args.renew_listen:
        parser.error("argument --renew-listen: must differ from --join-listen")
    return Config(
        state_dir=args.state_dir,
        join_listen=args.join_listen,
        renew_listen=args.renew_listen,
        ttl=args.ttl,
        trust_domain=args.trust_domain,
        log_level=args.log_level,
    )


def _server_credentials(ca: LocalCA) -> tuple[bytes, bytes]:
    """A fresh key (memory only) and a certificate for it, valid as long as the root."""
    key = ec.generate_private_key(ec.SECP256R1())
    remaining = ca.root_cert.not_valid_after_utc - ca.root_cert.not_valid_before_utc
    cert = ca.issue_server_certificate(
        key.public_key(), ca_server_spiffe_id(ca.trust_domain), [CA_SERVER_DNS_NAME], remaining
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


async def serve(config: Config) -> int:
    ca = LocalCA.load_or_create(config.state_dir, config.trust_domain)
    tokens = JoinTokenStore(config.state_dir, config.trust_domain)
    servicer = CertificateAuthorityServicer(ca, tokens, config.ttl)
    key_pem, cert_pem = _server_credentials(ca)
    bundle = ca.bundle_pem.encode()

    health_servicer = health.aio.HealthServicer()
    servers: list[grpc.aio.Server] = []
    listeners = (
        (config.join_listen, grpc.ssl_server_credentials([(key_pem, cert_pem)])),
        (
            config.renew_listen,
            grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=bundle, require_client_auth=True),
        ),
    )
    for address, credentials in listeners:
        server = grpc.aio.server()
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            server.add_secure_port(flags.format_host_port(address), credentials)
        except RuntimeError as err:
            log.error("cannot listen on %s: %s", flags.format_host_port(address), err)
            return 1
        servers.append(server)
    for server in servers:
        await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "CA server for %s serving: join %s (TLS), renew %s (mTLS), SVID TTL %gs, bundle %s",
        ca.trust_domain,
        flags.format_host_port(config.join_listen),
        flags.format_host_port(config.renew_listen),
        config.ttl.total_seconds(),
        ca.bundle_path,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: health NOT_SERVING, %gs grace for in-flight calls", SHUTDOWN_GRACE_S)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(*(s.stop(SHUTDOWN_GRACE_S) for s in servers))
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    flags.setup_logging(config.log_level)
    try:
        return asyncio.run(serve(config))
    except PkiError as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
