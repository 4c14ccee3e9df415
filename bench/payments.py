"""Benchmark 4: payments with and without the data key cache, on (moto's) AWS KMS.

The real payments app (`python -m services.payments`, SHOPMESH_KMS=aws)
seals cards under data keys from a KMS key in moto, run as a real HTTP
server (shopmesh.awsstub). boto3 reaches it through the standard
AWS_ENDPOINT_URL, pointed at a counting proxy (shopmesh.awsstub.KmsProxy) that counts
KMS operations as CloudTrail would. The app is called directly (plaintext,
no sidecars: this measures payments and KMS, not the mesh) by bench.loadgen
in closed loop:

- Tokenize, a new valid card number every call: tokenizations per second
  and KMS calls per 1000 tokenizations;
- Charge, of a few cards tokenized beforehand, a new idempotency key every
  call: charges per second and KMS calls per 1000 charges.

"Cache on" is the shipped default (services/payments/settings.py: a data
key is reused for 5 minutes, 100 messages, 64 KiB); "cache off" sets the
limits to one message and a microsecond.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shopmesh.awsstub import KmsProxy
from bench.loadgen import luhn_card
from bench.procs import Process, free_port, python_module, run_loadgen, start, wait_for
from services.payments import settings
from shopmesh.awsstub import FAKE_AWS_ENV, moto_server
from shopmesh.identity import XFCC_HEADER
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc

Log = Callable[[str], None]
KMS_OPERATIONS = ("GenerateDataKey", "Decrypt", "Encrypt", "ReEncrypt")
# The caller identity orders' sidecar would put on a Charge.
ORDERS_XFCC = (
    "By=spiffe://shopmesh.internal/ns/shop/sa/payments;Hash=00;URI=spiffe://shopmesh.internal/ns/shop/sa/orders"
)
CHARGED_CARDS = 10
CACHE_OFF = {settings.CACHE_MAX_AGE_ENV: "0.000001", settings.CACHE_MAX_MESSAGES_ENV: "1"}


def _serving(address: str, process: Process) -> bool:
    if process.popen.poll() is not None:
        raise AssertionError(f"payments exited with {process.popen.returncode}; see {process.log_path}")
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _kms_calls(proxy: KmsProxy) -> int:
    return sum(proxy.count(op) for op in KMS_OPERATIONS)


def _tokenize(address: str, count: int) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = payments_pb2_grpc.PaymentsStub(channel)
        rng = random.Random(7)
        return [stub.Tokenize(payments_pb2.TokenizeRequest(card_number=luhn_card(rng), exp_month=12,
                                                           exp_year=time.gmtime().tm_year + 3, cvv="123"),
                              timeout=10).token for _ in range(count)]


def _one_setting(work_dir: Path, name: str, env: dict[str, str], proxy: KmsProxy, *, duration_s: float,
                 concurrency: int, log: Log) -> dict[str, Any]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    app = start(python_module("services.payments"), work_dir / f"payments-{name}.log", env={
        "SHOPMESH_APP_LISTEN": address, "SHOPMESH_DATA_DIR": str(work_dir / f"data-{name}"),
        "OTEL_SDK_DISABLED": "true", **env,
    })
    try:
        wait_for(lambda: _serving(address, app), f"payments ({name}) to serve", timeout=30, logs=(app.log_path,))
        results: dict[str, Any] = {}
        before = _kms_calls(proxy)
        tokenize = run_loadgen({"target": address, "call": {"kind": "tokenize"}, "mode": "closed",
                                "concurrency": concurrency, "duration_s": duration_s, "warmup_s": 0.0, "timeout_s": 10})
        calls = _kms_calls(proxy) - before
        results["tokenize"] = {
            "per_s": tokenize["throughput_rps"], "ok": tokenize["ok"], "errors": tokenize["errors"],
            "p50_ms": tokenize["latency_ms"].get("p50"), "p99_ms": tokenize["latency_ms"].get("p99"),
            "kms_calls": calls, "kms_calls_per_1000": calls / max(1, tokenize["ok"]) * 1000,
        }
        tokens = _tokenize(address, CHARGED_CARDS)
        before = _kms_calls(proxy)
        charge = run_loadgen({"target": address, "call": {"kind": "charge", "tokens": tokens}, "mode": "closed",
                              "concurrency": concurrency, "duration_s": duration_s, "warmup_s": 0.0, "timeout_s": 10,
                              "metadata": [[XFCC_HEADER, ORDERS_XFCC]]})
        calls = _kms_calls(proxy) - before
        results["charge"] = {
            "per_s": charge["throughput_rps"], "ok": charge["ok"], "errors": charge["errors"],
            "p50_ms": charge["latency_ms"].get("p50"), "p99_ms": charge["latency_ms"].get("p99"),
            "kms_calls": calls, "kms_calls_per_1000": calls / max(1, charge["ok"]) * 1000,
        }
        for kind in ("tokenize", "charge"):
            r = results[kind]
            log(f"  cache {name}: {kind} {r['per_s']:.1f}/s, {r['kms_calls_per_1000']:.0f} KMS calls per 1000"
                + (f", errors {r['errors']}" if r["errors"] else ""))
        return results
    finally:
        app.stop()


def run(work_dir: Path, *, duration_s: float = 8.0, concurrency: int = 4, log: Log = print) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    with moto_server(log_file=work_dir / "moto.log") as moto:
        kms = boto3.client("kms", endpoint_url=moto.endpoint, region_name=FAKE_AWS_ENV["AWS_REGION"],
                           aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
        key_arn = str(kms.create_key(Description="ShopMesh benchmark card data keys")["KeyMetadata"]["Arn"])
        proxy = KmsProxy(moto)
        proxy.start()
        try:
            base = {**proxy.env(), settings.KMS_ENV: "aws", settings.KMS_KEY_ID_ENV: key_arn}
            on = _one_setting(work_dir, "on", base, proxy, duration_s=duration_s, concurrency=concurrency, log=log)
            off = _one_setting(work_dir, "off", {**base, **CACHE_OFF}, proxy, duration_s=duration_s,
                               concurrency=concurrency, log=log)
        finally:
            proxy.stop()
    return {
        "kms": "moto (AWS KMS API) as a real HTTP server, through a counting proxy",
        "concurrency": concurrency,
        "duration_s": duration_s,
        "charged_cards": CHARGED_CARDS,
        "cache_on": on,
        "cache_off": off,
        "kms_calls_per_1000": on["tokenize"]["kms_calls_per_1000"],
        "kms_calls_per_1000_charges": on["charge"]["kms_calls_per_1000"],
        "tokenizations_per_s": on["tokenize"]["per_s"],
        "charges_per_s": on["charge"]["per_s"],
    }
