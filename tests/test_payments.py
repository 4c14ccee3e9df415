"""Payments: tokenization, ciphertext-only storage, idempotent charges and refunds."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
from pathlib import Path

import grpc
import pytest
from _services import ORDERS_XFCC, channel, check_app_lifecycle, expect_status, payments_service, run

from services.payments.keys import LOCAL_KEY_PATH, LocalCardKeyProvider
from services.payments.processor import CardOnFile, SimulatedCardProcessor
from services.payments.server import SERVICE_NAME
from services.payments.storage import DB_NAME
from services.payments.vault import CardVault, RecordBindingError, VaultError
from shopmesh.config import ConfigError
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc

VISA = "4242424242424242"
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
            second = await stub.Tokenize(card(VISA))
            assert first.token != second.token
            for reply in (first, second):
                assert reply.token.startswith("tok_") and len(reply.token) == 36
                assert (reply.brand, reply.last4) == ("visa", "4242")
            # The token is usable: the card decrypts for a charge.
            charged = await stub.Charge(charge(first.token, "k1"))
            assert charged.status == payments_pb2.CHARGE_STATUS_SUCCEEDED

    run(body())
    assert_pan_nowhere(tmp_path, VISA)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(cards)")}
        rows = conn.execute("SELECT brand, last4, exp_month, exp_year, ciphertext FROM cards").fetchall()
    assert not {c for c in columns if "cvv" in c or c in ("number", "pan", "card_number")}
    assert len(rows) == 2
    for brand, last4, month, year, ciphertext in rows:
        assert (brand, last4, month, year) == ("visa", "4242", 12, 2031)
        # An AWS Encryption SDK message, format version 2 (key commitment).
        assert ciphertext[0] == 0x02 and len(ciphertext) > 200
    assert VISA not in caplog.text and "4242 4242" not in caplog.text


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

    async def body() -> None:
        async with payments_service(tmp_path) as (address, _), channel(address) as chan:
            stub = payments_pb2_grpc.PaymentsStub(chan)
            token = (await stub.Tokenize(card(VISA))).token
            reply = await stub.Charge(charge(token, "audited"), metadata=(ORDERS_XFCC,))
            return token, reply.charge_id

    token, charge_id = run(body())
    audit = [r.getMessage() for r in caplog.records if r.name == "services.payments.audit"]
    orders_id = "spiffe://shopmesh.internal/ns/shop/sa/orders"
    assert any(m.startswith(f"tokenize token={token}") and m.endswith("caller=anonymous") for m in audit)
    assert any(m.startswith(f"detokenize token={token}") and m.endswith(f"caller={orders_id}") for m in audit)
    assert any(f"charge charge_id={charge_id} token={token}" in m and m.endswith(f"caller={orders_id}") for m in audit)
    assert VISA not in caplog.text


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
