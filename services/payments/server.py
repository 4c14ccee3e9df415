"""The Payments gRPC servicer: tokenize cards, charge and refund tokens.

Card numbers enter through Tokenize only, are validated, sealed by the vault
and forgotten; every other method works with tokens. Detokenization happens
in one place (`_reveal`, called by the card processor) and is audited with
the caller's SPIFFE ID. No log line, error message or stored clear-text
field contains a card number: malformed inputs are described, not echoed,
and unexpected exceptions are reported by type only (rpc_errors with
redact_unexpected).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import secrets
from collections.abc import AsyncIterator, Hashable, Iterator
from pathlib import Path
from typing import Any

import grpc

from services.payments.cards import TOKEN_PATTERN, CardError, contains_card_number, new_token, validate_card
from services.payments.currencies import ACTIVE_CURRENCIES
from services.payments.keys import CardKeyProvider, LocalCardKeyProvider
from services.payments.processor import CardOnFile, CardProcessor, SimulatedCardProcessor
from services.payments.storage import (
    DECLINED,
    PARTIALLY_REFUNDED,
    REFUNDED,
    SUCCEEDED,
    ChargeRecord,
    PaymentsStore,
    RefundRefused,
)
from services.payments.vault import CardVault, RecordBindingError, VaultError
from shopmesh.identity import describe_caller
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.server import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    rpc_errors,
)

log = logging.getLogger(__name__)
# Who detokenized which card, and who used the keys: one line per event,
# never the number. A separate logger so it can be routed on its own.
audit = logging.getLogger("services.payments.audit")

SERVICE_NAME = payments_pb2.DESCRIPTOR.services_by_name["Payments"].full_name
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_DESCRIPTION_CHARS = 256
CHARGE_ID_PATTERN = re.compile(r"^ch_[0-9a-f]{24}$")

_STATUS = {
    SUCCEEDED: payments_pb2.CHARGE_STATUS_SUCCEEDED,
    DECLINED: payments_pb2.CHARGE_STATUS_DECLINED,
    REFUNDED: payments_pb2.CHARGE_STATUS_REFUNDED,
    PARTIALLY_REFUNDED: payments_pb2.CHARGE_STATUS_PARTIALLY_REFUNDED,
}

# The caller of the RPC being served, for the audit line written when the
# processor detokenizes (in a worker thread: asyncio.to_thread copies the
# context, so the value follows the call).
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("payments_caller", default="anonymous")

Context = grpc.aio.ServicerContext[Any, Any]


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it.

    Serializes concurrent requests with the same idempotency key inside this
    process, so the processor is asked once; the UNIQUE constraint in the
    database still decides between processes.
    """

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _check_idempotency_key(key: str) -> None:
    if not key:
        raise InvalidArgument("idempotency_key is required; retries must reuse the same key")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidArgument(f"idempotency_key is {len(key)} characters long; the limit is {MAX_IDEMPOTENCY_KEY_CHARS}")
    if not key.isprintable():
        raise InvalidArgument("idempotency_key must not contain control characters")
    # Keys are stored in clear and quoted back in errors.
    if contains_card_number(key):
        raise InvalidArgument("idempotency_key must not contain a card number")


def _check_token(token: str) -> None:
    # Not echoed: a client that mixes up fields could send a card number here.
    if not TOKEN_PATTERN.fullmatch(token):
        raise InvalidArgument("token is not a card token (expected 'tok_' followed by 32 lowercase hex digits)")


def _check_charge_id(charge_id: str) -> None:
    if not charge_id:
        raise InvalidArgument("charge_id is required")
    if not CHARGE_ID_PATTERN.fullmatch(charge_id):
        raise InvalidArgument("charge_id is not a charge id (expected 'ch_' followed by 24 lowercase hex digits)")


def _check_currency(currency: str) -> None:
    if not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise InvalidArgument("currency must be a three-letter ISO 4217 code such as EUR")
    if currency not in ACTIVE_CURRENCIES:
        hint = f" (codes are upper case: {currency.upper()})" if currency.upper() in ACTIVE_CURRENCIES else ""
        raise InvalidArgument(f"currency '{currency}' is not an active ISO 4217 currency code{hint}")


