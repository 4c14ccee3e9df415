"""The Payments gRPC servicer: tokenize cards, charge and refund tokens.

Card numbers enter through Tokenize only, are validated, fingerprinted (the
same card gets the same token), sealed by the vault and forgotten; every
other method works with tokens. Detokenization happens in one place
(`_reveal`, called by the card processor). Every tokenization,
detokenization, charge, refund and key use is appended to the hash-chained
audit log (audit.py) with the caller's SPIFFE ID from the XFCC header its
sidecar set, and the outcome, failures included.

No log line, error message or stored clear-text field contains a card
number: malformed inputs are described, not echoed, and unexpected
exceptions are reported by type only (rpc_errors with redact_unexpected).

Charges are idempotent per idempotency key, also across a crash: an intent
is stored before the processor is called, the processor deduplicates on the
same key, and the final charge replaces the intent in one transaction (see
storage.py). When the key provider (KMS) is unreachable, the RPC fails with
UNAVAILABLE and nothing is left behind: no card row, no charge, no intent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from services.payments.audit import AuditError, AuditLog, current_caller
from services.payments.cards import TOKEN_PATTERN, CardError, contains_card_number, new_token, validate_card
from services.payments.currencies import ACTIVE_CURRENCIES
from services.payments.failpoints import PauseAfterAuthorize
from services.payments.fingerprint import CardFingerprints
from services.payments.keys import CardKeyProvider, key_provider_for, record_provider
from services.payments.processor import LEDGER_NAME, CardOnFile, CardProcessor, ProcessorLedger, SimulatedCardProcessor
from services.payments.settings import CacheLimits, KmsSettings, PaymentsSettings
from services.payments.storage import (
    DECLINED,
    PARTIALLY_REFUNDED,
    REFUNDED,
    SUCCEEDED,
    ChargeIntent,
    ChargeRecord,
    PaymentsStore,
    RefundRefused,
)
from services.payments.vault import CardVault, KeyUnavailableError, RecordBindingError, VaultError
from shopmesh.identity import describe_caller
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from shopmesh.server import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    rpc_errors,
)
from shopmesh.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

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

Context = grpc.aio.ServicerContext[Any, Any]
AfterAuthorize = Callable[[str, str], None]


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


@dataclass
class _AuditEntry:
    """What an RPC's audit entry says; filled in as the request is understood."""

    token: str | None = None
    outcome: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)


# Audit details that may go on a span (payments.<name>); anything else stays in the audit log.
_SPAN_DETAILS = ("brand", "amount_minor", "currency", "status", "decline_reason", "existing", "resumed")
# Outcomes that are not failures of the step.
_GOOD_OUTCOMES = ("ok", "replayed")


def _trace_outcome(span: trace.Span, entry: _AuditEntry) -> None:
    span.set_attribute("payments.outcome", entry.outcome)
    for name in _SPAN_DETAILS:
        value = entry.details.get(name)
        if isinstance(value, (str, bool, int)):
            span.set_attribute(f"payments.{name}", value)
    if entry.outcome not in _GOOD_OUTCOMES:
        reason = entry.details.get("decline_reason")
        span.set_status(StatusCode.ERROR, f"{entry.outcome}: {reason}" if reason else entry.outcome)


def _vault_outcome(exc: Exception) -> str:
    if isinstance(exc, KeyUnavailableError):
        return "unavailable"
    if isinstance(exc, RecordBindingError):
        return "integrity_failure"
    return f"error:{type(exc).__name__}"


def _vault_failure(exc: VaultError, token: str, consequence: str) -> ServiceError:
    """The status for a vault failure; the details (key ids, KMS codes) go to the log only."""
    log.error("%s", exc)
    if isinstance(exc, KeyUnavailableError):
        return Unavailable(f"the card key service is unreachable; {consequence}; retry later")
    if isinstance(exc, RecordBindingError):
        return DataLoss(f"the stored card for {token} failed its integrity check; {consequence}")
    return Internal(f"the card for {token} could not be encrypted or decrypted; {consequence}")


