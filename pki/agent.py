"""The per-pod agent: obtains and rotates the pod's SVIDs, serves them to Envoy (SDS) and to the
app (SPIFFE Workload API) on one Unix socket, runs Envoy.

    python -m pki.agent --spiffe-id spiffe://shopmesh.internal/ns/shop/sa/orders \\
        --ca-join 127.0.0.1:8440 --ca-renew 127.0.0.1:8441 \\
        --join-token-file POD/join-token --bundle-file STATE/ca/root.pem \\
        --data-dir POD/agent --sds-socket POD/sds.sock --status-file POD/status.json \\
        [--envoy-config POD/envoy.yaml --envoy-bin .venv/bin/envoy \\
         --envoy-admin 127.0.0.1:9901 --envoy-log POD/envoy.log] [--app-health 127.0.0.1:50051] \\
        [--policy-file mesh/policy.yaml] [--metrics-listen 127.0.0.1:15090]

Two identities, as with SPIRE:
- the AGENT SVID (spiffe://<td>/shopmesh/agent/<workload path>) proves which
  agent calls the CA. The join token attests it; it lives long (an hour, or
  30 workload TTLs), renews itself at half its life, and is the only client
  certificate of renewals. It never leaves the agent: not over SDS, not over
  the Workload API.
- the WORKLOAD SVID is what Envoy and the app present to peers. The agent
  renews it with its agent SVID, even after it expired (a CA outage longer
  than the workload TTL heals by itself when the CA returns).

Life of an SVID:
- Bootstrap: fresh EC P-256 keys and CSRs, Join with the one-time token from
  --join-token-file (deleted after it worked). Keys and chains are kept in
  --data-dir (0600), so a restarted agent resumes with mTLS renewal and needs
  no new token while its agent SVID is valid.
- Rotation: at half the certificate's *remaining* lifetime, read from its own
  notAfter (a CA may ignore the requested TTL; ACM PCA and moto do), ±10 %
  jitter so a fleet does not renew in lock-step. Every rotation uses a new key.
  On failure: capped exponential back-off with jitter, while the current SVID
  keeps being served.
- Trust bundle: a WatchBundle stream from the CA delivers every bundle change
  (CA rotation) at once; it is pushed to Envoy (ROOTCA) and the Workload API.
  When the CA's signing authority changes, both SVIDs are renewed at once.
- SIGHUP forces a rotation of the workload SVID now (`shopmesh rotate` sends
  it to the "pid" in the status file).
- Authorization (--policy-file): the sidecar's RBAC filter is rendered from
  mesh/policy.yaml for this workload and served over ECDS on the same socket
  (shopmesh.policyserver); a changed file is picked up within a second, and
  SIGUSR1 (`shopmesh policy reload`) reloads it at once.
- Metrics (--metrics-listen): Prometheus /metrics from the status document
  (pki.metrics; alert rules in mesh/prometheus/alerts.yaml).
- Agent SVID expired and no token: the agent keeps trying (Join as soon as a
  new token appears at --join-token-file), reports the error in the status
  file, and never serves plaintext: Envoy keeps the expired certificate and
  handshakes fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.extension.v3 import config_discovery_pb2_grpc
from envoy.service.secret.v3 import sds_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pki import flags
from pki.authority import bundle_fingerprints, fingerprint, pem
from pki.client import ca_channel
from pki.envoy import EnvoyOptions, EnvoySupervisor
from pki.errors import PkiError, RenewalError, SvidError
from pki.metrics import serve_metrics
from pki.sds import SecretDiscoveryServicer
from pki.spiffe_ids import agent_id_for
from pki.svid import (
    AGENT_SVID_FILE,
    BUNDLE_FILE,
    SVID_FILE,
    Svid,
    load_bundle,
    load_persisted_svid,
    new_key_and_csr,
    save_bundle,
    save_svid,
)
from pki.workload_api import WorkloadApiServicer
from pki.workload_api import add_to_server as add_workload_api
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc
from shopmesh.policyserver import PolicyDiscoveryServicer

log = logging.getLogger("pki.agent")

# ACM PCA direct mode waits for issuance inside the CA's answer (pki.backends.acm_pca.WAITER).
CA_CALL_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 0.5
# Never retry sooner than this, however close expiry is (the CA gets no storm).
MIN_RETRY_S = 0.2
JITTER = 0.10  # ±10 % of the rotation interval
STATUS_INTERVAL_S = 1.0
APP_HEALTH_TIMEOUT_S = 0.5
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107


def rotation_due_at(not_after: datetime, now: datetime, rng: random.Random | None = None) -> datetime:
    """When to renew: half the remaining lifetime from now, ±10 % of that interval.

    Computed from the certificate's own notAfter, never from the TTL we
    asked for, so a CA that issues a different lifetime is still renewed in time.
    """
    interval = max((not_after - now).total_seconds(), 0.0) / 2
    jitter = (rng or random).uniform(-JITTER, JITTER) * interval
    return now + timedelta(seconds=interval + jitter)


def retry_delay(
    failures: int, cap_s: float, rng: random.Random | None = None, time_left_s: float | None = None
) -> float:
    """Capped exponential back-off with jitter: ~0.5 s, 1 s, 2 s … up to cap_s.

    With `time_left_s` (until the certificate being renewed expires), never
    wait more than a third of it: retries get denser as expiry nears, so a
    CA that comes back before the certificate expires is reached in time and
    a short outage stays invisible. Past expiry the back-off applies as is.
    """
    base = min(cap_s, BACKOFF_MIN_S * 2 ** max(failures - 1, 0))
    delay = base * (rng or random).uniform(0.5, 1.0)
    if time_left_s is not None and time_left_s > 0:
        delay = min(delay, max(MIN_RETRY_S, time_left_s / 3))
    return delay


@dataclass(frozen=True)
class AgentConfig:
    spiffe_id: str
    ca_join: str
    ca_renew: str
    join_token_file: Path
    bundle_file: Path
    data_dir: Path
    sds_socket: Path
    status_file: Path
    envoy: EnvoyOptions | None
    app_health: str | None
    backoff_max: timedelta
    log_level: str
    policy_file: Path | None = None
    metrics_listen: tuple[str, int] | None = None


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    p = argparse.ArgumentParser(prog="python -m pki.agent", description="ShopMesh workload agent (SVIDs, SDS, Envoy).")
    p.add_argument("--spiffe-id", type=flags.spiffe_id, required=True, help="this workload's SPIFFE ID")
    p.add_argument("--ca-join", type=flags.host_port, required=True, help="CA join port, HOST:PORT (TLS)")
    p.add_argument("--ca-renew", type=flags.host_port, required=True, help="CA renew port, HOST:PORT (mTLS)")
    p.add_argument("--join-token-file", type=Path, required=True, help="one-time join token; deleted after use")
    p.add_argument("--bundle-file", type=Path, required=True, help="initial trust bundle (PEM) to verify the CA")
    p.add_argument("--data-dir", type=Path, required=True, help="pod-private directory for the key and SVID (0700)")
    p.add_argument("--sds-socket", type=Path, required=True, help="Unix socket path for Envoy's SDS (0600)")
    p.add_argument("--status-file", type=Path, required=True, help="JSON status, rewritten every second")
    p.add_argument("--envoy-config", type=Path, help="Envoy bootstrap; with the other --envoy-* flags, run Envoy")
    p.add_argument("--envoy-bin", help="Envoy binary (path or name on PATH)")
    p.add_argument("--envoy-admin", type=flags.loopback_host_port, help="Envoy admin address, 127.0.0.1:PORT")
    p.add_argument("--envoy-log", type=Path, help="file for Envoy's stdout and stderr")
    p.add_argument("--app-health", type=flags.loopback_host_port, help="app's grpc.health.v1 address, 127.0.0.1:PORT")
    p.add_argument("--backoff-max", type=flags.duration, default="5s", help="longest wait between failed renewals (default 5s)")
    p.add_argument("--policy-file", type=Path,
                   help="authorization policy (mesh/policy.yaml): served to Envoy over ECDS, reloaded when it changes or on SIGUSR1")
    p.add_argument("--metrics-listen", type=flags.host_port, help="serve Prometheus /metrics on HOST:PORT")
    p.add_argument("--log-level", choices=flags.LOG_LEVELS, default="info")
    a = p.parse_args(argv)
    if a.policy_file is not None and not a.policy_file.is_file():
        p.error(f"argument --policy-file: '{a.policy_file}' is not a file")

    try:
        load_bundle(a.bundle_file.read_bytes(), str(a.bundle_file))
    except (OSError, SvidError) as err:
        p.error(f"argument --bundle-file: {err}")
    if len(str(a.sds_socket).encode()) > MAX_UNIX_SOCKET_PATH:
        p.error(f"argument --sds-socket: '{a.sds_socket}' is longer than {MAX_UNIX_SOCKET_PATH} bytes (Unix socket limit)")
    envoy_flags = {
        "--envoy-config": a.envoy_config,
        "--envoy-bin": a.envoy_bin,
        "--envoy-admin": a.envoy_admin,
        "--envoy-log": a.envoy_log,
    }
    given = [name for name, value in envoy_flags.items() if value is not None]
    envoy: EnvoyOptions | None = None
    if given:
        missing = [name for name in envoy_flags if name not in given]
        if missing:
            p.error(f"argument {missing[0]}: required when {given[0]} is given (all --envoy-* flags go together)")
        if not a.envoy_config.is_file():
            p.error(f"argument --envoy-config: '{a.envoy_config}' is not a file")
        if not a.envoy_log.parent.is_dir():
            p.error(f"argument --envoy-log: directory '{a.envoy_log.parent}' does not exist")
        binary = shutil.which(a.envoy_bin)
        if binary is None:
            p.error(f"argument --envoy-bin: '{a.envoy_bin}' is not an executable file")
        envoy = EnvoyOptions(
            binary=Path(binary), config=a.envoy_config.resolve(), admin=a.envoy_admin, log_file=a.envoy_log
        )
    return AgentConfig(
        spiffe_id=a.spiffe_id,
        ca_join=flags.format_host_port(a.ca_join),
        ca_renew=flags.format_host_port(a.ca_renew),
        join_token_file=a.join_token_file,
        bundle_file=a.bundle_file,
        data_dir=a.data_dir,
        sds_socket=a.sds_socket,
        status_file=a.status_file,
        envoy=envoy,
        app_health=flags.format_host_port(a.app_health) if a.app_health else None,
        backoff_max=a.backoff_max,
        log_level=a.log_level,
        policy_file=a.policy_file.resolve() if a.policy_file else None,
        metrics_listen=a.metrics_listen,
    )


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.agent_id = agent_id_for(config.spiffe_id)
        self.trust_domain = config.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        self.svid: Svid | None = None
        self.agent_svid: Svid | None = None
        self.bundle_pem = config.bundle_file.read_bytes()
        # The CA's signing authority, as WatchBundle last reported it.
        self.signing_authority: str | None = None
        self.sds = SecretDiscoveryServicer()
        self.workload_api = WorkloadApiServicer(self.trust_domain)
        self.envoy = EnvoySupervisor(config.envoy, config.data_dir) if config.envoy else None
        # The sidecar's RBAC, rendered from the policy for this workload (the
        # last segment of its SPIFFE ID, e.g. .../sa/payments -> payments).
        self.policy = (
            PolicyDiscoveryServicer(config.spiffe_id.rsplit("/", 1)[1], config.policy_file)
            if config.policy_file else None
        )
        self._reload_policy = asyncio.Event()  # SIGUSR1
        self.ca_reachable: bool | None = None
        self.issued_at: float | None = None
        self._last_status: dict[str, Any] = {}
        self.rotations = 0
        self.agent_rotations = 0
        self.renewal_failures = 0
        self.last_error: str | None = None
        self.next_rotation_at: datetime | None = None
        self.agent_rotation_at: datetime | None = None
        self._rotate_now = asyncio.Event()  # SIGHUP: the workload SVID, now
        self._renew_all = asyncio.Event()  # CA rotation: both SVIDs, now
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._have_svid = asyncio.Event()
        self._app_channel: grpc.aio.Channel | None = None

    # --- trust ----------------------------------------------------------------

    def _ca_trust(self) -> bytes:
        """Roots to verify the CA server with: the current bundle, plus the --bundle-file as it is now.

        The bundle file is the operator's bootstrap trust; re-reading it lets
        an agent that slept through a whole CA rotation reach the CA again.
        """
        try:
            bootstrap = self.config.bundle_file.read_bytes()
            load_bundle(bootstrap, str(self.config.bundle_file))
        except (OSError, SvidError):
            bootstrap = b""
        known = set(bundle_fingerprints(self.bundle_pem))
        extra = [c for c in x509.load_pem_x509_certificates(bootstrap) if fingerprint(c) not in known] if bootstrap else []
        return self.bundle_pem + pem(extra)

    async def _set_bundle(self, bundle_pem: bytes, source: str) -> None:
        """Adopt a trust bundle from the CA: persist it, push it to Envoy and the Workload API."""
        try:
            load_bundle(bundle_pem, source)
        except SvidError as err:
            log.warning("ignoring the trust bundle from %s: %s", source, err)
            return
        persisted = (self.config.data_dir / BUNDLE_FILE).exists()
        if bundle_fingerprints(bundle_pem) == bundle_fingerprints(self.bundle_pem):
            if not persisted:  # the bundle that verifies the persisted SVIDs after a restart
                save_bundle(self.config.data_dir, bundle_pem)
            return
        self.bundle_pem = bundle_pem
        save_bundle(self.config.data_dir, bundle_pem)
        self.sds.set_bundle(bundle_pem)
        await self.workload_api.update(self.svid if self.svid and self.svid.is_valid() else None, bundle_pem)
        self._changed.set()
        log.info(
            "trust bundle from %s: %s",
            source,
            ", ".join(f[:16] for f in bundle_fingerprints(bundle_pem)),
        )

    # --- SVID acquisition ---------------------------------------------------

    async def _install(self, svid: Svid, how: str) -> None:
        """Make svid the workload SVID: persist it, push it to Envoy and the app, schedule its rotation."""
        previous = self.svid
        save_svid(self.config.data_dir, svid, SVID_FILE)
        self.svid = svid
        self.sds.set_svid(svid.chain_pem, svid.key_pem, self.bundle_pem)
        await self.workload_api.update(svid, self.bundle_pem)
        now = datetime.now(timezone.utc)
        self.next_rotation_at = rotation_due_at(svid.not_after, now)
        if how != "resumed":
            self.issued_at = now.timestamp()
        if previous is not None and how != "resumed":
            self.rotations += 1
        self.last_error = None
        self._have_svid.set()
        self._changed.set()
        log.info(
            "SVID %s: spiffe_id=%s serial=%s not_after=%s next_rotation_in=%.1fs",
            how,
            svid.spiffe_id,
            svid.serial,
            svid.not_after.isoformat(),
            (self.next_rotation_at - now).total_seconds(),
        )

    def _install_agent(self, svid: Svid, how: str) -> None:
        previous = self.agent_svid
        save_svid(self.config.data_dir, svid, AGENT_SVID_FILE)
        self.agent_svid = svid
        now = datetime.now(timezone.utc)
        self.agent_rotation_at = rotation_due_at(svid.not_after, now)
        if previous is not None and how != "resumed":
            self.agent_rotations += 1
        self._changed.set()
        log.info(
            "agent SVID %s: spiffe_id=%s serial=%s not_after=%s next_rotation_in=%.1fs",
            how,
            svid.spiffe_id,
            svid.serial,
            svid.not_after.isoformat(),
            (self.agent_rotation_at - now).total_seconds(),
        )

    def _read_token(self) -> str | None:
        try:
            token = self.config.join_token_file.read_text().strip()
        except FileNotFoundError:
            return None
        return token or None

    async def _obtain(self, workload_due: bool, agent_due: bool) -> None:
        """Renew what is due with the agent SVID; Join with a token when there is no valid agent SVID."""
        agent = self.agent_svid
        if agent is None or not agent.is_valid():
            token = self._read_token()
            if token is not None:
                await self._join(token)
                return
            if agent is None:
                raise RenewalError(f"no agent SVID yet and no join token at {self.config.join_token_file}")
            # The CA refuses an expired client certificate at the handshake
            # (ACCEPTANCE row 4): only a new join token helps. Keep saying so
            # until one appears.
            raise RenewalError(
                f"agent SVID serial {agent.serial} expired at {agent.not_after.isoformat()}; the CA accepts "
                f"renewals only with a valid one: write a new join token to {self.config.join_token_file}"
            )
        try:
            if agent_due:
                await self._renew_agent(agent)
                agent = self.agent_svid
                assert agent is not None
            if workload_due:
                await self._renew(agent)
        except RenewalError as err:
            # A token at --join-token-file means someone wants this agent to
            # (re)join: e.g. the CA was replaced or rotated while the pod was
            # down, and it now refuses an agent SVID that has not expired.
            token = self._read_token()
            if token is None:
                raise
            log.warning("renewal failed (%s); joining again with the token at %s", err, self.config.join_token_file)
            await self._join(token)

    async def _call_ca(self, method: str, address: str, request: Any, client: Svid | None) -> ca_pb2.SvidResponse:
        options: dict[str, bytes] = {}
        if client is not None:
            options = {"key_pem": client.key_pem, "cert_chain_pem": client.chain_pem}
        async with ca_channel(address, self._ca_trust(), **options) as channel:
            try:
                response: ca_pb2.SvidResponse = await getattr(ca_pb2_grpc.CertificateAuthorityStub(channel), method)(
                    request, timeout=CA_CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as err:
                hint = ""
                if err.code() == grpc.StatusCode.UNAVAILABLE and client is not None:
                    hint = " (CA down, or it refused our client certificate at the TLS handshake)"
                raise RenewalError(f"{method} at {address} failed: {err.code().name}: {err.details()}{hint}") from err
        return response

    async def _join(self, token: str) -> None:
        key, csr = new_key_and_csr(self.config.spiffe_id)
        agent_key, agent_csr = new_key_and_csr(self.agent_id)
        request = ca_pb2.JoinRequest(
            join_token=token, spiffe_id=self.config.spiffe_id, csr_pem=csr.decode(), agent_csr_pem=agent_csr.decode()
        )
        response = await self._call_ca("Join", self.config.ca_join, request, None)
        svid = self._accept(self.config.spiffe_id, response.cert_chain_pem, response.bundle_pem, key, "Join")
        agent = self._accept(self.agent_id, response.agent_cert_chain_pem, response.bundle_pem, agent_key, "Join (agent)")
        # The token is spent; removing it keeps a stale one from being retried.
        self.config.join_token_file.unlink(missing_ok=True)
        await self._set_bundle(response.bundle_pem.encode(), "Join")
        self._install_agent(agent, "joined" if self.agent_svid is None else "re-joined")
        await self._install(svid, "joined" if self.svid is None else "re-joined")

    async def _renew(self, agent: Svid) -> None:
        key, csr = new_key_and_csr(self.config.spiffe_id)
        response = await self._call_ca("Renew", self.config.ca_renew, ca_pb2.RenewRequest(csr_pem=csr.decode()), agent)
        svid = self._accept(self.config.spiffe_id, response.cert_chain_pem, response.bundle_pem, key, "Renew")
        await self._set_bundle(response.bundle_pem.encode(), "Renew")
        await self._install(svid, "rotated")

    async def _renew_agent(self, agent: Svid) -> None:
        key, csr = new_key_and_csr(self.agent_id)
        response = await self._call_ca("RenewAgent", self.config.ca_renew, ca_pb2.RenewRequest(csr_pem=csr.decode()), agent)
        renewed = self._accept(self.agent_id, response.cert_chain_pem, response.bundle_pem, key, "RenewAgent")
        await self._set_bundle(response.bundle_pem.encode(), "RenewAgent")
        self._install_agent(renewed, "rotated")

    def _accept(self, spiffe_id: str, chain_pem: str, bundle_pem: str, key: ec.EllipticCurvePrivateKey, method: str) -> Svid:
        try:
            return Svid.build(spiffe_id, key, chain_pem.encode(), bundle_pem.encode(), f"{method} response from the CA")
        except SvidError as err:
            raise RenewalError(str(err)) from err

    def _time_left(self) -> float | None:
        """Seconds until the earlier of the two SVIDs expires (None without any)."""
        left = [(s.not_after - datetime.now(timezone.utc)).total_seconds() for s in (self.svid, self.agent_svid) if s]
        return min(left) if left else None

    def _due(self) -> tuple[bool, bool, float]:
        """(workload due, agent due, seconds until the earlier of the two)."""
        now = datetime.now(timezone.utc)
        svid, agent = self.svid, self.agent_svid
        workload_at = now if svid is None or not svid.is_valid(now) or self.next_rotation_at is None else self.next_rotation_at
        agent_at = now if agent is None or not agent.is_valid(now) or self.agent_rotation_at is None else self.agent_rotation_at
        wait = max(0.0, (min(workload_at, agent_at) - now).total_seconds())
        return workload_at <= now, agent_at <= now, wait

    async def rotation_loop(self) -> None:
        failures = 0
        retry_at: float | None = None
        # Forced renewals stay owed until they succeed.
        owe_workload = owe_agent = False
        while not self._stop.is_set():
            _, _, wait = self._due()
            if retry_at is not None:
                wait = max(0.0, retry_at - time.time())
            if wait > 0:
                await _wait_any((self._rotate_now, self._renew_all, self._stop), wait)
            if self._stop.is_set():
                return
            if self._rotate_now.is_set():
                self._rotate_now.clear()
                owe_workload = True
                log.info("forced rotation (SIGHUP)")
            if self._renew_all.is_set():
                self._renew_all.clear()
                owe_workload = owe_agent = True
                log.info("the CA's signing authority changed: renewing the workload and agent SVIDs")
            workload_due, agent_due, _ = self._due()
            workload_due, agent_due = workload_due or owe_workload, agent_due or owe_agent
            if not (workload_due or agent_due):
                continue
            try:
                await self._obtain(workload_due, agent_due)
            except (RenewalError, PkiError, OSError) as err:
                failures += 1
                self.renewal_failures += 1
                self.ca_reachable = False
                self.last_error = str(err)
                delay = retry_delay(failures, self.config.backoff_max.total_seconds(), time_left_s=self._time_left())
                retry_at = time.time() + delay
                self._changed.set()
                log.warning("SVID renewal failed (%d in a row), retrying in %.1fs: %s", failures, delay, err)
            else:
                failures = 0
                retry_at = None
                owe_workload = owe_agent = False
                self.ca_reachable = True

    async def bundle_loop(self) -> None:
        """Keep a WatchBundle stream open to the CA; adopt every bundle and react to a new signing authority."""
        failures = 0
        while not self._stop.is_set():
            try:
                async with ca_channel(self.config.ca_join, self._ca_trust()) as channel:
                    call = ca_pb2_grpc.CertificateAuthorityStub(channel).WatchBundle(ca_pb2.GetBundleRequest())
                    async for update in call:
                        failures = 0
                        await self._set_bundle(update.bundle_pem.encode(), "WatchBundle")
                        self._note_signing_authority(update.signing_authority)
            except grpc.aio.AioRpcError as err:
                log.debug("WatchBundle at %s ended: %s: %s", self.config.ca_join, err.code().name, err.details())
            failures += 1
            await _wait_any((self._stop,), retry_delay(failures, self.config.backoff_max.total_seconds()))

    def _note_signing_authority(self, authority: str) -> None:
        if not authority:
            return
        self.signing_authority = authority
        stale = [s for s in (self.svid, self.agent_svid) if s is not None and s.authority != authority]
        if stale:
            self._renew_all.set()

    # --- status -------------------------------------------------------------

    async def _app_serving(self) -> bool | None:
        if self.config.app_health is None:
            return None
        if self._app_channel is None:
            self._app_channel = grpc.aio.insecure_channel(self.config.app_health)
        try:
            reply = await health_pb2_grpc.HealthStub(self._app_channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=APP_HEALTH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def status(self, running: bool = True) -> dict[str, Any]:
        svid, agent = self.svid, self.agent_svid
        now = time.time()
        envoy_live: bool | None = None
        serial: str | None = svid.serial if svid else None
        if self.envoy is not None:
            if running and self.envoy.pid is not None:
                envoy_live = await asyncio.to_thread(self.envoy.is_live)
                serial = await asyncio.to_thread(self.envoy.served_serial, self.config.spiffe_id)
            else:
                envoy_live, serial = False, None
        app_serving = await self._app_serving() if running else (None if self.config.app_health is None else False)
        not_after = svid.not_after.timestamp() if svid else None
        agent_not_after = agent.not_after.timestamp() if agent else None
        svid_valid = not_after is not None and now < not_after
        policy_ready = self.policy is None or self.policy.version is not None
        policy_status = self.policy.status if self.policy else {}
        return {
            **policy_status,
            "issued_at": self.issued_at,
            "ca_reachable": self.ca_reachable,
            "spiffe_id": self.config.spiffe_id,
            "serial": serial,
            "issued_serial": svid.serial if svid else None,
            "not_after": not_after,
            "expires_in_s": round(not_after - now, 3) if not_after is not None else None,
            "svid_authority": svid.authority if svid else None,
            "envoy_live": envoy_live,
            "app_serving": app_serving,
            "ready": bool(running and svid_valid and policy_ready and envoy_live is not False and app_serving is not False),
            "rotations": self.rotations,
            "renewal_failures": self.renewal_failures,
            "last_error": self.last_error,
            "pid": os.getpid(),
            "updated_at": now,
            "running": running,
            "next_rotation_at": self.next_rotation_at.timestamp() if self.next_rotation_at else None,
            "agent_spiffe_id": self.agent_id,
            "agent_serial": agent.serial if agent else None,
            "agent_not_after": agent_not_after,
            "agent_expires_in_s": round(agent_not_after - now, 3) if agent_not_after is not None else None,
            "agent_svid_authority": agent.authority if agent else None,
            "agent_rotations": self.agent_rotations,
            "agent_next_rotation_at": self.agent_rotation_at.timestamp() if self.agent_rotation_at else None,
            "bundle_fingerprints": bundle_fingerprints(self.bundle_pem),
            "signing_authority": self.signing_authority,
            "sds_synced": self.sds.synced if self.envoy is not None else None,
            "workload_api_socket": str(self.config.sds_socket.resolve()),
            "envoy_pid": self.envoy.pid if self.envoy else None,
            "envoy_restarts": self.envoy.restarts if self.envoy else None,
            "envoy_last_exit": self.envoy.last_exit if self.envoy else None,
        }

    def _write_status(self, doc: dict[str, Any]) -> None:
        path = self.config.status_file
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            # Public (no secrets): the CLI and tests read it, possibly as another user.
            os.fchmod(fd, 0o644)
            os.write(fd, json.dumps(doc, sort_keys=True).encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, path)

    async def status_loop(self) -> None:
        while not self._stop.is_set():
            self._changed.clear()
            self._last_status = await self.status()
            self._write_status(self._last_status)
            await _wait_any((self._changed, self._stop), STATUS_INTERVAL_S)

    # --- authorization policy --------------------------------------------------

    async def policy_loop(self) -> None:
        """Reload the policy when its file changes, or at once on SIGUSR1."""
        assert self.policy is not None
        while not self._stop.is_set():
            await _wait_any((self._reload_policy, self._stop), 1.0)
            forced = self._reload_policy.is_set()
            self._reload_policy.clear()
            if forced or self.policy.changed_on_disk():
                self.policy.reload()
                self._changed.set()

    # --- Envoy --------------------------------------------------------------

    async def envoy_loop(self, adopted: bool) -> None:
        assert self.envoy is not None
        if not adopted:
            # Start Envoy only with a certificate in hand: its listeners
            # would otherwise sit warming, and readiness would mean nothing.
            await self._have_svid.wait()
        await self.envoy.run()

    # --- main ---------------------------------------------------------------

    async def _resume(self) -> None:
        data_dir = self.config.data_dir
        if (data_dir / BUNDLE_FILE).exists():
            self.bundle_pem = (data_dir / BUNDLE_FILE).read_bytes()
        for name, spiffe_id in ((AGENT_SVID_FILE, self.agent_id), (SVID_FILE, self.config.spiffe_id)):
            try:
                persisted = load_persisted_svid(data_dir, spiffe_id, name)
            except SvidError as err:
                log.warning("ignoring %s: %s", data_dir / name, err)
                self.last_error = str(err)
                continue
            if persisted is None:
                continue
            if name == AGENT_SVID_FILE:
                self.agent_svid = persisted
                if persisted.is_valid():
                    self._install_agent(persisted, "resumed")
                else:
                    log.warning("persisted agent SVID serial %s expired at %s", persisted.serial, persisted.not_after.isoformat())
            elif persisted.is_valid():
                await self._install(persisted, "resumed")
            else:
                # Keep it to report it, but never serve an expired certificate
                # to a fresh Envoy: renewal replaces it.
                self.svid = persisted
                log.warning("persisted SVID serial %s expired at %s", persisted.serial, persisted.not_after.isoformat())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._rotate_now.set)
        loop.add_signal_handler(signal.SIGUSR1, self._reload_policy.set)
        if self.policy is not None and not self.policy.reload():
            # Without a valid policy at start the sidecar denies everything
            # (its default RBAC config) and the workload is not ready.
            log.error("starting without an authorization policy: %s", self.policy.last_error)
        if self.config.metrics_listen is not None:
            serve_metrics(self.config.metrics_listen, lambda: self._last_status)

        await self._resume()
        # One socket, two APIs, as a SPIRE agent serves them: SDS for Envoy,
        # the SPIFFE Workload API for the app.
        server = grpc.aio.server()
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self.sds, server)
        add_workload_api(self.workload_api, server)
        if self.policy is not None:
            config_discovery_pb2_grpc.add_ExtensionConfigDiscoveryServiceServicer_to_server(self.policy, server)
        socket_path = self.config.sds_socket
        socket_path.unlink(missing_ok=True)  # a stale socket from a killed agent
        try:
            server.add_insecure_port(f"unix:{socket_path}")
        except RuntimeError as err:
            log.error("cannot listen on unix:%s: %s", socket_path, err)
            return 1
        await server.start()
        os.chmod(socket_path, 0o600)
        log.info(
            "agent for %s (agent ID %s): SDS and Workload API on unix:%s, CA join %s renew %s, status %s%s",
            self.config.spiffe_id,
            self.agent_id,
            socket_path,
            self.config.ca_join,
            self.config.ca_renew,
            self.config.status_file,
            f", Envoy admin {flags.format_host_port(self.config.envoy.admin)}" if self.config.envoy else "",
        )

        # Adopt an Envoy a killed predecessor left running before the first
        # status write, so that the status never shows it as missing.
        adopted = self.envoy.adopt_running() if self.envoy is not None else False
        tasks = [
            asyncio.create_task(self.rotation_loop(), name="rotation"),
            asyncio.create_task(self.bundle_loop(), name="bundle"),
            asyncio.create_task(self.status_loop(), name="status"),
        ]
        if self.envoy is not None:
            tasks.append(asyncio.create_task(self.envoy_loop(adopted), name="envoy"))
        if self.policy is not None:
            tasks.append(asyncio.create_task(self.policy_loop(), name="policy"))
        stop_wait = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stop_wait and t.exception() is not None]
        for task in failed:
            log.error("%s task failed: %r", task.get_name(), task.exception())
        self._stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.envoy is not None:
            await self.envoy.stop()
        await server.stop(1.0)
        socket_path.unlink(missing_ok=True)
        if self._app_channel is not None:
            await self._app_channel.close()
        self._write_status(await self.status(running=False))
        log.info("agent stopped")
        return 1 if failed else 0


async def _wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    """Return when any event is set or timeout seconds passed."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def prepare_dirs(config: AgentConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Pod-private: the SVID's private key lives here.
    os.chmod(config.data_dir, 0o700)
    config.sds_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.status_file.parent.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    flags.setup_logging(config.log_level)
    # Everything the agent creates (keys, the SDS socket) is private by
    # default; the status file is made readable explicitly.
    os.umask(0o077)
    try:
        prepare_dirs(config)
        return asyncio.run(Agent(config).run())
    except (PkiError, OSError) as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
