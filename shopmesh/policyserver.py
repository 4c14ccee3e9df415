"""Serve a sidecar's authorization policy to its Envoy over ECDS.

Each sidecar's RBAC filter is not written into its bootstrap: it is an
Extension Config Discovery (ECDS) resource named "rbac" that the pod's agent
serves on the same Unix socket as SDS. The agent renders it from
mesh/policy.yaml (shopmesh.policy) and pushes a new version whenever the file
changes (or on SIGUSR1, which `shopmesh policy reload` sends). Envoy applies
a new filter config to new requests without restarting or dropping
connections, which is what row 16 asks: a policy change applies without
losing allowed traffic.

A policy file that fails to load keeps the last good policy in force (and
says why in the agent's log and status): a typo must not open the mesh up,
nor close it down.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401  (registers the RBAC type for json_format)
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.extension.v3 import config_discovery_pb2_grpc
from google.protobuf import any_pb2, json_format

from shopmesh import policy

log = logging.getLogger("shopmesh.policyserver")

RESOURCE_NAME = "rbac"
TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"


def rbac_resource(workload: str, rules: list[policy.Rule]) -> TypedExtensionConfig:
    """The ECDS resource for one workload's sidecar: its RBAC filter config."""
    typed = json_format.ParseDict(policy.render_rbac(rules, workload)["typed_config"], any_pb2.Any())
    return TypedExtensionConfig(name=RESOURCE_NAME, typed_config=typed)


class PolicyDiscoveryServicer(config_discovery_pb2_grpc.ExtensionConfigDiscoveryServiceServicer):
    """Serves the current RBAC config of one workload; `reload()` re-reads the policy file."""

    def __init__(self, workload: str, policy_file: Path) -> None:
        self.workload = workload
        self.policy_file = policy_file
        self.version: str | None = None
        self.acked_version: str | None = None
        self.last_error: str | None = None
        self._resource: TypedExtensionConfig | None = None
        self._mtime: float | None = None
        self._streams: set[asyncio.Queue[DiscoveryRequest | None]] = set()
        self._nonces = itertools.count(1)

    def reload(self) -> bool:
        """Load the policy file; push it if it changed. False if the file is bad
        (the last good policy stays in force)."""
        try:
            self._mtime = self.policy_file.stat().st_mtime
            resource = rbac_resource(self.workload, policy.load_policy(self.policy_file))
        except (OSError, policy.PolicyError) as exc:
            self.last_error = f"policy not applied, keeping version {self.version}: {exc}"
            log.error("%s", self.last_error)
            return False
        self.last_error = None
        version = hashlib.sha256(resource.SerializeToString(deterministic=True)).hexdigest()[:16]
        if version != self.version:
            self._resource, self.version = resource, version
            log.info("policy version %s for %s loaded from %s", version, self.workload, self.policy_file)
            for queue in self._streams:
                queue.put_nowait(None)
        return True

    def changed_on_disk(self) -> bool:
        try:
            return self.policy_file.stat().st_mtime != self._mtime
        except OSError:
            return self._mtime is not None

    @property
    def status(self) -> dict[str, Any]:
        return {"policy_version": self.version, "policy_acked": self.acked_version, "policy_error": self.last_error}

    def _response(self) -> DiscoveryResponse | None:
        if self._resource is None or self.version is None:
            return None
        packed = any_pb2.Any()
        packed.Pack(self._resource)
        return DiscoveryResponse(version_info=self.version, resources=[packed], type_url=TYPE_URL,
                                 nonce=str(next(self._nonces)))

    async def StreamExtensionConfigs(
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DiscoveryResponse]:
        queue: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self._streams.add(queue)

        async def pump() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            except grpc.RpcError as exc:
                log.debug("ECDS stream ended: %s", exc)

        reader = asyncio.create_task(pump())
        sent: str | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return  # Envoy closed the stream
                item = getter.result()
                if isinstance(item, DiscoveryRequest):
                    if item.HasField("error_detail"):
                        log.warning("Envoy NACKed policy version %s: %s", sent, item.error_detail.message)
                        continue
                    if item.response_nonce:
                        self.acked_version = item.version_info
                        continue
                    if RESOURCE_NAME not in item.resource_names:
                        log.warning("Envoy asked for ECDS resources %s; only %r exists", list(item.resource_names), RESOURCE_NAME)
                    sent = None  # a new subscription gets the current version
                response = self._response()
                if response is None or response.version_info == sent:
                    continue
                sent = response.version_info
                log.info("ECDS push policy version %s", sent)
                yield response
        finally:
            self._streams.discard(queue)
            reader.cancel()