class PaymentsServicer(payments_pb2_grpc.PaymentsServicer):
    def __init__(
        self,
        store: PaymentsStore,
        vault: CardVault,
        audit: AuditLog,
        *,
        processor: CardProcessor | None = None,
        ledger: ProcessorLedger | None = None,
        after_authorize: AfterAuthorize | None = None,
    ) -> None:
        self._store = store
        self._vault = vault
        self._audit = audit
        self._fingerprints = CardFingerprints(vault, store)
        self._processor: CardProcessor = processor or SimulatedCardProcessor(self._reveal, ledger=ledger)
        self._after_authorize = after_authorize
        self._locks = KeyedLocks()

    def register(self, server: grpc.aio.Server) -> list[str]:
        payments_pb2_grpc.add_PaymentsServicer_to_server(self, server)
        return [SERVICE_NAME]

    @contextlib.asynccontextmanager
    async def _audited(self, operation: str, context: Context) -> AsyncIterator[_AuditEntry]:
        """One audit entry for the RPC, written when it ends, whatever the outcome.

        Written before the response leaves: if the audit log cannot be
        written, the caller gets INTERNAL rather than an unaudited success.

        The same outcome goes on a span, payments.<operation>, with payments.*
        attributes from an allow-list (_SPAN_DETAILS): never a card number or
        token. Exceptions are not recorded on it, for the reason rpc_errors
        redacts them: a library's exception text could quote its input.
        """
        current_caller.set(describe_caller(context.invocation_metadata()))
        entry = _AuditEntry()
        with _tracer.start_as_current_span(
            f"payments.{operation}", record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield entry
            except ServiceError as exc:
                entry.outcome = exc.code.name.lower()
                raise
            except asyncio.CancelledError:
                entry.outcome = "cancelled"
                raise
            except Exception as exc:
                entry.outcome = f"error:{type(exc).__name__}"
                raise
            finally:
                _trace_outcome(span, entry)
                await asyncio.to_thread(
                    self._audit.append, operation, entry.outcome, token=entry.token, details=entry.details
                )

    def _reveal(self, token: str) -> str:
        """Detokenize: the only way a card number leaves the vault. Runs in a worker thread."""
        stored = self._store.get_card(token)
        if stored is None:
            raise NotFound(f"unknown token '{token}'")
        details = {"key": stored.key_provider, "for": self._processor.name}
        try:
            number = self._vault.open(token, stored.ciphertext)
        except VaultError as exc:
            self._audit.append("detokenize", _vault_outcome(exc), token=token, details=details)
            raise
        # Audited before the number is handed on: no unaudited detokenization.
        self._audit.append("detokenize", "ok", token=token, details=details)
        return number

    @rpc_errors(redact_unexpected=True)
    async def Tokenize(
        self, request: payments_pb2.TokenizeRequest, context: Context
    ) -> payments_pb2.TokenizeResponse:
        async with self._audited("tokenize", context) as entry:
            try:
                card = validate_card(request.card_number, request.exp_month, request.exp_year, request.cvv)
            except CardError as exc:
                raise InvalidArgument(str(exc)) from None
            entry.details["brand"] = card.brand
            try:
                fingerprint = await asyncio.to_thread(self._fingerprints.fingerprint, card.number)
                existing = await asyncio.to_thread(self._store.card_by_fingerprint, fingerprint)
                if existing is None:
                    token = new_token()
                    ciphertext = await asyncio.to_thread(self._vault.seal, token, card.number)
                    on_file = CardOnFile(
                        token=token, brand=card.brand, last4=card.last4, exp_month=card.exp_month, exp_year=card.exp_year
                    )
                    stored, created = await asyncio.to_thread(
                        self._store.insert_card, on_file, ciphertext, self._vault.key_ref, fingerprint
                    )
                else:
                    stored, created = existing, False
                    if (existing.card.exp_month, existing.card.exp_year) != (card.exp_month, card.exp_year):
                        await asyncio.to_thread(self._store.update_expiry, existing.card.token, card.exp_month, card.exp_year)
            except VaultError as exc:
                raise _vault_failure(exc, "the new card", "nothing was stored") from None
            entry.token = stored.card.token
            entry.details["existing"] = not created
            return payments_pb2.TokenizeResponse(token=stored.card.token, brand=stored.card.brand, last4=stored.card.last4)

    @rpc_errors(redact_unexpected=True)
    async def Charge(self, request: payments_pb2.ChargeRequest, context: Context) -> payments_pb2.ChargeResponse:
        async with self._audited("charge", context) as entry:
            _check_token(request.token)
            entry.token = request.token
            if request.amount_minor <= 0:
                raise InvalidArgument(f"amount_minor must be greater than 0, got {request.amount_minor}")
            _check_currency(request.currency)
            _check_idempotency_key(request.idempotency_key)
            if len(request.description) > MAX_DESCRIPTION_CHARS:
                raise InvalidArgument(f"description is {len(request.description)} characters long; the limit is {MAX_DESCRIPTION_CHARS}")
            if contains_card_number(request.description):
                raise InvalidArgument("description must not contain a card number")
            entry.details.update(
                amount_minor=request.amount_minor, currency=request.currency, idempotency_key=request.idempotency_key
            )
            async with self._locks.hold(("charge", request.idempotency_key)):
                stored = await self._charge_once(request, entry)
            entry.details.update(charge_id=stored.charge_id, status=stored.status, decline_reason=stored.decline_reason or None)
            return _charge_response(stored)

    async def _charge_once(self, request: payments_pb2.ChargeRequest, entry: _AuditEntry) -> ChargeRecord:
        key = request.idempotency_key
        stored_card = await asyncio.to_thread(self._store.get_card, request.token)
        if stored_card is None:
            raise NotFound(f"unknown token '{request.token}'; tokenize the card first")
        intent = ChargeIntent(
            charge_id="ch_" + secrets.token_hex(12),
            idempotency_key=key,
            token=request.token,
            amount_minor=request.amount_minor,
            currency=request.currency,
            description=request.description,
        )
        begun = await asyncio.to_thread(self._store.begin_charge, intent)
        if isinstance(begun, ChargeRecord):
            _check_same_charge(begun, request)
            entry.outcome = "replayed"
            return begun
        if begun is not intent:
            # An earlier attempt stored its intent and did not finish (it
            # crashed, or is running in another process): finish it, under
            # its charge id. The processor's deduplication makes this safe.
            _check_same_charge(begun, request)
            entry.details["resumed"] = True
        card = stored_card.card
        try:
            authorization = await asyncio.to_thread(
                self._processor.authorize, card, request.amount_minor, request.currency, f"charge:{key}"
            )
        except VaultError as exc:
            # The card was never revealed, so it never reached the processor.
            await asyncio.to_thread(self._store.abandon_charge, begun)
            raise _vault_failure(exc, request.token, "no charge was made") from None
        except AuditError as exc:
            # The detokenization could not be audited, so the number was not handed on.
            log.error("%s", exc)
            await asyncio.to_thread(self._store.abandon_charge, begun)
            raise Internal("the audit log could not be written; no charge was made") from None
        if self._after_authorize is not None:
            await asyncio.to_thread(self._after_authorize, begun.charge_id, key)
        record = ChargeRecord(
            charge_id=begun.charge_id,
            idempotency_key=key,
            token=request.token,
            amount_minor=request.amount_minor,
            currency=request.currency,
            description=begun.description,
            status=SUCCEEDED if authorization.approved else DECLINED,
            decline_reason=authorization.decline_reason,
            refunded_minor=0,
            brand=card.brand,
            last4=card.last4,
            processor=self._processor.name,
        )
        stored = await asyncio.to_thread(self._store.finish_charge, record)
        if stored.charge_id != record.charge_id:
            # Another process finished this key first; its row is the charge.
            _check_same_charge(stored, request)
            entry.outcome = "replayed"
        elif stored.status == DECLINED:
            entry.outcome = "declined"
        return stored

    @rpc_errors(redact_unexpected=True)
    async def Refund(self, request: payments_pb2.RefundRequest, context: Context) -> payments_pb2.RefundResponse:
        async with self._audited("refund", context) as entry:
            _check_charge_id(request.charge_id)
            entry.details["charge_id"] = request.charge_id
            if request.amount_minor <= 0:
                raise InvalidArgument(f"amount_minor must be greater than 0, got {request.amount_minor}")
            _check_idempotency_key(request.idempotency_key)
            entry.details.update(amount_minor=request.amount_minor, idempotency_key=request.idempotency_key)
            refund_id = "re_" + secrets.token_hex(12)
            try:
                refund, charge = await asyncio.to_thread(
                    self._store.refund, refund_id, request.charge_id, request.amount_minor, request.idempotency_key
                )
            except RefundRefused as exc:
                if exc.reason == "unknown_charge":
                    raise NotFound(exc.message) from None
                raise FailedPrecondition(exc.message) from None
            entry.token = charge.token
            entry.details.update(refund_id=refund.refund_id, refunded_minor=charge.refunded_minor, status=charge.status)
            if refund.refund_id != refund_id:
                entry.outcome = "replayed"
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


def _check_same_charge(earlier: ChargeRecord | ChargeIntent, request: payments_pb2.ChargeRequest) -> None:
    """A retry must ask for the same charge as the request that first used its key."""
    same = (earlier.token, earlier.amount_minor, earlier.currency) == (request.token, request.amount_minor, request.currency)
    if not same:
        raise FailedPrecondition(
            f"idempotency_key '{request.idempotency_key}' was already used for a different charge "
            f"({earlier.charge_id}); use a new key for a new charge"
        )


@contextlib.contextmanager
def payments_servicer(
    data_dir: Path,
    *,
    settings: PaymentsSettings | None = None,
    keys: CardKeyProvider | None = None,
    processor: CardProcessor | None = None,
    after_authorize: AfterAuthorize | None = None,
) -> Iterator[PaymentsServicer]:
    """A PaymentsServicer over the database, keys and audit log in data_dir."""
    chosen = settings or PaymentsSettings(kms=KmsSettings(), cache=CacheLimits())
    key_provider = keys or key_provider_for(chosen.kms, data_dir)
    store = PaymentsStore.in_data_dir(data_dir)
    audit = AuditLog.in_data_dir(data_dir)
    vault = CardVault(key_provider, chosen.cache, audit)
    hook = after_authorize
    if hook is None and chosen.pause_after_authorize is not None:
        log.warning(
            "TEST HOOK ARMED: every charge pauses after authorization (marker %s); never set this outside tests",
            chosen.pause_after_authorize,
        )
        hook = PauseAfterAuthorize(chosen.pause_after_authorize)
    record_provider(data_dir, key_provider.settings())
    log.info(
        "cards are sealed under the %s; data key cache: %g s, %d messages, %d bytes",
        key_provider.description,
        chosen.cache.max_age_s,
        chosen.cache.max_messages,
        chosen.cache.max_bytes,
    )
    yield PaymentsServicer(
        store, vault, audit, processor=processor, ledger=ProcessorLedger(data_dir / LEDGER_NAME), after_authorize=hook
    )
