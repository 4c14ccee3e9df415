import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("join_token", "spiffe_id", "csr_pem", "agent_csr_pem")
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    AGENT_CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    join_token: str
    spiffe_id: str
    csr_pem: str
    agent_csr_pem: str
    def __init__(self, join_token: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., csr_pem: _Optional[str] = ..., agent_csr_pem: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    def __init__(self, csr_pem: _Optional[str] = ...) -> None: ...

class SvidResponse(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain_pem", "bundle_pem", "not_after", "serial", "agent_spiffe_id", "agent_cert_chain_pem", "agent_serial")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    AGENT_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    AGENT_SERIAL_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain_pem: str
    bundle_pem: str
    not_after: _timestamp_pb2.Timestamp
    serial: str
    agent_spiffe_id: str
    agent_cert_chain_pem: str
    agent_serial: str
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain_pem: _Optional[str] = ..., bundle_pem: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., serial: _Optional[str] = ..., agent_spiffe_id: _Optional[str] = ..., agent_cert_chain_pem: _Optional[str] = ..., agent_serial: _Optional[str] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBundleResponse(_message.Message):
    __slots__ = ("bundle_pem", "signing_authority")
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNING_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    bundle_pem: str
    signing_authority: str
    def __init__(self, bundle_pem: _Optional[str] = ..., signing_authority: _Optional[str] = ...) -> None: ...

class GetAuthoritiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Authority(_message.Message):
    __slots__ = ("fingerprint", "role", "subject", "not_after", "trust_anchor_fingerprint")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    TRUST_ANCHOR_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    role: str
    subject: str
    not_after: _timestamp_pb2.Timestamp
    trust_anchor_fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ..., role: _Optional[str] = ..., subject: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trust_anchor_fingerprint: _Optional[str] = ...) -> None: ...

class AuthoritiesResponse(_message.Message):
    __slots__ = ("backend", "authorities", "bundle_fingerprints", "signing_authority")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    SIGNING_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    backend: str
    authorities: _containers.RepeatedCompositeFieldContainer[Authority]
    bundle_fingerprints: _containers.RepeatedScalarFieldContainer[str]
    signing_authority: str
    def __init__(self, backend: _Optional[str] = ..., authorities: _Optional[_Iterable[_Union[Authority, _Mapping]]] = ..., bundle_fingerprints: _Optional[_Iterable[str]] = ..., signing_authority: _Optional[str] = ...) -> None: ...
