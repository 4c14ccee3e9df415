import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("join_token", "spiffe_id", "csr_pem")
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    join_token: str
    spiffe_id: str
    csr_pem: str
    def __init__(self, join_token: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., csr_pem: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    def __init__(self, csr_pem: _Optional[str] = ...) -> None: ...

class SvidResponse(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain_pem", "bundle_pem", "not_after", "serial")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain_pem: str
    bundle_pem: str
    not_after: _timestamp_pb2.Timestamp
    serial: str
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain_pem: _Optional[str] = ..., bundle_pem: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., serial: _Optional[str] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBundleResponse(_message.Message):
    __slots__ = ("bundle_pem",)
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    bundle_pem: str
    def __init__(self, bundle_pem: _Optional[str] = ...) -> None: ...
