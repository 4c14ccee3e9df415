"""The CA server: issues X.509-SVIDs over gRPC, from the local CA or ACM Private CA.

    python -m pki.ca_server --state-dir D --join-listen HOST:PORT --renew-listen HOST:PORT --ttl 10s \\
        [--ca local | --ca acm-pca (--pca-arn ARN | --pca-create) [--pca-mode upstream|direct]]

Two ports, because a Python gRPC server cannot make client certificates
optional per method:

- JOIN (server-authenticated TLS): Join trades a one-time join token for a
  workload SVID and an agent SVID; GetBundle and WatchBundle serve the trust
  bundle. Without a valid token an anonymous caller gets nothing.
- RENEW (mutual TLS, client certificate verified against the bundle): an
  agent presents its agent SVID; Renew issues a new workload SVID for exactly
  the workload its join token was bound to (even if the previous one expired),
  RenewAgent a new agent SVID.

A third, local listener serves the CaAdmin API (CA rotation) on a Unix socket
in the CA state directory (0600): `shopmesh ca rotate` uses it.

The server's own TLS certificate (URI SAN spiffe://<td>/shopmesh/ca-server,
DNS SAN ca.shopmesh.internal) comes from the same backend; its key lives only
in memory. It is replaced when the signing authority changes (CA rotation)
and at half its life, without a restart: every new TLS handshake picks up
the current certificate and trust bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pki import db, flags
from pki.authority import pem, serial_hex, verify_svid_chain, write_public_file
from pki.backends import BackendState, CaBackend, Profile
from pki.ca import BUNDLE_FILE, CA_SERVER_DNS_NAME, check_csr_for, csr_spiffe_id, load_csr
from pki.errors import (
    CaNotUsableError,
    CaResponseError,
    CaStateError,
    CsrError,
    InvalidSpiffeIdError,
    IssuanceError,
    JoinTokenError,
    JoinTokenIdentityError,
    PkiError,
    RotationError,
    SvidError,
)
from pki.spiffe_ids import DEFAULT_TRUST_DOMAIN, agent_id_for, check_workload_id, workload_id_for_agent
from pki.tokens import JoinTokenStore
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc
from shopmesh.topology import CA_JOIN_PORT, CA_RENEW_PORT

log = logging.getLogger("pki.ca_server")

SERVICE_NAME = "shopmesh.ca.v1.CertificateAuthority"
# Smallest TTL accepted: below this an agent spends more time renewing than serving.
MIN_TTL = timedelta(seconds=2)
# Agent SVIDs outlive many workload SVIDs, so a CA outage longer than the
# workload TTL only delays renewal (ACCEPTANCE row 22): SPIRE's agent SVIDs
# are likewise much longer-lived than workload SVIDs.
MIN_AGENT_TTL = timedelta(hours=1)
AGENT_TTL_FACTOR = 30
SERVER_CERT_TTL = timedelta(hours=24)
MAINTAIN_INTERVAL_S = 5.0
SHUTDOWN_GRACE_S = 5.0
CA_CHOICES = ("local", "acm-pca")

T = TypeVar("T")


def ca_server_spiffe_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/shopmesh/ca-server"


def default_agent_ttl(ttl: timedelta) -> timedelta:
    return max(MIN_AGENT_TTL, AGENT_TTL_FACTOR * ttl)


def _timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


class TlsMaterial:
    """The CA server's TLS key, certificate and client trust roots, swappable while serving.

    gRPC calls each port's fetcher on a core thread at every new handshake;
    it returns a new configuration only when something changed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._key_pem = b""
        self._chain_pem = b""
        self._bundle_pem = b""
        self.not_after: datetime | None = None
        self.not_before: datetime | None = None
        self.authority = ""

    def update(self, key_pem: bytes, chain: list[x509.Certificate], bundle_pem: bytes, authority: str) -> None:
        with self._lock:
            self._key_pem, self._chain_pem, self._bundle_pem = key_pem, pem(chain), bundle_pem
            self.not_before, self.not_after = chain[0].not_valid_before_utc, chain[0].not_valid_after_utc
            self.authority = authority
            self._version += 1

    def set_bundle(self, bundle_pem: bytes) -> None:
        with self._lock:
            self._bundle_pem = bundle_pem
            self._version += 1

    def _config(self, client_auth: bool) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._key_pem, self._chain_pem)], root_certificates=self._bundle_pem if client_auth else None
        )

    def credentials(self, client_auth: bool) -> grpc.ServerCredentials:
        with self._lock:
            initial, served = self._config(client_auth), self._version
        state = {"served": served}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                if self._version == state["served"]:
                    return None
                state["served"] = self._version
                return self._config(client_auth)

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=client_auth)


