"""The SPIFFE Workload API (its X.509 half) on the agent's Unix socket, beside SDS.

One socket serves both, as a SPIRE agent's does: Envoy asks it for secrets
over SDS, the app (or any SPIFFE library: py-spiffe's WorkloadApiClient and
X509Source, go-spiffe's workloadapi) asks it for its X509-SVID and bundle.
Point a library at it with SPIFFE_ENDPOINT_SOCKET=unix://<socket path>
(`shopmesh status --json` gives the path as `workload_api_socket`).

What the SPIFFE Workload API standard requires and this does:
- every call carries the metadata `workload.spiffe.io: true`, otherwise
  INVALID_ARGUMENT (a browser or an SSRF-able HTTP client cannot set it);
- FetchX509SVID and FetchX509Bundles are server streams: the current SVID or
  bundle at once (or as soon as the agent has one), then again after every
  rotation and every trust bundle change;
- certificates and keys are DER: the chain concatenated leaf first, the key
  PKCS#8, the bundle its CA certificates concatenated.
JWT-SVIDs are not issued by this mesh: those methods answer UNIMPLEMENTED.

Who may call: whoever can open the socket (mode 0600, in the pod's private
directory) — the pod's own processes. A SPIRE agent additionally attests the
calling process; here the pod boundary is the attestation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

# py-spiffe ships the Workload API's generated code (workload.proto, no proto
# package: the service is "/SpiffeWorkloadAPI/…"). We serve with the very
# messages its client parses; a second copy of the same proto in this
# process would clash with it in protobuf's descriptor pool.
from spiffe._proto import workload_pb2, workload_pb2_grpc

from pki.svid import Svid

log = logging.getLogger("pki.workload_api")

HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"


def bundle_der(bundle_pem: bytes) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(bundle_pem))


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Serves the agent's current workload SVID and bundle; call update() on every change."""

    def __init__(self, trust_domain: str) -> None:
        self._trust_domain = trust_domain
        self._svid: Svid | None = None
        self._bundle_der = b""
        self._generation = 0
        self._changed = asyncio.Condition()

    async def update(self, svid: Svid | None, bundle_pem: bytes) -> None:
        """New SVID and/or bundle: every open stream gets it."""
        async with self._changed:
            self._svid = svid
            self._bundle_der = bundle_der(bundle_pem) if bundle_pem else b""
            self._generation += 1
            self._changed.notify_all()

    @staticmethod
    async def _require_header(context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        if metadata.get(HEADER_KEY) != HEADER_VALUE:
            log.warning("refused a Workload API call without the %s header from %s", HEADER_KEY, context.peer())
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"security header missing from request: send metadata '{HEADER_KEY}: {HEADER_VALUE}'",
            )

    async def _next(self, seen: int, need_svid: bool) -> int:
        """Wait for content newer than `seen` (and a valid SVID, if need_svid); return its generation."""

        def ready() -> bool:
            if self._generation == seen or not self._bundle_der:
                return False
            return not need_svid or (self._svid is not None and self._svid.is_valid())

        async with self._changed:
            await self._changed.wait_for(ready)
            return self._generation

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await self._require_header(context)
        seen = -1
        while True:
            seen = await self._next(seen, need_svid=True)
            svid = self._svid
            assert svid is not None
            yield workload_pb2.X509SVIDResponse(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id=svid.spiffe_id,
                        x509_svid=svid.chain_der,
                        x509_svid_key=svid.key_der,
                        bundle=self._bundle_der,
                    )
                ]
            )

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await self._require_header(context)
        seen = -1
        while True:
            seen = await self._next(seen, need_svid=False)
            yield workload_pb2.X509BundlesResponse(bundles={self._trust_domain: self._bundle_der})

    async def _no_jwt(self, context: grpc.aio.ServicerContext) -> None:
        await self._require_header(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this mesh issues X509-SVIDs only; JWT-SVIDs are not available")

    async def FetchJWTSVID(self, request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext) -> workload_pb2.JWTSVIDResponse:
        await self._no_jwt(context)
        return workload_pb2.JWTSVIDResponse()  # pragma: no cover - abort raised

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await self._no_jwt(context)
        yield workload_pb2.JWTBundlesResponse()  # pragma: no cover - makes this an async generator, as gRPC expects

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await self._no_jwt(context)
        return workload_pb2.ValidateJWTSVIDResponse()  # pragma: no cover - abort raised


def add_to_server(servicer: WorkloadApiServicer, server: grpc.aio.Server) -> None:
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
