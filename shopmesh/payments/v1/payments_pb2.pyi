from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChargeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHARGE_STATUS_UNSPECIFIED: _ClassVar[ChargeStatus]
    CHARGE_STATUS_SUCCEEDED: _ClassVar[ChargeStatus]
    CHARGE_STATUS_DECLINED: _ClassVar[ChargeStatus]
    CHARGE_STATUS_REFUNDED: _ClassVar[ChargeStatus]
    CHARGE_STATUS_PARTIALLY_REFUNDED: _ClassVar[ChargeStatus]
CHARGE_STATUS_UNSPECIFIED: ChargeStatus
CHARGE_STATUS_SUCCEEDED: ChargeStatus
CHARGE_STATUS_DECLINED: ChargeStatus
CHARGE_STATUS_REFUNDED: ChargeStatus
CHARGE_STATUS_PARTIALLY_REFUNDED: ChargeStatus

class TokenizeRequest(_message.Message):
    __slots__ = ("card_number", "exp_month", "exp_year", "cvv")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    EXP_MONTH_FIELD_NUMBER: _ClassVar[int]
    EXP_YEAR_FIELD_NUMBER: _ClassVar[int]
    CVV_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    exp_month: int
    exp_year: int
    cvv: str
    def __init__(self, card_number: _Optional[str] = ..., exp_month: _Optional[int] = ..., exp_year: _Optional[int] = ..., cvv: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token", "brand", "last4")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    LAST4_FIELD_NUMBER: _ClassVar[int]
    token: str
    brand: str
    last4: str
    def __init__(self, token: _Optional[str] = ..., brand: _Optional[str] = ..., last4: _Optional[str] = ...) -> None: ...

class ChargeRequest(_message.Message):
    __slots__ = ("token", "amount_minor", "currency", "idempotency_key", "description")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    token: str
    amount_minor: int
    currency: str
    idempotency_key: str
    description: str
    def __init__(self, token: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ChargeResponse(_message.Message):
    __slots__ = ("charge_id", "status", "amount_minor", "currency", "refunded_minor", "decline_reason", "brand", "last4", "processor")
    CHARGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_MINOR_FIELD_NUMBER: _ClassVar[int]
    DECLINE_REASON_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    LAST4_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    charge_id: str
    status: ChargeStatus
    amount_minor: int
    currency: str
    refunded_minor: int
    decline_reason: str
    brand: str
    last4: str
    processor: str
    def __init__(self, charge_id: _Optional[str] = ..., status: _Optional[_Union[ChargeStatus, str]] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., refunded_minor: _Optional[int] = ..., decline_reason: _Optional[str] = ..., brand: _Optional[str] = ..., last4: _Optional[str] = ..., processor: _Optional[str] = ...) -> None: ...

class RefundRequest(_message.Message):
    __slots__ = ("charge_id", "amount_minor", "idempotency_key")
    CHARGE_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    charge_id: str
    amount_minor: int
    idempotency_key: str
    def __init__(self, charge_id: _Optional[str] = ..., amount_minor: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RefundResponse(_message.Message):
    __slots__ = ("refund_id", "charge")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    charge: ChargeResponse
    def __init__(self, refund_id: _Optional[str] = ..., charge: _Optional[_Union[ChargeResponse, _Mapping]] = ...) -> None: ...

class GetChargeRequest(_message.Message):
    __slots__ = ("charge_id",)
    CHARGE_ID_FIELD_NUMBER: _ClassVar[int]
    charge_id: str
    def __init__(self, charge_id: _Optional[str] = ...) -> None: ...
