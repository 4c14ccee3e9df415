"""Benchmark 3a: how many SVIDs per second the local CA signs.

Two figures:
- through the CA server (what agents see): one agent identity joins once with
  a join token, then `concurrency` callers renew its workload SVID over
  mutual TLS (Renew) as fast as the server answers, each with a CSR of its
  own fresh key (made before the clock starts). Each answer is a signed SVID
  written to the issuance ledger, as in production;
- the signature alone: pki.ca.LocalCA.issue_svid in this process, no RPC,
  no ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from pki.ca import LocalCA
from pki.client import ca_channel
from pki.testing import key_pem, make_csr, run_ca_server
from pki.tokens import create_join_token
from shopmesh import topology
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc

Log = Callable[[str], None]
SPIFFE_ID = topology.spiffe_id_for("orders")


async def _renew_for(join: str, renew: str, bundle: bytes, token: str, csrs: list[str], concurrency: int,
                     duration_s: float) -> tuple[int, float]:
    workload_key, agent_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    async with ca_channel(join, bundle) as channel:
        joined = await ca_pb2_grpc.CertificateAuthorityStub(channel).Join(ca_pb2.JoinRequest(
            join_token=token, spiffe_id=SPIFFE_ID, csr_pem=make_csr(workload_key, SPIFFE_ID),
            agent_csr_pem=make_csr(agent_key, None)), timeout=10)
    issued = 0
    async with ca_channel(renew, bundle, key_pem=key_pem(agent_key),
                          cert_chain_pem=joined.agent_cert_chain_pem.encode()) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        await stub.Renew(ca_pb2.RenewRequest(csr_pem=csrs.pop()), timeout=10)  # connect and warm up
        began = time.perf_counter()
        end = began + duration_s

        async def caller() -> None:
            nonlocal issued
            while time.perf_counter() < end and csrs:
                await stub.Renew(ca_pb2.RenewRequest(csr_pem=csrs.pop()), timeout=10)
                issued += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return issued, elapsed


def _signing_rate(state_dir: Path, duration_s: float) -> float:
    ca = LocalCA.load_or_create(state_dir)
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), SPIFFE_ID)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < duration_s:
        ca.issue_svid(csr, SPIFFE_ID, timedelta(seconds=10))
        count += 1
    return count / (time.perf_counter() - began)


def run(work_dir: Path, *, duration_s: float = 8.0, concurrency: int = 8, log: Log = print) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    # One fresh key per SVID, as agents do; more than the CA can sign in the time.
    csrs = [make_csr(ec.generate_private_key(ec.SECP256R1()), SPIFFE_ID) for _ in range(int(400 * duration_s))]
    with run_ca_server(work_dir / "ca-state", ttl="10s", log_dir=work_dir) as ca:
        token = create_join_token(ca.state_dir, SPIFFE_ID)
        issued, elapsed = asyncio.run(_renew_for(ca.join_address, ca.renew_address, ca.bundle_path.read_bytes(), token,
                                                 csrs, concurrency, duration_s))
    server_rate = issued / elapsed
    log(f"  CA server: {issued} SVIDs in {elapsed:.1f} s over mTLS Renew ({concurrency} callers)")
    signing = _signing_rate(work_dir / "local-ca", min(3.0, duration_s))
    log(f"  signature alone: {signing:.0f} SVIDs/s")
    return {
        "svids_per_s": server_rate,
        "issued": issued,
        "concurrency": concurrency,
        "duration_s": elapsed,
        "signing_only_svids_per_s": signing,
        "path": "Renew RPC over mutual TLS to python -m pki.ca_server (local CA, EC P-256), ledger write included",
    }