def _charge_response(record: ChargeRecord) -> payments_pb2.ChargeResponse:
    return payments_pb2.ChargeResponse(
        charge_id=record.charge_id,
        status=_STATUS[record.status],
        amount_minor=record.amount_minor,
        currency=record.currency,
        refunded_minor=record.refunded_minor,
        decline_reason=record.decline_reason,
        brand=record.brand,
        last4=record.last4,
        processor=record.processor,
    )


class PaymentsServicer(payments_pb2_grpc.PaymentsServicer):
    def __init__(
        self,
        store: PaymentsStore,
        vault: CardVault,
        processor: CardProcessor | None = None,
    ) -> None:
        self._store = store
        self._vault = vault
        self._processor: CardProcessor = processor or SimulatedCardProcessor(self._reveal)
        self._locks = KeyedLocks()

    def register(self, server: grpc.aio.Server) -> list[str]:
        payments_pb2_grpc.add_PaymentsServicer_to_server(self, server)
        return [SERVICE_NAME]

    def _reveal(self, token: str) -> str:
        """Detokenize: the only way a card number leaves the vault. Runs in a worker thread."""
        stored = self._store.get_card(token)
        if stored is None:
            raise NotFound(f"unknown token '{token}'")
        audit.info("detokenize token=%s key=%s caller=%s", token, self._vault.keys.description, _caller.get())
        return self._vault.open(token, stored.ciphertext)

    @rpc_errors(redact_unexpected=True)
    async def Tokenize(
        self, request: payments_pb2.TokenizeRequest, context: Context
    ) -> payments_pb2.TokenizeResponse:
        caller = describe_caller(context.invocation_metadata())
        try:
            card = validate_card(request.card_number, request.exp_month, request.exp_year, request.cvv)
        except CardError as exc:
            raise InvalidArgument(str(exc)) from None
        token = new_token()
        ciphertext = await asyncio.to_thread(self._vault.seal, token, card.number)
        on_file = CardOnFile(token=token, brand=card.brand, last4=card.last4, exp_month=card.exp_month, exp_year=card.exp_year)
        await asyncio.to_thread(self._store.insert_card, on_file, ciphertext, self._vault.keys.description)
        audit.info("tokenize token=%s brand=%s key=%s caller=%s", token, card.brand, self._vault.keys.description, caller)
        return payments_pb2.TokenizeResponse(token=token, brand=card.brand, last4=card.last4)

    @rpc_errors(redact_unexpected=True)
    async def Charge(self, request: payments_pb2.ChargeRequest, context: Context) -> payments_pb2.ChargeResponse:
        caller = describe_caller(context.invocation_metadata())
        _check_token(request.token)
        if request.amount_minor <= 0:
            raise InvalidArgument(f"amount_minor must be greater than 0, got {request.amount_minor}")
        _check_currency(request.currency)
        _check_idempotency_key(request.idempotency_key)
        if len(request.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(f"description is {len(request.description)} characters long; the limit is {MAX_DESCRIPTION_CHARS}")
        if contains_card_number(request.description):
            raise InvalidArgument("description must not contain a card number")

        key = request.idempotency_key
        async with self._locks.hold(("charge", key)):
            earlier = await asyncio.to_thread(self._store.charge_by_key, key)
            if earlier is not None:
                return self._replay_charge(earlier, request, caller)
            stored_card = await asyncio.to_thread(self._store.get_card, request.token)
            if stored_card is None:
                raise NotFound(f"unknown token '{request.token}'; tokenize the card first")
            card = stored_card.card
            _caller.set(caller)
            try:
                authorization = await asyncio.to_thread(
                    self._processor.authorize, card, request.amount_minor, request.currency, f"charge:{key}"
                )
            except RecordBindingError as exc:
                log.error("%s", exc)
                raise DataLoss(f"the stored card for {request.token} failed its integrity check; no charge was made") from None
            except VaultError as exc:
                log.error("%s", exc)
                raise Internal(f"the card for {request.token} could not be decrypted; no charge was made") from None
            record = ChargeRecord(
                charge_id="ch_" + secrets.token_hex(12),
                idempotency_key=key,
                token=request.token,
                amount_minor=request.amount_minor,
                currency=request.currency,
                description=request.description,
                status=SUCCEEDED if authorization.approved else DECLINED,
                decline_reason=authorization.decline_reason,
                refunded_minor=0,
                brand=card.brand,
                last4=card.last4,
                processor=self._processor.name,
            )
            stored, created = await asyncio.to_thread(self._store.insert_charge, record)
            if not created:
                # Another process stored a charge for this key first; its row is the charge.
                return self._replay_charge(stored, request, caller)
        audit.info(
            "charge charge_id=%s token=%s amount_minor=%d currency=%s status=%s%s processor=%s caller=%s",
            stored.charge_id,
            stored.token,
            stored.amount_minor,
            stored.currency,
            stored.status,
            f" decline_reason={stored.decline_reason}" if stored.decline_reason else "",
            stored.processor,
            caller,
        )
        return _charge_response(stored)

    def _replay_charge(
        self, earlier: ChargeRecord, request: payments_pb2.ChargeRequest, caller: str
    ) -> payments_pb2.ChargeResponse:
        same = (earlier.token, earlier.amount_minor, earlier.currency) == (
            request.token,
            request.amount_minor,
            request.currency,
        )
        if not same:
            raise FailedPrecondition(
                f"idempotency_key '{request.idempotency_key}' was already used for a different charge "
                f"({earlier.charge_id}); use a new key for a new charge"
            )
        log.info("charge replay charge_id=%s token=%s caller=%s", earlier.charge_id, earlier.token, caller)
        return _charge_response(earlier)

    @rpc_errors(redact_unexpected=True)
    async def Refund(self, request: payments_pb2.RefundRequest, context: Context) -> payments_pb2.RefundResponse:
        caller = describe_caller(context.invocation_metadata())
        _check_charge_id(request.charge_id)
        if request.amount_minor <= 0:
            raise InvalidArgument(f"amount_minor must be greater than 0, got {request.amount_minor}")
        _check_idempotency_key(request.idempotency_key)
        refund_id = "re_" + secrets.token_hex(12)
        try:
            refund, charge = await asyncio.to_thread(
                self._store.refund, refund_id, request.charge_id, request.amount_minor, request.idempotency_key
            )
        except RefundRefused as exc:
            if exc.reason == "unknown_charge":
                raise NotFound(exc.message) from None
            raise FailedPrecondition(exc.message) from None
        audit.info(
            "refund refund_id=%s charge_id=%s amount_minor=%d refunded_minor=%d status=%s caller=%s",
            refund.refund_id,
            charge.charge_id,
            refund.amount_minor,
            charge.refunded_minor,
            charge.status,
            caller,
        )
        return payments_pb2.RefundResponse(refund_id=refund.refund_id, charge=_charge_response(charge))

    @rpc_errors(redact_unexpected=True)
    async def GetCharge(
        self, request: payments_pb2.GetChargeRequest, context: Context
    ) -> payments_pb2.ChargeResponse:
        _check_charge_id(request.charge_id)
        record = await asyncio.to_thread(self._store.get_charge, request.charge_id)
        if record is None:
            raise NotFound(f"unknown charge id '{request.charge_id}'")
        log.info("get_charge charge_id=%s caller=%s", record.charge_id, describe_caller(context.invocation_metadata()))
        return _charge_response(record)


@contextlib.contextmanager
def payments_servicer(
    data_dir: Path,
    *,
    keys: CardKeyProvider | None = None,
    processor: CardProcessor | None = None,
) -> Iterator[PaymentsServicer]:
    """A PaymentsServicer over the database and wrapping key in data_dir."""
    key_provider = keys or LocalCardKeyProvider.in_data_dir(data_dir)
    store = PaymentsStore.in_data_dir(data_dir)
    log.info("cards are sealed under the %s", key_provider.description)
    yield PaymentsServicer(store, CardVault(key_provider), processor)
