"""Payments on AWS KMS, against moto run as a real HTTP server (rows 30–34).

boto3 reaches moto through the standard AWS SDK variables, via a small
counting proxy (shopmesh.awsstub.KmsProxy) that stands in for CloudTrail: it counts
GenerateDataKey and Decrypt calls, and it can be taken down to make KMS
unreachable. Nothing patches or stubs boto3.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import grpc
import pytest
from shopmesh.awsstub import KmsProxy
from _services import channel, expect_status, payments_service, run

from services.payments.admin import AdminError, payments_env_for_up, rewrap
from services.payments.audit import AUDIT_PATH, read_entries, verify
from services.payments.keys import AwsKmsCardKeyProvider, recorded_provider
from services.payments.server import payments_servicer
from services.payments.settings import CacheLimits, KmsSettings, PaymentsSettings
from services.payments.storage import DB_NAME, PaymentsStore
from services.payments.vault import CardVault, KeyUnavailableError, RecordBindingError, VaultError
from shopmesh import netns, runner
from shopmesh.awsstub import MotoServer, moto_server
from shopmesh.config import ConfigError
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
TOKEN_A, TOKEN_B = "tok_" + "a" * 32, "tok_" + "b" * 32


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def kms(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[KmsProxy]:
    """The proxy in front of moto, and the environment that points boto3 at it."""
    proxy = KmsProxy(moto)
    proxy.start()
    for name, value in proxy.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield proxy
    finally:
        proxy.stop()


def moto_kms(moto: MotoServer):  # type: ignore[no-untyped-def]
    """A client that talks to moto directly (key administration, not counted)."""
    return boto3.client(
        "kms", endpoint_url=moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def new_key(moto: MotoServer) -> str:
    return str(moto_kms(moto).create_key(Description="test card key")["KeyMetadata"]["Arn"])


def card(number: str) -> payments_pb2.TokenizeRequest:
    return payments_pb2.TokenizeRequest(card_number=number, exp_month=12, exp_year=2031, cvv="123")


def charge(token: str, key: str) -> payments_pb2.ChargeRequest:
    return payments_pb2.ChargeRequest(token=token, amount_minor=1299, currency="EUR", idempotency_key=key)


def rows(data_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return conn.execute(sql).fetchall()


def assert_no_pan(data_dir: Path, number: str) -> None:
    groups = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    for path in (p for p in data_dir.rglob("*") if p.is_file()):
        content = path.read_bytes()
        for spelling in (number, groups, groups.replace(" ", "-")):
            assert spelling.encode() not in content, f"{spelling} in {path}"


def test_cards_sealed_under_kms_and_a_swapped_context_fails(tmp_path: Path, kms: KmsProxy, moto: MotoServer) -> None:
    """Rows 30, 31: the stored record is an ESDK message naming the KMS key; a swapped token fails."""
    arn = new_key(moto)

    async def body() -> str:
        async with payments_service(tmp_path, keys=AwsKmsCardKeyProvider(arn)) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            paid = await stub.Charge(charge(token, "kms-1"))
            assert paid.status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            return token

    token = run(body())
    assert kms.count("GenerateDataKey") >= 1 and kms.count("Decrypt") >= 1
    ((ciphertext, key_provider),) = rows(tmp_path, "SELECT ciphertext, key_provider FROM cards")
    # Encryption SDK message v2 whose one encrypted data key was made by this KMS key.
    assert ciphertext[0] == 0x02 and arn.encode() in ciphertext
    assert key_provider == f"aws-kms:{arn}"
    assert recorded_provider(tmp_path) == KmsSettings(kind="aws", key_id=arn)
    assert_no_pan(tmp_path, VISA)
    assert f"aws-kms:{arn}" in {e["details"].get("key") for e in read_entries(tmp_path / AUDIT_PATH)}

    vault = CardVault(AwsKmsCardKeyProvider(arn))
    assert vault.open(token, ciphertext) == VISA
    with pytest.raises(RecordBindingError) as info:
        vault.open(TOKEN_B, ciphertext)
    assert VISA not in str(info.value)
    # Editing the token stored in the message: KMS itself refuses (the context is its AAD).
    tampered = bytearray(ciphertext)
    at = bytes(tampered).index(token.encode())
    tampered[at : at + len(token)] = TOKEN_B.encode()
    with pytest.raises(VaultError) as refused:
        vault.open(TOKEN_B, bytes(tampered))
    assert not isinstance(refused.value, KeyUnavailableError)


def test_reaching_a_data_key_cache_limit_fetches_a_new_data_key(kms: KmsProxy, moto: MotoServer) -> None:
    """Row 32: counted at KMS, GenerateDataKey happens again exactly when a limit is reached."""
    arn = new_key(moto)

    def data_keys_for(limits: CacheLimits, messages: int) -> int:
        vault = CardVault(AwsKmsCardKeyProvider(arn), limits)
        before = kms.count("GenerateDataKey")
        for _ in range(messages):
            vault.seal(TOKEN_A, VISA)
        return kms.count("GenerateDataKey") - before

    # 7 messages, at most 3 per data key: 3 data keys.
    assert data_keys_for(CacheLimits(max_messages=3), 7) == 3
    # 16-byte card numbers, at most 40 bytes per data key: 2 messages each, 4 data keys.
    assert data_keys_for(CacheLimits(max_bytes=40), 7) == 4
    # A different record (another encryption context) never shares a data key.
    vault = CardVault(AwsKmsCardKeyProvider(arn))
    before = kms.count("GenerateDataKey")
    vault.seal(TOKEN_A, VISA)
    vault.seal(TOKEN_B, VISA)
    assert kms.count("GenerateDataKey") - before == 2

    # Age: with a 0.3 s limit, sealing again keeps using the data key until it is too old.
    aged = CardVault(AwsKmsCardKeyProvider(arn), CacheLimits(max_age_s=0.3))
    aged.seal(TOKEN_A, VISA)
    first = kms.count("GenerateDataKey")
    deadline = time.monotonic() + 15
    while kms.count("GenerateDataKey") == first:
        assert time.monotonic() < deadline, "no new data key after the cache entry aged out"
        aged.seal(TOKEN_A, VISA)

    # Decryption: one record opened five times costs one KMS Decrypt.
    sealed = vault.seal(TOKEN_A, VISA)
    before = kms.count("Decrypt")
    for _ in range(5):
        assert vault.open(TOKEN_A, sealed) == VISA
    assert kms.count("Decrypt") - before == 1


def test_kms_unreachable_is_unavailable_leaves_nothing_behind_and_recovers(tmp_path: Path, kms: KmsProxy, moto: MotoServer) -> None:
    """Row 33: KMS down → UNAVAILABLE, no card, charge or intent written; back up → works, no restart."""
    arn = new_key(moto)

    async def body() -> None:
        async with payments_service(tmp_path, keys=AwsKmsCardKeyProvider(arn)) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            # KMS down before the first card: not even the fingerprint key can be made.
            kms.stop()
            details = await expect_status(stub.Tokenize(card(VISA)), grpc.StatusCode.UNAVAILABLE)
            assert details == "the card key service is unreachable; nothing was stored; retry later"
            assert rows(tmp_path, "SELECT count(*) FROM wrapped_keys") == [(0,)]
            kms.start()
            token = (await stub.Tokenize(card(VISA))).token

            kms.stop()
            details = await expect_status(stub.Tokenize(card(MASTERCARD)), grpc.StatusCode.UNAVAILABLE)
            assert MASTERCARD not in details
            details = await expect_status(stub.Charge(charge(token, "during-outage")), grpc.StatusCode.UNAVAILABLE)
            assert details == "the card key service is unreachable; no charge was made; retry later"
            assert rows(tmp_path, "SELECT count(*) FROM cards") == [(1,)]
            assert rows(tmp_path, "SELECT count(*) FROM charges") == [(0,)]
            assert rows(tmp_path, "SELECT count(*) FROM charge_intents") == [(0,)]

            kms.start()
            # Recovered by itself: the same retries now succeed, and charge once.
            other = await stub.Tokenize(card(MASTERCARD))
            paid = await stub.Charge(charge(token, "during-outage"))
            assert paid.status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            assert await stub.Charge(charge(token, "during-outage")) == paid
            assert other.token != token

    run(body())
    assert rows(tmp_path, "SELECT count(*) FROM charges") == [(1,)]
    entries = read_entries(tmp_path / AUDIT_PATH)
    unavailable = {(e["operation"], e["outcome"]) for e in entries if e["outcome"] == "unavailable"}
    assert {("tokenize", "unavailable"), ("charge", "unavailable"), ("detokenize", "unavailable"),
            ("key.generate-data-key", "unavailable"), ("key.decrypt-data-key", "unavailable")} <= unavailable
    assert verify(tmp_path / AUDIT_PATH).entries == len(entries)
    assert_no_pan(tmp_path, VISA)
    assert_no_pan(tmp_path, MASTERCARD)


def test_rotating_to_a_new_kms_key_then_rewrap_retires_the_old_one(tmp_path: Path, kms: KmsProxy, moto: MotoServer) -> None:
    """Row 34: records under the old key still decrypt; rewrap moves them; the old key can be disabled."""
    old, new = new_key(moto), new_key(moto)

    async def tokenize(provider: AwsKmsCardKeyProvider, numbers: list[str]) -> list[str]:
        async with payments_service(tmp_path, keys=provider) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            return [(await stub.Tokenize(card(n))).token for n in numbers]

    tokens = run(tokenize(AwsKmsCardKeyProvider(old), [VISA, MASTERCARD, "6011111111111117"]))
    rotated = AwsKmsCardKeyProvider(new, decrypt_key_ids=[old])
    tokens += run(tokenize(rotated, ["4111111111111111", VISA]))
    assert tokens[4] == tokens[0], "the fingerprint key, wrapped under the old key, still finds duplicates"
    store = PaymentsStore.in_data_dir(tmp_path)
    assert store.key_providers_in_use() == {f"aws-kms:{old}": 3, f"aws-kms:{new}": 1}

    lines: list[str] = []
    result = rewrap(tmp_path, rotated, max_records=3, out=lines.append)
    assert (result.done, result.total, result.finished) == (3, 4, False)
    result = rewrap(tmp_path, rotated, out=lines.append)
    assert (result.done, result.total, result.finished) == (4, 4, True)
    assert lines[0].startswith("rewrap: starting run") and lines[2].startswith("rewrap: resuming run")
    assert store.key_providers_in_use() == {f"aws-kms:{new}": 4}
    assert rows(tmp_path, "SELECT key_provider FROM wrapped_keys") == [(f"aws-kms:{new}",)]

    # moto 5.2 accepts only the bare key id here (an ARN gives it a KeyError).
    moto_kms(moto).disable_key(KeyId=old.rsplit("/", 1)[1])

    async def charge_all() -> None:
        provider = AwsKmsCardKeyProvider(new)  # the old key is no longer trusted at all
        async with payments_service(tmp_path, keys=provider) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            for i, token in enumerate(tokens[:4]):
                paid = await stub.Charge(charge(token, f"after-rewrap-{i}"))
                assert paid.status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            assert (await stub.Tokenize(card(MASTERCARD))).token == tokens[1]

    run(charge_all())


def test_kms_options_for_shopmesh_up(kms: KmsProxy, moto: MotoServer, tmp_path: Path) -> None:
    def options(**given: object) -> argparse.Namespace:
        return argparse.Namespace(**{"kms": "local", "kms_key_id": None, "kms_create": False, "kms_decrypt_key_id": [], **given})

    assert payments_env_for_up(options(), tmp_path) == {"SHOPMESH_KMS": "local"}
    printed: list[str] = []
    env = payments_env_for_up(options(kms="aws", kms_create=True), tmp_path, out=printed.append)
    arn = env["SHOPMESH_KMS_KEY_ID"]
    assert env["SHOPMESH_KMS"] == "aws" and arn.startswith("arn:aws:kms:us-east-1:")
    assert moto_kms(moto).describe_key(KeyId=arn)["KeyMetadata"]["Enabled"] is True
    assert f"--kms-key-id {arn}" in printed[0]
    env = payments_env_for_up(options(kms="aws", kms_key_id=arn, kms_decrypt_key_id=[new_key(moto)]), tmp_path)
    assert env["SHOPMESH_KMS_DECRYPT_KEY_IDS"].startswith("arn:aws:kms:")
    for bad, message in [
        (options(kms="aws"), "--kms=aws needs --kms-key-id"),
        (options(kms_create=True), "--kms-create needs --kms aws"),
        (options(kms="aws", kms_create=True, kms_key_id=arn), "exclude each other"),
        (options(kms_key_id=arn), "--kms-key-id is set but --kms=local"),
    ]:
        with pytest.raises(AdminError) as info:
            payments_env_for_up(bad, tmp_path)
        assert message in str(info.value)


def test_loopback_aws_endpoints_are_rewritten_for_pod_processes() -> None:
    record = runner.MeshRecord(
        state_dir="/tmp/x", mode="netns", ttl_s=10, ca_join="", ca_renew="", external="127.0.0.1:8080",
        mesh_id="abcd", subnet="10.89.7.0/24",
    )
    host_ip = netns.PodNetwork("abcd", "10.89.7.0/24").host_ip
    environ = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
        "AWS_ENDPOINT_URL_KMS": "http://localhost:4566/",
        "AWS_ENDPOINT_URL_ACM_PCA": "https://acm-pca.eu-west-1.amazonaws.com",
        "AWS_REGION": "us-east-1",
    }
    assert runner.pod_aws_endpoints(record, environ) == {
        "AWS_ENDPOINT_URL": f"http://{host_ip}:5000",
        "AWS_ENDPOINT_URL_KMS": f"http://{host_ip}:4566/",
    }
    record.mode, record.mesh_id, record.subnet = "loopback", None, None
    assert runner.pod_aws_endpoints(record, environ) == {}


def test_payments_refuses_aws_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = PaymentsSettings(
        kms=KmsSettings(kind="aws", key_id="arn:aws:kms:us-east-1:111122223333:key/k"), cache=CacheLimits()
    )
    with pytest.raises(ConfigError) as info, payments_servicer(tmp_path, settings=settings):
        pass
    assert "no AWS credentials" in str(info.value) and "key/k" in str(info.value)
