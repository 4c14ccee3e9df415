"""Payments: tokenization, ciphertext-only storage, idempotent charges and refunds."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from _services import (
    ORDERS_XFCC,
    app_process,
    channel,
    check_app_lifecycle,
    expect_status,
    free_port,
    payments_service,
    run,
    wait_serving,
)

from services.payments.audit import AUDIT_PATH, AuditChainBroken, AuditError, AuditLog, read_entries, verify
from services.payments.cards import looks_like_luhn_number
from services.payments.keys import LOCAL_KEY_PATH, LocalCardKeyProvider
from services.payments.processor import LEDGER_NAME, CardOnFile, ProcessorLedger, SimulatedCardProcessor
from services.payments.server import SERVICE_NAME
from services.payments.settings import CacheLimits, settings_from_env
from services.payments.storage import DB_NAME, PaymentsStore
from services.payments.vault import CardVault, RecordBindingError, VaultError
from shopmesh.config import ConfigError
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
AMEX = "378282246310005"
DECLINE = "4000000000000002"
NO_FUNDS = "4000000000009995"
CHARGE_ID_SHAPE = r"ch_[0-9a-f]{24}"


def card(number: str = VISA, cvv: str = "123") -> payments_pb2.TokenizeRequest:
    return payments_pb2.TokenizeRequest(card_number=number, exp_month=12, exp_year=2031, cvv=cvv)


def charge(token: str, key: str, amount: int = 1299, currency: str = "EUR", **extra: str) -> payments_pb2.ChargeRequest:
    return payments_pb2.ChargeRequest(token=token, amount_minor=amount, currency=currency, idempotency_key=key, **extra)


def pan_spellings(number: str) -> list[bytes]:
    groups = [number[i : i + 4] for i in range(0, len(number), 4)]
    spellings = [number, " ".join(groups), "-".join(groups)]
    return [s.encode(enc) for s in spellings for enc in ("ascii", "utf-16-le")]


def assert_pan_nowhere(data_dir: Path, number: str) -> None:
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()
        for spelling in pan_spellings(number):
            assert spelling not in content, f"{spelling!r} found in {path}"


def charge_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return int(conn.execute("SELECT count(*) FROM charges").fetchone()[0])


def test_tokenize_returns_a_random_token_and_stores_only_ciphertext(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            first = await stub.Tokenize(card("4242 4242 4242 4242"))
            other = await stub.Tokenize(card(MASTERCARD))
            assert first.token != other.token
            for reply in (first, other):
                assert reply.token.startswith("tok_") and len(reply.token) == 36
                assert not looks_like_luhn_number(reply.token)
            assert (first.brand, first.last4) == ("visa", "4242")
            assert (other.brand, other.last4) == ("mastercard", "4444")
            # The token is usable: the card decrypts for a charge.
            charged = await stub.Charge(charge(first.token, "k1"))
            assert charged.status == payments_pb2.CHARGE_STATUS_SUCCEEDED

    run(body())
    assert_pan_nowhere(tmp_path, VISA)
    assert_pan_nowhere(tmp_path, MASTERCARD)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(cards)")}
        rows = conn.execute("SELECT brand, last4, exp_month, exp_year, ciphertext, fingerprint FROM cards").fetchall()
    assert not {c for c in columns if "cvv" in c or c in ("number", "pan", "card_number")}
    assert len(rows) == 2
    for _brand, _last4, month, year, ciphertext, fingerprint in rows:
        assert (month, year) == (12, 2031)
        # An AWS Encryption SDK message, format version 2 (key commitment).
        assert ciphertext[0] == 0x02 and len(ciphertext) > 200
        # A keyed fingerprint: not a plain hash anyone could recompute from a candidate number.
        assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
        assert fingerprint not in {hashlib.sha256(n.encode()).hexdigest() for n in (VISA, MASTERCARD)}
    assert VISA not in caplog.text and "4242 4242" not in caplog.text


def test_the_same_card_gets_the_same_token(tmp_path: Path) -> None:
    """Duplicates are found by the keyed fingerprint, also across servers tokenizing at once."""

    async def body() -> None:
        async with (
            payments_service(tmp_path) as (address_a, _),
            payments_service(tmp_path) as (address_b, _),
            channel(address_a) as chan_a,
            channel(address_b) as chan_b,
        ):
            stubs = [payments_pb2_grpc.PaymentsStub(chan_a), payments_pb2_grpc.PaymentsStub(chan_b)]
            spellings = [VISA, "4242 4242 4242 4242", "4242-4242-4242-4242"]
            replies = await asyncio.gather(*(stubs[i % 2].Tokenize(card(spellings[i % 3])) for i in range(12)))
            assert len({r.token for r in replies}) == 1
            # A renewed card (same number, new expiry) keeps its token and gets the new expiry.
            renewed = await stubs[0].Tokenize(
                payments_pb2.TokenizeRequest(card_number=VISA, exp_month=3, exp_year=2033, cvv="999")
            )
            assert renewed.token == replies[0].token
            assert (await stubs[1].Tokenize(card(AMEX, cvv="1234"))).token != renewed.token

    run(body())
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        rows = conn.execute("SELECT brand, exp_month, exp_year FROM cards ORDER BY brand").fetchall()
        (wrapped,) = conn.execute("SELECT count(*) FROM wrapped_keys").fetchone()
    assert rows == [("amex", 12, 2031), ("visa", 3, 2033)]
    # One fingerprint key, stored only wrapped (an Encryption SDK message).
    assert wrapped == 1
    assert_pan_nowhere(tmp_path, VISA)


def test_the_wrapping_key_file_is_private_and_reused(tmp_path: Path) -> None:
    provider = LocalCardKeyProvider.in_data_dir(tmp_path)
    key_file = tmp_path / LOCAL_KEY_PATH
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700
    assert len(key_file.read_bytes()) == 32
    sealed = CardVault(provider).seal("tok_" + "a" * 32, VISA)
    # A second start loads the same key and opens what the first sealed.
    again = LocalCardKeyProvider.in_data_dir(tmp_path)
    assert CardVault(again).open("tok_" + "a" * 32, sealed) == VISA
    # Another data directory means another key: the record does not open.
    with pytest.raises(VaultError):
        CardVault(LocalCardKeyProvider.in_data_dir(tmp_path / "other")).open("tok_" + "a" * 32, sealed)


def test_a_wrapping_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    LocalCardKeyProvider.in_data_dir(tmp_path)
    (tmp_path / LOCAL_KEY_PATH).chmod(0o644)
    with pytest.raises(ConfigError) as info:
        LocalCardKeyProvider.in_data_dir(tmp_path)
    assert "mode 0644" in str(info.value) and "card-wrapping.key" in str(info.value)


def test_decrypting_under_a_swapped_token_fails(tmp_path: Path) -> None:
    vault = CardVault(LocalCardKeyProvider.in_data_dir(tmp_path))
    token_a, token_b = "tok_" + "a" * 32, "tok_" + "b" * 32
    sealed_for_a = vault.seal(token_a, VISA)
    assert vault.open(token_a, sealed_for_a) == VISA
    with pytest.raises(RecordBindingError) as info:
        vault.open(token_b, sealed_for_a)
    assert VISA not in str(info.value)
    # Tampering with the message (e.g. its stored context) breaks authentication.
    tampered = bytearray(sealed_for_a)
    index = bytes(tampered).index(token_a.encode())
    tampered[index : index + len(token_a)] = token_b.encode()
    with pytest.raises(VaultError):
        vault.open(token_b, bytes(tampered))


def test_a_card_record_moved_to_another_token_is_never_charged(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            a = (await stub.Tokenize(card(VISA))).token
            b = (await stub.Tokenize(card(DECLINE))).token
            with sqlite3.connect(tmp_path / DB_NAME) as conn:
                (cipher_a,) = conn.execute("SELECT ciphertext FROM cards WHERE token = ?", (a,)).fetchone()
                (cipher_b,) = conn.execute("SELECT ciphertext FROM cards WHERE token = ?", (b,)).fetchone()
                conn.execute("UPDATE cards SET ciphertext = ? WHERE token = ?", (cipher_a, b))
                conn.execute("UPDATE cards SET ciphertext = ? WHERE token = ?", (cipher_b, a))
            details = await expect_status(stub.Charge(charge(b, "swap-1")), grpc.StatusCode.DATA_LOSS)
            assert b in details and "no charge was made" in details
            assert charge_rows(tmp_path) == 0

    run(body())


def test_tokenize_rejects_bad_cards_without_echoing_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = [
        (card("4242424242424241"), "card number fails the Luhn check"),
        (card("4242 4242 4243"), "card number fails the Luhn check"),
        (card("42424242424"), "card number must be 12 to 19 digits"),
        (card("4242x4242x4242x4242"), "card number may contain only digits, spaces and dashes"),
        (card("4" * 200), "card number is longer than 64 characters"),
        (card(VISA, cvv="12"), "cvv must be 3 digits"),
        (card(VISA, cvv="9" * 100), "cvv is longer than 64 characters"),
        (payments_pb2.TokenizeRequest(card_number=VISA, exp_month=13, exp_year=2031, cvv="123"), "exp_month must be 1 to 12, got 13"),
        (payments_pb2.TokenizeRequest(card_number=VISA, exp_month=1, exp_year=2020, cvv="123"), "card expired at the end of 2020-01"),
    ]

    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            for request, message in bad:
                details = await expect_status(stub.Tokenize(request), grpc.StatusCode.INVALID_ARGUMENT)
                assert details == message
                assert request.card_number not in details

    run(body())
    for request, _ in bad:
        assert request.card_number not in caplog.text
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("SELECT count(*) FROM cards").fetchone()[0] == 0


def test_charges_succeed_or_decline_and_are_stored(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            good = (await stub.Tokenize(card(VISA))).token
            declined = (await stub.Tokenize(card(DECLINE))).token
            broke = (await stub.Tokenize(card(NO_FUNDS))).token

            ok = await stub.Charge(charge(good, "order:1", 2599, description="ShopMesh order 1"))
            assert ok.status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            assert (ok.amount_minor, ok.currency, ok.refunded_minor, ok.decline_reason) == (2599, "EUR", 0, "")
            assert (ok.brand, ok.last4, ok.processor) == ("visa", "4242", "simulated")
            assert ok.charge_id.startswith("ch_") and len(ok.charge_id) == 27
            assert await stub.GetCharge(payments_pb2.GetChargeRequest(charge_id=ok.charge_id)) == ok

            for token, reason in ((declined, "card_declined"), (broke, "insufficient_funds")):
                reply = await stub.Charge(charge(token, f"decline-{reason}"))
                assert reply.status == payments_pb2.CHARGE_STATUS_DECLINED
                assert reply.decline_reason == reason
                assert await stub.GetCharge(payments_pb2.GetChargeRequest(charge_id=reply.charge_id)) == reply
                # A decline is idempotent too: the retry returns the same stored decline.
                assert await stub.Charge(charge(token, f"decline-{reason}")) == reply
            assert charge_rows(tmp_path) == 3

    run(body())


def test_charge_is_idempotent_per_key(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            other = (await stub.Tokenize(card("5555555555554444"))).token
            first = await stub.Charge(charge(token, "key-1", 1000))
            assert await stub.Charge(charge(token, "key-1", 1000)) == first
            for different in (charge(token, "key-1", 1001), charge(token, "key-1", 1000, "USD"), charge(other, "key-1", 1000)):
                details = await expect_status(stub.Charge(different), grpc.StatusCode.FAILED_PRECONDITION)
                assert "idempotency_key 'key-1' was already used for a different charge" in details
                assert first.charge_id in details
            second = await stub.Charge(charge(token, "key-2", 1000))
            assert second.charge_id != first.charge_id
            assert charge_rows(tmp_path) == 2

    run(body())


def test_concurrent_duplicate_charges_make_exactly_one_charge(tmp_path: Path) -> None:
    """Same key from many callers at once, through two servers sharing one database.

    Two servers (as two processes would) bypass the in-process lock, so the
    database's UNIQUE idempotency key is what keeps it to one charge.
    """

    async def body() -> None:
        async with (
            payments_service(tmp_path) as (address_a, _),
            payments_service(tmp_path) as (address_b, _),
            channel(address_a) as chan_a,
            channel(address_b) as chan_b,
        ):
            stub_a = payments_pb2_grpc.PaymentsStub(chan_a)
            stub_b = payments_pb2_grpc.PaymentsStub(chan_b)
            token = (await stub_a.Tokenize(card(VISA))).token
            calls = [(stub_a if i % 2 else stub_b).Charge(charge(token, "order:concurrent", 4200)) for i in range(24)]
            replies = await asyncio.gather(*calls)
            assert len({r.charge_id for r in replies}) == 1
            assert all(r.status == payments_pb2.CHARGE_STATUS_SUCCEEDED and r.amount_minor == 4200 for r in replies)
            assert charge_rows(tmp_path) == 1
            # The processor authorized once: its ledger is the money side of "exactly one charge".
            assert ProcessorLedger(tmp_path / LEDGER_NAME).count() == 1

    run(body())


@pytest.mark.parametrize(
    ("request_fields", "code", "message_part"),
    [
        ({"token": "tok_" + "0" * 32}, grpc.StatusCode.NOT_FOUND, "unknown token 'tok_00000000000000000000000000000000'"),
        ({"token": VISA}, grpc.StatusCode.INVALID_ARGUMENT, "token is not a card token"),
        ({"token": ""}, grpc.StatusCode.INVALID_ARGUMENT, "token is not a card token"),
        ({"token": "tok_" + "0" * 32 + "\n"}, grpc.StatusCode.INVALID_ARGUMENT, "token is not a card token"),
        ({"amount_minor": 0}, grpc.StatusCode.INVALID_ARGUMENT, "amount_minor must be greater than 0, got 0"),
        ({"amount_minor": -5}, grpc.StatusCode.INVALID_ARGUMENT, "amount_minor must be greater than 0, got -5"),
        ({"currency": ""}, grpc.StatusCode.INVALID_ARGUMENT, "three-letter ISO 4217 code"),
        ({"currency": "EURO"}, grpc.StatusCode.INVALID_ARGUMENT, "three-letter ISO 4217 code"),
        ({"currency": "XYZ"}, grpc.StatusCode.INVALID_ARGUMENT, "currency 'XYZ' is not an active ISO 4217 currency code"),
        ({"currency": "HRK"}, grpc.StatusCode.INVALID_ARGUMENT, "currency 'HRK' is not an active"),
        ({"currency": "eur"}, grpc.StatusCode.INVALID_ARGUMENT, "(codes are upper case: EUR)"),
        ({"idempotency_key": ""}, grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key is required"),
        ({"idempotency_key": "k" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "129 characters long; the limit is 128"),
        ({"idempotency_key": "a\nb"}, grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
        ({"idempotency_key": f"pay {VISA}"}, grpc.StatusCode.INVALID_ARGUMENT, "must not contain a card number"),
        ({"description": f"card {VISA}"}, grpc.StatusCode.INVALID_ARGUMENT, "description must not contain a card number"),
        ({"description": "d" * 257}, grpc.StatusCode.INVALID_ARGUMENT, "257 characters long; the limit is 256"),
    ],
)
def test_charge_rejects_bad_requests(
    tmp_path: Path, request_fields: dict[str, object], code: grpc.StatusCode, message_part: str
) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            fields: dict[str, object] = {"token": token, "amount_minor": 100, "currency": "EUR", "idempotency_key": "k"}
            fields.update(request_fields)
            details = await expect_status(stub.Charge(payments_pb2.ChargeRequest(**fields)), code)  # type: ignore[arg-type]
            assert message_part in details
            assert VISA not in details
            assert charge_rows(tmp_path) == 0

    run(body())


def test_the_longest_idempotency_key_is_accepted(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            reply = await stub.Charge(charge(token, "k" * 128))
            assert reply.status == payments_pb2.CHARGE_STATUS_SUCCEEDED

    run(body())


def test_refunds_partial_full_and_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            paid = await stub.Charge(charge(token, "c1", 1000))

            part = await stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=300, idempotency_key="r1"))
            assert part.refund_id.startswith("re_")
            assert part.charge.status == payments_pb2.CHARGE_STATUS_PARTIALLY_REFUNDED
            assert part.charge.refunded_minor == 300
            # Same key, same refund: the same answer, no second refund.
            again = await stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=300, idempotency_key="r1"))
            assert again.refund_id == part.refund_id and again.charge.refunded_minor == 300
            details = await expect_status(
                stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=301, idempotency_key="r1")),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert "idempotency_key 'r1' was already used for a refund of 300" in details

            details = await expect_status(
                stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=701, idempotency_key="r2")),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert details == f"refund of 701 exceeds the 700 EUR left to refund on {paid.charge_id}"

            rest = await stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=700, idempotency_key="r3"))
            assert rest.charge.status == payments_pb2.CHARGE_STATUS_REFUNDED
            assert rest.charge.refunded_minor == 1000
            assert (await stub.GetCharge(payments_pb2.GetChargeRequest(charge_id=paid.charge_id))) == rest.charge
            await expect_status(
                stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=1, idempotency_key="r4")),
                grpc.StatusCode.FAILED_PRECONDITION,
            )

            declined_token = (await stub.Tokenize(card(DECLINE))).token
            declined = await stub.Charge(charge(declined_token, "c2"))
            details = await expect_status(
                stub.Refund(payments_pb2.RefundRequest(charge_id=declined.charge_id, amount_minor=1, idempotency_key="r5")),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert details == f"charge {declined.charge_id} was declined; there is nothing to refund"

            details = await expect_status(
                stub.Refund(payments_pb2.RefundRequest(charge_id="ch_" + "0" * 24, amount_minor=1, idempotency_key="r6")),
                grpc.StatusCode.NOT_FOUND,
            )
            assert details == "unknown charge id 'ch_000000000000000000000000'"
            for bad in (
                payments_pb2.RefundRequest(charge_id="nope", amount_minor=1, idempotency_key="r7"),
                payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=0, idempotency_key="r7"),
                payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=1, idempotency_key=""),
            ):
                await expect_status(stub.Refund(bad), grpc.StatusCode.INVALID_ARGUMENT)

    run(body())


def test_concurrent_refunds_never_exceed_the_charge(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            paid = await stub.Charge(charge(token, "c1", 1000))
            calls = [
                stub.Refund(payments_pb2.RefundRequest(charge_id=paid.charge_id, amount_minor=400, idempotency_key=f"r{i}"))
                for i in range(6)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            succeeded = [r for r in results if isinstance(r, payments_pb2.RefundResponse)]
            failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(succeeded) == 2 and len(failed) == 4
            assert all(f.code() == grpc.StatusCode.FAILED_PRECONDITION for f in failed)
            final = await stub.GetCharge(payments_pb2.GetChargeRequest(charge_id=paid.charge_id))
            assert final.refunded_minor == 800
            assert final.status == payments_pb2.CHARGE_STATUS_PARTIALLY_REFUNDED

    run(body())


def test_get_charge_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            details = await expect_status(
                stub.GetCharge(payments_pb2.GetChargeRequest(charge_id="ch_" + "f" * 24)), grpc.StatusCode.NOT_FOUND
            )
            assert details == f"unknown charge id 'ch_{'f' * 24}'"
            for bad in ("", "ch_123", "CH_" + "f" * 24, "ch_" + "f" * 24 + "\n", VISA):
                details = await expect_status(
                    stub.GetCharge(payments_pb2.GetChargeRequest(charge_id=bad)), grpc.StatusCode.INVALID_ARGUMENT
                )
                assert VISA not in details

    run(body())


def test_operations_are_audited_with_the_caller_identity_and_never_the_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def body() -> tuple[str, str]:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            await expect_status(stub.Tokenize(card("4242424242424241")), grpc.StatusCode.INVALID_ARGUMENT)
            reply = await stub.Charge(charge(token, "audited"), metadata=(ORDERS_XFCC,))
            await stub.Refund(
                payments_pb2.RefundRequest(charge_id=reply.charge_id, amount_minor=100, idempotency_key="r1"),
                metadata=(ORDERS_XFCC,),
            )
            return token, reply.charge_id

    token, charge_id = run(body())
    orders_id = "spiffe://shopmesh.internal/ns/shop/sa/orders"
    log_path = tmp_path / AUDIT_PATH
    entries = read_entries(log_path)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))

    def one(operation: str, **fields: object) -> dict:
        found = [e for e in entries if e["operation"] == operation and all(e.get(k) == v for k, v in fields.items())]
        assert found, f"no {operation} entry with {fields} in {entries}"
        return found[0]

    tokenized = one("tokenize", token=token, outcome="ok", caller="anonymous")
    assert tokenized["details"] == {"brand": "visa", "existing": False}
    one("tokenize", token=None, outcome="invalid_argument", caller="anonymous")
    detokenized = one("detokenize", token=token, outcome="ok", caller=orders_id)
    assert detokenized["details"]["key"] == "local:card-wrapping-key-v1"
    charged = one("charge", token=token, outcome="ok", caller=orders_id)
    assert charged["details"]["charge_id"] == charge_id
    one("refund", token=token, outcome="ok", caller=orders_id)
    # Key use: a data key generated for the card (when it was sealed) and
    # unwrapped for the charge, each with the key and the caller it served.
    generated = one("key.generate-data-key", token=token, outcome="ok", caller="anonymous")
    assert generated["details"] == {"purpose": "card-number", "key": "local:card-wrapping-key-v1"}
    one("key.decrypt-data-key", token=token, outcome="ok", caller=orders_id)
    for entry in entries:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert verify(log_path).entries == len(entries)
    assert_pan_nowhere(tmp_path, VISA)
    # The same story in the service log, one line per entry.
    audit_lines = [r.getMessage() for r in caplog.records if r.name == "services.payments.audit"]
    assert any(m.startswith(f"detokenize token={token} outcome=ok") and m.endswith(f"caller={orders_id}") for m in audit_lines)
    assert VISA not in caplog.text


def test_the_audit_log_detects_tampering(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    audit = AuditLog(log_path)
    for i in range(5):
        audit.append("tokenize", "ok", token=f"tok_{i:032x}", caller="spiffe://shopmesh.internal/ns/shop/sa/ingress")
    assert verify(log_path).entries == 5
    assert log_path.stat().st_mode & 0o777 == 0o600
    original = log_path.read_bytes()
    lines = original.splitlines(keepends=True)

    def broken_at(content: bytes) -> AuditChainBroken:
        log_path.write_bytes(content)
        with pytest.raises(AuditChainBroken) as info:
            verify(log_path)
        return info.value

    edited = lines[2].replace(b'"outcome":"ok"', b'"outcome":"denied"')
    assert broken_at(b"".join([*lines[:2], edited, *lines[3:]])).line == 3
    assert "modified" in broken_at(b"".join([*lines[:2], edited, *lines[3:]])).reason
    assert broken_at(b"".join([*lines[:2], *lines[3:]])).line == 3  # an entry removed
    assert broken_at(b"".join([lines[0], lines[2], lines[1], *lines[3:]])).line == 2  # reordered
    assert broken_at(original[:-5]).line == 5  # cut off mid-entry
    # A card number is refused before anything is written.
    log_path.write_bytes(original)
    with pytest.raises(AuditError):
        audit.append("tokenize", "ok", details={"note": f"card {VISA}"})
    assert log_path.read_bytes() == original
    # The CLI says the same, with the exit status.
    proc = subprocess.run(
        [sys.executable, "-m", "shopmesh.cli", "payments", "audit", "verify", "--audit-log", str(log_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and "OK, 5 entries" in proc.stdout, proc.stderr
    log_path.write_bytes(b"".join([*lines[:2], edited, *lines[3:]]))
    proc = subprocess.run(
        [sys.executable, "-m", "shopmesh.cli", "payments", "audit", "verify", "--audit-log", str(log_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "BROKEN at line 3: hash mismatch" in proc.stderr


def test_a_card_expired_since_tokenization_is_declined() -> None:
    card_on_file = CardOnFile(token="tok_" + "c" * 32, brand="visa", last4="4242", exp_month=10, exp_year=2026)
    revealed: list[str] = []

    def reveal(token: str) -> str:
        revealed.append(token)
        return VISA

    processor = SimulatedCardProcessor(reveal, today=lambda: dt.date(2026, 11, 1))
    result = processor.authorize(card_on_file, 100, "EUR", "k")
    assert (result.approved, result.decline_reason) == (False, "expired_card")
    assert revealed == [], "an expired card is declined without decrypting it"
    still_valid = SimulatedCardProcessor(reveal, today=lambda: dt.date(2026, 10, 31))
    assert still_valid.authorize(card_on_file, 100, "EUR", "k").approved
    assert revealed == [card_on_file.token]


def test_python_m_services_payments_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_text = check_app_lifecycle("services.payments", SERVICE_NAME, tmp_path)
    assert "listening on 127.0.0.1:" in log_text
    key_file = tmp_path / "data" / LOCAL_KEY_PATH
    assert key_file.stat().st_mode & 0o777 == 0o600


def intent_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return int(conn.execute("SELECT count(*) FROM charge_intents").fetchone()[0])


def shopmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shopmesh.cli", *args], capture_output=True, text=True, timeout=120)


def test_a_charge_killed_between_authorization_and_commit_is_made_once(tmp_path: Path) -> None:
    """Row 35 after a crash: SIGKILL payments after the processor authorized, before the commit; retry."""
    data = tmp_path / "data"
    marker = tmp_path / "paused-after-authorize"
    key = "order:ord_crash"
    first_address = f"127.0.0.1:{free_port()}"
    env = {
        "SHOPMESH_APP_LISTEN": first_address,
        "SHOPMESH_DATA_DIR": str(data),
        "SHOPMESH_PAYMENTS_PAUSE_AFTER_AUTHORIZE": str(marker),
    }
    with app_process("services.payments", env, tmp_path / "first.log") as proc:
        wait_serving(first_address, SERVICE_NAME, proc, tmp_path / "first.log")
        with grpc.insecure_channel(first_address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = stub.Tokenize(card(VISA), timeout=10).token
            in_flight = stub.Charge.future(charge(token, key, 4200), timeout=60)
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert proc.poll() is None and not in_flight.done(), (tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "the charge never reached the pause point"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                in_flight.result()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "TEST HOOK ARMED" in (tmp_path / "first.log").read_text()
    paused = json.loads(marker.read_text())
    ledger = ProcessorLedger(data / LEDGER_NAME)
    # The money moved at the processor; payments holds only the intent.
    assert ledger.count(f"charge:{key}") == 1
    assert (charge_rows(data), intent_rows(data)) == (0, 1)

    second_address = f"127.0.0.1:{free_port()}"
    env = {"SHOPMESH_APP_LISTEN": second_address, "SHOPMESH_DATA_DIR": str(data)}
    with app_process("services.payments", env, tmp_path / "second.log") as proc:
        wait_serving(second_address, SERVICE_NAME, proc, tmp_path / "second.log")
        with grpc.insecure_channel(second_address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            with pytest.raises(grpc.RpcError) as info:
                stub.Charge(charge(token, key, 4300), timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert paused["charge_id"] in info.value.details()
            retried = stub.Charge(charge(token, key, 4200), timeout=10)
            assert retried.status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            assert retried.charge_id == paused["charge_id"]
            assert stub.Charge(charge(token, key, 4200), timeout=10) == retried
    assert ledger.count() == 1
    assert (charge_rows(data), intent_rows(data)) == (1, 0)
    charges = [e for e in read_entries(data / AUDIT_PATH) if e["operation"] == "charge"]
    assert [(e["outcome"], e["details"].get("resumed")) for e in charges] == [
        ("failed_precondition", None),
        ("ok", True),
        ("replayed", None),
    ]
    assert verify(data / AUDIT_PATH).entries > 0


def test_local_key_rotation_then_a_resumable_rewrap(tmp_path: Path) -> None:
    """Row 34 with the local provider: old records decrypt after rotation; rewrap moves all to the new key."""
    numbers = [VISA, MASTERCARD, AMEX, "6011111111111117"]

    async def tokenize_all() -> list[str]:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            return [(await stub.Tokenize(card(n, cvv="1234" if n == AMEX else "123"))).token for n in numbers]

    tokens = run(tokenize_all())
    rotated = shopmesh("payments", "rotate-key", "--data-dir", str(tmp_path))
    assert rotated.returncode == 0, rotated.stderr
    assert "local:card-wrapping-key-v2" in rotated.stdout
    assert (tmp_path / "keys" / "card-wrapping-v2.key").stat().st_mode & 0o777 == 0o600

    async def after_restart() -> str:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            # Sealed under v1, charged while v2 is current.
            paid = await stub.Charge(charge(tokens[0], "before-rewrap"))
            assert paid.status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            return (await stub.Tokenize(card("4111111111111111"))).token

    tokens.append(run(after_restart()))
    store = PaymentsStore.in_data_dir(tmp_path)
    assert store.key_providers_in_use() == {"local:card-wrapping-key-v1": 4, "local:card-wrapping-key-v2": 1}

    partial = shopmesh("payments", "rewrap", "--data-dir", str(tmp_path), "--max-records", "2")
    assert partial.returncode == 0, partial.stderr
    assert "starting run" in partial.stdout and "paused after 2 cards at 2/5" in partial.stdout
    resumed = shopmesh("payments", "rewrap", "--data-dir", str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stdout and "2/5 cards done" in resumed.stdout
    assert "done: 5/5 cards re-encrypted under local:card-wrapping-key-v2" in resumed.stdout
    assert store.key_providers_in_use() == {"local:card-wrapping-key-v2": 5}
    rewraps = [e for e in read_entries(tmp_path / AUDIT_PATH) if e["operation"] == "rewrap"]
    # Each card once (the resumed run did not redo the first two), plus the fingerprint key in each run.
    assert sorted(e["token"] for e in rewraps if e["token"]) == sorted(tokens)
    assert all(e["caller"].startswith("operator:uid=") for e in rewraps)

    # The old key can go: everything, the fingerprint key included, is under v2.
    (tmp_path / LOCAL_KEY_PATH).unlink()

    async def without_the_old_key() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            for i, token in enumerate(tokens):
                assert (await stub.Charge(charge(token, f"after-{i}"))).status == payments_pb2.CHARGE_STATUS_SUCCEEDED
            assert (await stub.Tokenize(card(VISA))).token == tokens[0]

    run(without_the_old_key())
    for number in numbers:
        assert_pan_nowhere(tmp_path, number)
    verified = shopmesh("payments", "audit", "verify", "--data-dir", str(tmp_path))
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHOPMESH_KMS": "gcp"}, "SHOPMESH_KMS='gcp': expected one of local, aws"),
        ({"SHOPMESH_KMS": "aws"}, "SHOPMESH_KMS=aws needs SHOPMESH_KMS_KEY_ID"),
        ({"SHOPMESH_KMS": "aws", "SHOPMESH_KMS_KEY_ID": "alias/cards"}, "SHOPMESH_KMS_KEY_ID='alias/cards' is not a KMS key ARN"),
        ({"SHOPMESH_KMS_KEY_ID": "arn:aws:kms:us-east-1:111122223333:key/k"}, "SHOPMESH_KMS_KEY_ID is set but SHOPMESH_KMS=local"),
        ({"SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S": "0"}, "SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S='0' must be greater than 0"),
        ({"SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S": "soon"}, "SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S='soon' is not a number of seconds"),
        ({"SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES": "1.5"}, "SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES='1.5' is not a whole number"),
        ({"SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES": str(2**32 + 1)}, "at most 4294967296"),
        ({"SHOPMESH_DATA_KEY_CACHE_MAX_BYTES": "-1"}, "SHOPMESH_DATA_KEY_CACHE_MAX_BYTES='-1' must be greater than 0"),
    ],
)
def test_bad_key_and_cache_settings_are_refused_naming_the_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_env(env)
    assert message in str(info.value)


def test_settings_are_validated_before_payments_starts(tmp_path: Path) -> None:
    env = {**os.environ, "SHOPMESH_APP_LISTEN": f"127.0.0.1:{free_port()}", "SHOPMESH_DATA_DIR": str(tmp_path / "data"),
           "SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES": "many"}
    proc = subprocess.run([sys.executable, "-m", "services.payments"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES='many' is not a whole number" in proc.stderr
    defaults = settings_from_env({})
    assert (defaults.kms.kind, defaults.cache) == ("local", CacheLimits(300.0, 100, 65536))
    chosen = settings_from_env({
        "SHOPMESH_KMS": "aws",
        "SHOPMESH_KMS_KEY_ID": "arn:aws:kms:us-east-1:111122223333:key/new",
        "SHOPMESH_KMS_DECRYPT_KEY_IDS": "arn:aws:kms:us-east-1:111122223333:key/old, arn:aws:kms:us-east-1:111122223333:key/new",
        "SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S": "2.5",
    })
    assert chosen.kms.decrypt_key_ids == ("arn:aws:kms:us-east-1:111122223333:key/old",)
    assert chosen.cache.max_age_s == 2.5