@dataclass(frozen=True)
class Config:
    state_dir: Path
    join_listen: tuple[str, int]
    renew_listen: tuple[str, int]
    ttl: timedelta
    agent_ttl: timedelta
    trust_domain: str
    log_level: str
    ca: str = "local"
    pca_arn: str | None = None
    pca_mode: str = "upstream"
    pca_create: bool = False
    admin_socket: Path | None = None

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.state_dir / "ca" / "admin.sock"


def open_backend(config: Config) -> CaBackend:
    if config.ca == "acm-pca":
        from pki.backends import acm_pca

        return acm_pca.open_backend(
            config.state_dir, config.trust_domain, config.pca_arn, config.pca_create, config.pca_mode, config.agent_ttl
        )
    from pki.backends.local import LocalBackend

    return LocalBackend(config.state_dir, config.trust_domain)


class CertificateAuthority:
    """The CA's state shared by the gRPC services: backend, bundle, TLS material, watchers."""

    def __init__(self, config: Config, backend: CaBackend) -> None:
        self.config = config
        self.backend = backend
        self.trust_domain = config.trust_domain
        self.tls = TlsMaterial()
        self.state: BackendState = backend.state()
        self._changed = asyncio.Condition()
        self._generation = 0
        self._closing = False

    @property
    def bundle_pem(self) -> str:
        return pem(self.state.bundle).decode()

    @property
    def generation(self) -> int:
        return self._generation

    def issue_server_certificate(self) -> None:
        """A fresh key (memory only) and a certificate for the CA server from the backend."""
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe_id = ca_server_spiffe_id(self.trust_domain)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, CA_SERVER_DNS_NAME)]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe_id), x509.DNSName(CA_SERVER_DNS_NAME)]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        chain = self.backend.issue(csr, spiffe_id, SERVER_CERT_TTL, Profile.SERVER, (CA_SERVER_DNS_NAME,))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.tls.update(key_pem, chain, self.bundle_pem.encode(), self.state.signing_authority)
        log.info("CA server certificate serial %s, valid until %s", serial_hex(chain[0]), chain[0].not_valid_after_utc.isoformat())

    def write_bundle(self) -> None:
        write_public_file(self.config.state_dir / "ca" / BUNDLE_FILE, self.bundle_pem.encode())

    async def refresh(self) -> None:
        """Pick up a new backend state: bundle file, server certificate, and every WatchBundle stream."""
        new = await asyncio.to_thread(self.backend.state)
        old = self.state
        self.state = new
        if new.key == old.key:
            return
        await asyncio.to_thread(self.write_bundle)
        if new.signing_authority != self.tls.authority:
            await asyncio.to_thread(self.issue_server_certificate)
        else:
            # Same server certificate, new client trust roots for the renew port.
            self.tls.set_bundle(self.bundle_pem.encode())
        log.info(
            "trust bundle now %s; signing authority %s",
            ", ".join(f[:16] for f in new.bundle_fingerprints),
            new.signing_authority[:16],
        )
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    async def wait_changed(self, seen: int) -> int | None:
        """The new generation once the bundle changed; None when the server is closing."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._generation != seen or self._closing)
            return None if self._closing else self._generation

    async def close(self) -> None:
        """End every WatchBundle stream, so that stopping does not wait out the
        grace period on them (agents reconnect to the next CA server)."""
        async with self._changed:
            self._closing = True
            self._changed.notify_all()

    async def maintain_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), MAINTAIN_INTERVAL_S)
                return
            except asyncio.TimeoutError:
                pass
            try:
                if await asyncio.to_thread(self.backend.maintain):
                    await self.refresh()
                tls = self.tls
                if tls.not_after and tls.not_before:
                    half = tls.not_before + (tls.not_after - tls.not_before) / 2
                    if datetime.now(timezone.utc) >= half:
                        await asyncio.to_thread(self.issue_server_certificate)
            except PkiError as err:
                log.warning("CA upkeep failed, retrying in %gs: %s", MAINTAIN_INTERVAL_S, err)


class CertificateAuthorityServicer(ca_pb2_grpc.CertificateAuthorityServicer):
    """Join, Renew, RenewAgent, GetBundle and WatchBundle; the same instance serves both ports."""

    def __init__(self, ca: CertificateAuthority, tokens: JoinTokenStore) -> None:
        self._ca = ca
        self._tokens = tokens
        self._ttl = ca.config.ttl
        self._agent_ttl = ca.config.agent_ttl

    async def Join(self, request: ca_pb2.JoinRequest, context: grpc.aio.ServicerContext) -> ca_pb2.SvidResponse:
        spiffe_id = request.spiffe_id
        try:
            check_workload_id(spiffe_id, self._ca.trust_domain)
            agent_id = agent_id_for(spiffe_id)
            if not request.agent_csr_pem:
                raise CsrError("Join needs agent_csr_pem: a CSR for the agent SVID, signed by a second new key")
            # Check the request and the token before spending anything: a typo
            # in a CSR must not burn a single-use token, and an anonymous
            # caller must not make the CA call ACM PCA.
            csr = check_csr_for(request.csr_pem, spiffe_id)
            agent_csr = check_csr_for(request.agent_csr_pem, agent_id)
            if csr.public_key() == agent_csr.public_key():
                raise CsrError("the workload and agent CSRs use the same key; the agent key must never reach Envoy")
            self._tokens.check(request.join_token, spiffe_id)
        except (InvalidSpiffeIdError, CsrError) as err:
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.INVALID_ARGUMENT, err)
        except JoinTokenIdentityError as err:
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.PERMISSION_DENIED, err)
        except JoinTokenError as err:
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.UNAUTHENTICATED, err)
        workload = await self._issue(csr, spiffe_id, self._ttl, "Join", context)
        agent = await self._issue(agent_csr, agent_id, self._agent_ttl, "Join", context)
        try:
            self._tokens.redeem(request.join_token, spiffe_id)
        except JoinTokenError as err:
            # Lost a race with another Join of the same token: what we issued
            # is never handed out.
            await self._refuse(context, "Join", spiffe_id, grpc.StatusCode.UNAUTHENTICATED, err)
        self._record(workload, spiffe_id, "join", context)
        self._record(agent, agent_id, "join", context)
        response = self._response(spiffe_id, workload)
        response.agent_spiffe_id = agent_id
        response.agent_cert_chain_pem = pem(agent).decode()
        response.agent_serial = serial_hex(agent[0])
        return response

    async def _agent_peer(self, context: grpc.aio.ServicerContext, method: str) -> str:
        """The verified agent SPIFFE ID of the client certificate, or abort."""
        auth = context.auth_context()
        peer_certs = auth.get("x509_pem_cert")
        if not peer_certs:
            await self._refuse(
                context, method, "(no client certificate)", grpc.StatusCode.UNAUTHENTICATED,
                PkiError(f"{method} needs mutual TLS with your agent SVID: call the CA's renew port"),
            )  # fmt: skip
        peer_id = "(unverified)"
        try:
            # The TLS layer already verified the chain against the bundle and
            # the validity period; check again here so that this handler is
            # safe even if it is ever mounted behind a laxer listener.
            chain = [x509.load_pem_x509_certificate(peer_certs[0])]
            presented = b"".join(auth.get("x509_pem_cert_chain") or [])
            extra = x509.load_pem_x509_certificates(presented)[1:] if presented else []
            state = self._ca.state
            peer_id = verify_svid_chain(chain + extra, state.bundle, self._ca.trust_domain, None, state.intermediates)
        except (SvidError, ValueError) as err:
            await self._refuse(context, method, peer_id, grpc.StatusCode.UNAUTHENTICATED, err)
        if workload_id_for_agent(peer_id, self._ca.trust_domain) is None:
            await self._refuse(
                context, method, peer_id, grpc.StatusCode.PERMISSION_DENIED,
                PkiError(
                    f"'{peer_id}' is not an agent SVID: renewals need the agent's own certificate "
                    "(spiffe://<trust domain>/shopmesh/agent/…), which only Join hands out"
                ),
            )  # fmt: skip
        return peer_id

    async def _renewal_csr(self, context: grpc.aio.ServicerContext, method: str, peer: str, csr_pem: str, subject: str) -> x509.CertificateSigningRequest:
        try:
            csr = load_csr(csr_pem)
            asked = csr_spiffe_id(csr)
        except CsrError as err:
            await self._refuse(context, method, peer, grpc.StatusCode.INVALID_ARGUMENT, err)
        if asked is not None and asked != subject:
            await self._refuse(
                context, method, peer, grpc.StatusCode.PERMISSION_DENIED,
                PkiError(f"your agent SVID '{peer}' may renew '{subject}' only, but the CSR asks for '{asked}'"),
            )  # fmt: skip
        return csr

    async def Renew(self, request: ca_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> ca_pb2.SvidResponse:
        peer = await self._agent_peer(context, "Renew")
        workload = workload_id_for_agent(peer, self._ca.trust_domain)
        assert workload is not None
        csr = await self._renewal_csr(context, "Renew", peer, request.csr_pem, workload)
        chain = await self._issue(csr, workload, self._ttl, "Renew", context)
        self._record(chain, workload, "renew", context)
        return self._response(workload, chain)

    async def RenewAgent(self, request: ca_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> ca_pb2.SvidResponse:
        peer = await self._agent_peer(context, "RenewAgent")
        csr = await self._renewal_csr(context, "RenewAgent", peer, request.csr_pem, peer)
        chain = await self._issue(csr, peer, self._agent_ttl, "RenewAgent", context)
        self._record(chain, peer, "renew-agent", context)
        return self._response(peer, chain)

    def _bundle_response(self) -> ca_pb2.GetBundleResponse:
        return ca_pb2.GetBundleResponse(bundle_pem=self._ca.bundle_pem, signing_authority=self._ca.state.signing_authority)

    async def GetBundle(
        self, request: ca_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetBundleResponse:
        return self._bundle_response()

    async def WatchBundle(
        self, request: ca_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ca_pb2.GetBundleResponse]:
        seen: int | None = self._ca.generation
        yield self._bundle_response()
        while True:
            seen = await self._ca.wait_changed(seen)
            if seen is None:
                return
            yield self._bundle_response()

    async def _issue(
        self, csr: x509.CertificateSigningRequest, spiffe_id: str, ttl: timedelta, method: str, context: grpc.aio.ServicerContext
    ) -> list[x509.Certificate]:
        try:
            return await asyncio.to_thread(self._ca.backend.issue, csr, spiffe_id, ttl)
        except CaNotUsableError as err:
            await self._refuse(context, method, spiffe_id, grpc.StatusCode.FAILED_PRECONDITION, err)
        except CaResponseError as err:
            await self._refuse(context, method, spiffe_id, grpc.StatusCode.INTERNAL, err)
        except (IssuanceError, CaStateError) as err:
            await self._refuse(context, method, spiffe_id, grpc.StatusCode.UNAVAILABLE, err)

    def _record(self, chain: list[x509.Certificate], spiffe_id: str, method: str, context: grpc.aio.ServicerContext) -> None:
        leaf = chain[0]
        serial = serial_hex(leaf)
        db.record_issuance(self._ca.config.state_dir, serial, spiffe_id, method, leaf.not_valid_after_utc.timestamp())
        log.info(
            "issued SVID spiffe_id=%s serial=%s not_after=%s via=%s peer=%s",
            spiffe_id, serial, leaf.not_valid_after_utc.isoformat(), method, context.peer(),
        )  # fmt: skip

    def _response(self, spiffe_id: str, chain: list[x509.Certificate]) -> ca_pb2.SvidResponse:
        return ca_pb2.SvidResponse(
            spiffe_id=spiffe_id,
            cert_chain_pem=pem(chain).decode(),
            bundle_pem=self._ca.bundle_pem,
            not_after=_timestamp(chain[0].not_valid_after_utc),
            serial=serial_hex(chain[0]),
        )

    @staticmethod
    async def _refuse(
        context: grpc.aio.ServicerContext, method: str, spiffe_id: str, code: grpc.StatusCode, err: Exception
    ) -> NoReturn:
        # Inputs are echoed in messages; keep each log line one line.
        message = str(err).replace("\r", "\\r").replace("\n", "\\n")
        log.warning(
            "refused %s spiffe_id=%s peer=%s: %s: %s",
            method, spiffe_id.replace("\n", "\\n"), context.peer(), code.name, message,
        )  # fmt: skip
        await context.abort(code, message)


class CaAdminServicer(ca_pb2_grpc.CaAdminServicer):
    """CA rotation steps, on the local admin socket only."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca

    def _response(self) -> ca_pb2.AuthoritiesResponse:
        state = self._ca.state
        return ca_pb2.AuthoritiesResponse(
            backend=self._ca.backend.name,
            authorities=[
                ca_pb2.Authority(
                    fingerprint=a.fingerprint,
                    role=a.role,
                    subject=a.subject,
                    not_after=_timestamp(a.not_after),
                    trust_anchor_fingerprint=a.trust_anchor_fingerprint,
                )
                for a in state.authorities
            ],
            bundle_fingerprints=state.bundle_fingerprints,
            signing_authority=state.signing_authority,
        )

    async def _step(self, step: Callable[[], None], name: str, context: grpc.aio.ServicerContext) -> ca_pb2.AuthoritiesResponse:
        try:
            await asyncio.to_thread(step)
        except RotationError as err:
            log.warning("refused CA rotation step %s: %s", name, err)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except IssuanceError as err:
            log.warning("CA rotation step %s failed: %s", name, err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        await self._ca.refresh()
        log.info("CA rotation step %s done", name)
        return self._response()

    async def GetAuthorities(self, request: ca_pb2.GetAuthoritiesRequest, context: grpc.aio.ServicerContext) -> ca_pb2.AuthoritiesResponse:
        return self._response()

    async def PrepareAuthority(self, request: ca_pb2.GetAuthoritiesRequest, context: grpc.aio.ServicerContext) -> ca_pb2.AuthoritiesResponse:
        return await self._step(self._ca.backend.prepare, "prepare", context)

    async def ActivateAuthority(self, request: ca_pb2.GetAuthoritiesRequest, context: grpc.aio.ServicerContext) -> ca_pb2.AuthoritiesResponse:
        return await self._step(self._ca.backend.activate, "activate", context)

    async def RetireAuthorities(self, request: ca_pb2.GetAuthoritiesRequest, context: grpc.aio.ServicerContext) -> ca_pb2.AuthoritiesResponse:
        return await self._step(self._ca.backend.retire, "retire", context)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m pki.ca_server", description="The ShopMesh CA server.")
    parser.add_argument("--state-dir", type=Path, required=True, help="CA state (keys, database) goes to STATE/ca")
    parser.add_argument(
        "--join-listen",
        type=flags.host_port,
        default=f"127.0.0.1:{CA_JOIN_PORT}",
        help=f"Join/GetBundle/WatchBundle, server-authenticated TLS (default 127.0.0.1:{CA_JOIN_PORT})",
    )
    parser.add_argument(
        "--renew-listen",
        type=flags.host_port,
        default=f"127.0.0.1:{CA_RENEW_PORT}",
        help=f"Renew/RenewAgent, mutual TLS (default 127.0.0.1:{CA_RENEW_PORT})",
    )
    parser.add_argument("--ttl", type=flags.duration, default="5m", help="workload SVID lifetime, e.g. 10s, 5m (default 5m)")
    parser.add_argument(
        "--agent-ttl", type=flags.duration,
        help=f"agent SVID lifetime (default: the larger of {MIN_AGENT_TTL.seconds // 3600}h and {AGENT_TTL_FACTOR} × --ttl)",
    )  # fmt: skip
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    parser.add_argument("--ca", choices=CA_CHOICES, default="local", help="who signs: the local CA (default) or ACM Private CA")
    parser.add_argument("--pca-arn", help="ACM PCA to use (--ca acm-pca)")
    parser.add_argument("--pca-mode", choices=("upstream", "direct"), default="upstream",
                        help="upstream: PCA signs the mesh intermediate (default); direct: PCA signs every leaf")
    parser.add_argument("--pca-create", action="store_true",
                        help="create a root PCA (or reuse the one created earlier for this state directory)")
    parser.add_argument("--admin-socket", type=Path, help="CaAdmin Unix socket (default STATE/ca/admin.sock)")
    parser.add_argument("--log-level", choices=flags.LOG_LEVELS, default="info")
    args = parser.parse_args(argv)
    if args.ttl < MIN_TTL:
        parser.error(f"argument --ttl: {args.ttl.total_seconds():g}s is below the minimum of {MIN_TTL.seconds}s")
    agent_ttl = args.agent_ttl or default_agent_ttl(args.ttl)
    if agent_ttl < MIN_TTL:
        parser.error(f"argument --agent-ttl: {agent_ttl.total_seconds():g}s is below the minimum of {MIN_TTL.seconds}s")
    if args.join_listen == args.renew_listen:
        parser.error("argument --renew-listen: must differ from --join-listen")
    if args.ca == "acm-pca":
        if args.pca_arn and args.pca_create:
            parser.error("argument --pca-create: not allowed with --pca-arn (use one or the other)")
        if not args.pca_arn and not args.pca_create:
            parser.error("argument --pca-arn: required with --ca acm-pca (or --pca-create to create a PCA)")
        if args.pca_arn:
            from pki.backends.acm_pca import parse_arn

            try:
                parse_arn(args.pca_arn)
            except ValueError as err:
                parser.error(f"argument --pca-arn: {err}")
    else:
        given = [f for f, v in (("--pca-arn", args.pca_arn), ("--pca-create", args.pca_create)) if v]
        if given:
            parser.error(f"argument {given[0]}: only with --ca acm-pca")
    return Config(
        state_dir=args.state_dir,
        join_listen=args.join_listen,
        renew_listen=args.renew_listen,
        ttl=args.ttl,
        agent_ttl=agent_ttl,
        trust_domain=args.trust_domain,
        log_level=args.log_level,
        ca=args.ca,
        pca_arn=args.pca_arn,
        pca_mode=args.pca_mode,
        pca_create=args.pca_create,
        admin_socket=args.admin_socket,
    )


async def serve(config: Config) -> int:
    (config.state_dir / "ca").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(config.state_dir / "ca", 0o700)
    backend = await asyncio.to_thread(open_backend, config)
    ca = CertificateAuthority(config, backend)
    tokens = JoinTokenStore(config.state_dir, config.trust_domain)
    await asyncio.to_thread(ca.issue_server_certificate)
    ca.write_bundle()
    servicer = CertificateAuthorityServicer(ca, tokens)

    health_servicer = health.aio.HealthServicer()
    servers: list[grpc.aio.Server] = []
    for address, client_auth in ((config.join_listen, False), (config.renew_listen, True)):
        server = grpc.aio.server()
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            server.add_secure_port(flags.format_host_port(address), ca.tls.credentials(client_auth))
        except RuntimeError as err:
            log.error("cannot listen on %s: %s", flags.format_host_port(address), err)
            return 1
        servers.append(server)
    admin = grpc.aio.server()
    ca_pb2_grpc.add_CaAdminServicer_to_server(CaAdminServicer(ca), admin)
    admin_path = config.admin_socket_path
    admin_path.unlink(missing_ok=True)  # a stale socket from a killed server
    old_umask = os.umask(0o077)  # the socket is created 0600: whoever opens it can rotate the CA
    try:
        admin.add_insecure_port(f"unix:{admin_path}")
        servers.append(admin)
        for server in servers:
            await server.start()
    except RuntimeError as err:
        log.error("cannot listen on unix:%s: %s", admin_path, err)
        return 1
    finally:
        os.umask(old_umask)
    os.chmod(admin_path, 0o600)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "CA server for %s (%s) serving: join %s (TLS), renew %s (mTLS), admin unix:%s, "
        "SVID TTL %gs, agent SVID TTL %gs, bundle %s",
        config.trust_domain,
        backend.name,
        flags.format_host_port(config.join_listen),
        flags.format_host_port(config.renew_listen),
        admin_path,
        config.ttl.total_seconds(),
        config.agent_ttl.total_seconds(),
        config.state_dir / "ca" / BUNDLE_FILE,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    upkeep = asyncio.create_task(ca.maintain_loop(stop))
    await stop.wait()
    log.info("stopping: health NOT_SERVING, %gs grace for in-flight calls", SHUTDOWN_GRACE_S)
    await health_servicer.enter_graceful_shutdown()
    await ca.close()
    await asyncio.gather(*(s.stop(SHUTDOWN_GRACE_S) for s in servers))
    await upkeep
    admin_path.unlink(missing_ok=True)
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
