"""Envoy's Secret Discovery Service (SDS v3, state-of-the-world) over the agent's Unix socket.

Resource names are the ones SPIRE and Istio serve, so a real SPIRE agent can
replace this one without touching the Envoy config:
    "default"  tls_certificate: the workload's certificate chain and private key
    "ROOTCA"   validation_context: the trust bundle

Protocol, as Envoy speaks it: each SDS subscription opens a StreamSecrets
stream and sends a DiscoveryRequest naming its resources. We answer with the
resources we have (never with names it did not ask for), each response with a
version_info derived from its content and a fresh nonce. Envoy ACKs (same
nonce, no error_detail) or NACKs (error_detail set). When the SVID rotates,
every open stream whose content changed gets the new version at once; Envoy
swaps it in without a restart. Until the first SVID exists we answer nothing,
so Envoy's listeners stay warming (no TLS, never plaintext).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import CertificateValidationContext, TlsCertificate
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf.any_pb2 import Any

log = logging.getLogger("pki.sds")

CERT_RESOURCE = "default"
BUNDLE_RESOURCE = "ROOTCA"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class _Resource:
    secret: Secret
    version: str


class _Update:
    """Queued to a stream when the secrets changed."""


class _Closed:
    """Queued to a stream when Envoy closed its side."""


class SecretDiscoveryServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """Serves the current SVID and bundle; call set_svid() after every rotation."""

    def __init__(self) -> None:
        self._resources: dict[str, _Resource] = {}
        self._streams: set[asyncio.Queue[DiscoveryRequest | _Update | _Closed]] = set()
        # Per open stream: the version last sent and the version Envoy last ACKed.
        self._sync: dict[int, tuple[str | None, str | None]] = {}
        self._nonces = itertools.count(1)
        self.nacks = 0

    def set_svid(self, cert_chain_pem: bytes, private_key_pem: bytes, bundle_pem: bytes) -> None:
        """Replace the served certificate and bundle and push them to every open stream."""
        self._set(_certificate_secret(cert_chain_pem, private_key_pem), _bundle_secret(bundle_pem))

    def set_bundle(self, bundle_pem: bytes) -> None:
        """Replace only the trust bundle (ROOTCA), e.g. when the CA publishes a new root."""
        self._set(_bundle_secret(bundle_pem))

    def _set(self, *secrets: Secret) -> None:
        resources = dict(self._resources)
        for secret in secrets:
            resources[secret.name] = _Resource(secret, _content_version(secret))
        self._resources = resources
        for queue in self._streams:
            queue.put_nowait(_Update())

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def synced(self) -> bool:
        """Every open stream has ACKed the content it was last sent, and nothing newer is pending.

        With Envoy connected, True means Envoy applies the current certificate
        and bundle (what `shopmesh ca rotate` waits for between its steps).
        """
        return bool(self._sync) and all(sent is not None and sent == acked for sent, acked in self._sync.values())

    def _response(self, names: Iterable[str]) -> DiscoveryResponse | None:
        wanted = list(names) or sorted(self._resources)  # no names: a wildcard request
        found = [self._resources[n] for n in wanted if n in self._resources]
        if not found:
            return None
        version = "-".join(r.version for r in found)
        resources = []
        for r in found:
            packed = Any()
            packed.Pack(r.secret)
            resources.append(packed)
        return DiscoveryResponse(
            version_info=version, resources=resources, type_url=SECRET_TYPE_URL, nonce=str(next(self._nonces))
        )

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DiscoveryResponse]:
        queue: asyncio.Queue[DiscoveryRequest | _Update | _Closed] = asyncio.Queue()
        reader = asyncio.create_task(_pump(request_iterator, queue))
        self._streams.add(queue)
        stream = id(queue)
        self._sync[stream] = (None, None)
        names: list[str] = []
        sent_version: str | None = None
        last_nonce = ""
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Closed):
                    return
                if isinstance(item, DiscoveryRequest):
                    if item.HasField("error_detail"):
                        self.nacks += 1
                        # Do not resend the rejected version: only a new
                        # SVID can fix what Envoy refused.
                        log.warning(
                            "Envoy NACKed SDS version %s (nonce %s) for %s: %s",
                            sent_version,
                            item.response_nonce,
                            list(item.resource_names),
                            item.error_detail.message,
                        )
                        continue
                    if item.response_nonce and item.response_nonce != last_nonce:
                        continue  # an ACK of a response superseded since; the newer one is in flight
                    requested = list(item.resource_names)
                    if item.response_nonce and requested == names:
                        log.debug("Envoy ACKed SDS version %s for %s", item.version_info, names)
                        self._sync[stream] = (sent_version, item.version_info)
                        continue
                    unknown = set(requested) - {CERT_RESOURCE, BUNDLE_RESOURCE}
                    if unknown:
                        log.warning("Envoy asks for unknown SDS resources %s; serving only default and ROOTCA", sorted(unknown))
                    names = requested
                    # A new subscription (or a reconnect after an agent restart)
                    # gets the current content even if Envoy already holds it.
                    sent_version = None
                response = self._response(names)
                if response is None or response.version_info == sent_version:
                    continue
                sent_version, last_nonce = response.version_info, response.nonce
                self._sync[stream] = (sent_version, self._sync[stream][1])
                log.info("SDS push %s version %s (nonce %s)", names, sent_version, last_nonce)
                yield response
        finally:
            self._streams.discard(queue)
            self._sync.pop(stream, None)
            reader.cancel()

    async def FetchSecrets(self, request: DiscoveryRequest, context: grpc.aio.ServicerContext) -> DiscoveryResponse:
        response = self._response(request.resource_names)
        if response is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no SVID yet: the agent has not obtained one from the CA")
        assert response is not None
        return response

    async def DeltaSecrets(
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DiscoveryResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "delta SDS is not supported: use StreamSecrets (api_type GRPC)")
        yield DiscoveryResponse()  # pragma: no cover - makes this an async generator, as gRPC expects


async def _pump(
    request_iterator: AsyncIterator[DiscoveryRequest], queue: asyncio.Queue[DiscoveryRequest | _Update | _Closed]
) -> None:
    try:
        async for request in request_iterator:
            queue.put_nowait(request)
    except asyncio.CancelledError:
        raise
    except grpc.RpcError as err:
        log.debug("SDS stream ended: %s", err)
    finally:
        queue.put_nowait(_Closed())


def _certificate_secret(cert_chain_pem: bytes, private_key_pem: bytes) -> Secret:
    return Secret(
        name=CERT_RESOURCE,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(inline_bytes=cert_chain_pem),
            private_key=DataSource(inline_bytes=private_key_pem),
        ),
    )


def _bundle_secret(bundle_pem: bytes) -> Secret:
    return Secret(
        name=BUNDLE_RESOURCE,
        validation_context=CertificateValidationContext(trusted_ca=DataSource(inline_bytes=bundle_pem)),
    )


def _content_version(secret: Secret) -> str:
    # Content-addressed: the same SVID always has the same version, a new one
    # always a new version (what Envoy uses to decide whether to swap).
    return hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()[:16]
