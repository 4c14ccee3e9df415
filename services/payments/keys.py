"""The keys that wrap card data keys, behind one small interface.

Card numbers are envelope-encrypted (see vault.py): every record has its own
data key, and the data key is wrapped by a long-lived key that never leaves
its provider. Two providers:

- LocalCardKeyProvider, the embedded default: AES-256 keys in
  `<data dir>/keys/` (0700 directory, 0600 files). `rotate_local_key` adds
  the next version; the newest wraps new data keys, every version on disk
  can still unwrap old ones.
- AwsKmsCardKeyProvider: AWS KMS through boto3 and the Encryption SDK's
  StrictAwsKmsMasterKeyProvider, configured by the standard AWS SDK variables
  (AWS_ENDPOINT_URL_KMS, AWS_REGION, credentials), so moto, LocalStack and
  AWS all work. One key ARN wraps new data keys; after a rotation to a new
  key, the earlier ARNs are listed for decryption only.

A provider gives the vault two Encryption SDK key providers: one that wraps
(the current key only, so a record is never also wrapped under a retired
key) and one that unwraps (every key this deployment still trusts).

KMS failures are sorted at the master key, where the SDK still has the
botocore error: unreachable, timing out or throttling is KeyServiceUnavailable
(retry later: UNAVAILABLE); a refusal (key disabled, access denied) is
KeyServiceRefused naming KMS's error code. Both carry no request data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
from aws_encryption_sdk import StrictAwsKmsMasterKeyProvider
from aws_encryption_sdk.exceptions import UnknownIdentityError
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.base import MasterKeyProvider
from aws_encryption_sdk.key_providers.kms import KMSMasterKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

from services.payments.settings import KmsSettings
from shopmesh.config import ConfigError, ensure_private_dir, load_or_create_secret

# Relative to the data directory. keys/ is 0700, every key file 0600.
KEYS_DIR = Path("keys")
# Version 1 keeps the file name it had before rotation existed.
LOCAL_KEY_PATH = KEYS_DIR / "card-wrapping.key"
LOCAL_KEY_BYTES = 32  # AES-256
LOCAL_PROVIDER_ID = "shopmesh-local"
# Names the key inside the encrypted records, so old records find theirs
# after a rotation added a newer one.
LOCAL_KEY_ID = b"card-wrapping-key-v1"
_VERSIONED_KEY_FILE = re.compile(r"^card-wrapping-v([1-9][0-9]{0,5})\.key$")
# What the service last ran with (no secrets): lets `shopmesh payments
# rewrap` use the same keys as the service without repeating the flags.
PROVIDER_RECORD = KEYS_DIR / "provider.json"

# KMS answers in milliseconds; a request that takes longer than this is
# failing. Two attempts (botocore's standard retry mode, with backoff) keep a
# charge within the caller's deadline when KMS is down.
KMS_CONNECT_TIMEOUT_S = 1.0
KMS_READ_TIMEOUT_S = 2.0
KMS_MAX_ATTEMPTS = 2
# KMS error codes that mean "try again later", not "no".
_TRANSIENT_KMS_CODES = frozenset({
    "ThrottlingException",
    "RequestLimitExceeded",
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
})


class KeyServiceError(Exception):
    """The key service did not do what was asked. The message names the key, never data."""


class KeyServiceUnavailable(KeyServiceError):
    """The key service is unreachable, timing out or throttling: retry later."""


class KeyServiceRefused(KeyServiceError):
    """The key service answered with a refusal (disabled key, access denied, …)."""


class CardKeyProvider(Protocol):
    """Where the wrapping keys live. Implementations: LocalCardKeyProvider, AwsKmsCardKeyProvider."""

    @property
    def description(self) -> str:
        """For logs: which key, never key material."""
        ...

    @property
    def key_ref(self) -> str:
        """The key that wraps new data keys, as stored beside each record ("local:…", "aws-kms:arn…")."""
        ...

    def encrypt_provider(self) -> MasterKeyProvider:
        """An Encryption SDK provider holding only the current key."""
        ...

    def decrypt_provider(self) -> MasterKeyProvider:
        """An Encryption SDK provider holding every key that may unwrap a stored record."""
        ...

    def settings(self) -> KmsSettings:
        ...


# --- local keys ------------------------------------------------------------------


class LocalWrappingKeyProvider(RawMasterKeyProvider):  # type: ignore[misc]  # the SDK is untyped
    """Raw AES-256-GCM wrapping keys held in memory (loaded from 0600 files)."""

    provider_id = LOCAL_PROVIDER_ID

    def __init__(self, **kwargs: object) -> None:
        # MasterKeyProvider.__new__ consumes the keyword arguments (its
        # config); keys are added afterwards with add_wrapping_key().
        self._wrapping_keys: dict[bytes, bytes] = {}

    def add_wrapping_key(self, key_id: bytes, key: bytes) -> None:
        if len(key) != LOCAL_KEY_BYTES:
            raise ValueError(f"wrapping key {key_id!r} must be {LOCAL_KEY_BYTES} bytes, got {len(key)}")
        self._wrapping_keys[key_id] = key
        self.add_master_key(key_id)

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        try:
            key = self._wrapping_keys[key_id]
        except KeyError:
            raise UnknownIdentityError(f"no local wrapping key {key_id!r}") from None
        return WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=key,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )


def _local_key_file(keys_dir: Path, version: int) -> Path:
    return keys_dir / ("card-wrapping.key" if version == 1 else f"card-wrapping-v{version}.key")


def local_key_versions(keys_dir: Path) -> list[int]:
    """The key versions present in keys_dir, oldest first."""
    versions = set()
    if (keys_dir / LOCAL_KEY_PATH.name).exists():
        versions.add(1)
    if keys_dir.is_dir():
        for path in keys_dir.iterdir():
            match = _VERSIONED_KEY_FILE.fullmatch(path.name)
            if match:
                versions.add(int(match.group(1)))
    return sorted(versions)


def rotate_local_key(data_dir: Path) -> str:
    """Create the next local key version; return its key ref. New records use it after a restart."""
    keys_dir = data_dir / KEYS_DIR
    versions = local_key_versions(keys_dir)
    if not versions:
        raise ConfigError(f"no local card key in {keys_dir}: start payments once before rotating")
    version = versions[-1] + 1
    load_or_create_secret(_local_key_file(keys_dir, version), LOCAL_KEY_BYTES)
    return f"local:card-wrapping-key-v{version}"


class LocalCardKeyProvider:
    """The embedded default: AES-256 keys created in the data directory.

    The first key is created at first start, atomically, mode 0600 in a 0700
    directory, and never overwritten; losing a key makes the records it
    wraps undecryptable, which is why an unreadable key stops start-up
    instead of being regenerated.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        versions = local_key_versions(keys_dir) or [1]
        self._keys = {v: load_or_create_secret(_local_key_file(keys_dir, v), LOCAL_KEY_BYTES) for v in versions}
        self.version = versions[-1]

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> LocalCardKeyProvider:
        return cls(data_dir / KEYS_DIR)

    @staticmethod
    def _key_id(version: int) -> bytes:
        return f"card-wrapping-key-v{version}".encode()

    @property
    def description(self) -> str:
        return f"local AES-256 key {_local_key_file(self.keys_dir, self.version)} (id {self._key_id(self.version).decode()})"

    @property
    def key_ref(self) -> str:
        return f"local:{self._key_id(self.version).decode()}"

    def encrypt_provider(self) -> MasterKeyProvider:
        provider = LocalWrappingKeyProvider()
        provider.add_wrapping_key(self._key_id(self.version), self._keys[self.version])
        return provider

    def decrypt_provider(self) -> MasterKeyProvider:
        provider = LocalWrappingKeyProvider()
        for version, key in self._keys.items():
            provider.add_wrapping_key(self._key_id(version), key)
        return provider

    def settings(self) -> KmsSettings:
        return KmsSettings()


# --- AWS KMS -----------------------------------------------------------------------


def kms_botocore_session() -> botocore.session.Session:
    """A botocore session whose clients fail fast (see KMS_*_TIMEOUT_S).

    The Encryption SDK creates its KMS clients from this session; a default
    client config is how botocore lets a session carry timeouts and retries
    into every client made from it.
    """
    session = botocore.session.Session()
    session.set_default_client_config(
        botocore.config.Config(
            connect_timeout=KMS_CONNECT_TIMEOUT_S,
            read_timeout=KMS_READ_TIMEOUT_S,
            retries={"mode": "standard", "total_max_attempts": KMS_MAX_ATTEMPTS},
        )
    )
    return session


def exception_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def classify_kms_error(exc: BaseException, key_id: str) -> KeyServiceError | None:
    """KeyServiceUnavailable / KeyServiceRefused for a botocore failure somewhere in exc's chain, else None."""
    for link in exception_chain(exc):
        if isinstance(link, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            return KeyServiceUnavailable(f"KMS is unreachable for key {key_id} ({type(link).__name__})")
        if isinstance(link, botocore.exceptions.ClientError):
            code = str(link.response.get("Error", {}).get("Code", "unknown"))
            status = int(link.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _TRANSIENT_KMS_CODES or status >= 500:
                return KeyServiceUnavailable(f"KMS is unavailable for key {key_id} ({code})")
            return KeyServiceRefused(f"KMS refused to use key {key_id} ({code})")
        if isinstance(link, botocore.exceptions.NoCredentialsError):
            return KeyServiceRefused(f"no AWS credentials to use key {key_id} (NoCredentialsError)")
    return None


_R = TypeVar("_R")


class _KmsMasterKey(KMSMasterKey):  # type: ignore[misc]  # the SDK is untyped
    """KMSMasterKey that turns botocore failures into KeyServiceError.

    The SDK's provider swallows a master key's DecryptKeyError while it
    looks for another key, losing why KMS failed; an exception that is not
    one of the SDK's own passes through it, so the vault can tell "KMS is
    down" (retry) from "this record does not decrypt" (data loss).
    """

    def _translated(self, call: Callable[[], _R]) -> _R:
        try:
            return call()
        except KeyServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a KMS failure
            translated = classify_kms_error(exc, str(self._key_id))
            if translated is None:
                raise
            raise translated from None

    def generate_data_key(self, algorithm: Any, encryption_context: Any) -> Any:
        return self._translated(lambda: super(_KmsMasterKey, self).generate_data_key(algorithm, encryption_context))

    def encrypt_data_key(self, data_key: Any, algorithm: Any, encryption_context: Any) -> Any:
        return self._translated(
            lambda: super(_KmsMasterKey, self).encrypt_data_key(data_key, algorithm, encryption_context)
        )

    def decrypt_data_key(self, encrypted_data_key: Any, algorithm: Any, encryption_context: Any) -> Any:
        return self._translated(
            lambda: super(_KmsMasterKey, self).decrypt_data_key(encrypted_data_key, algorithm, encryption_context)
        )


class _StrictKmsProvider(StrictAwsKmsMasterKeyProvider):  # type: ignore[misc]  # the SDK is untyped
    master_key_class = _KmsMasterKey


class AwsKmsCardKeyProvider:
    """AWS KMS: `key_id` wraps new data keys; `decrypt_key_ids` (earlier keys) only unwrap."""

    def __init__(self, key_id: str, decrypt_key_ids: Sequence[str] = (), botocore_session: botocore.session.Session | None = None) -> None:
        self.key_id = key_id
        self.decrypt_key_ids = tuple(k for k in dict.fromkeys(decrypt_key_ids) if k != key_id)
        self._session = botocore_session or kms_botocore_session()
        # Built once: the providers hold the KMS clients (and their connection pools).
        self._encrypt = _StrictKmsProvider(key_ids=[key_id], botocore_session=self._session)
        self._decrypt = _StrictKmsProvider(key_ids=[key_id, *self.decrypt_key_ids], botocore_session=self._session)

    @property
    def description(self) -> str:
        extra = f" (and {len(self.decrypt_key_ids)} earlier key(s) for decryption)" if self.decrypt_key_ids else ""
        return f"AWS KMS key {self.key_id}{extra}"

    @property
    def key_ref(self) -> str:
        return f"aws-kms:{self.key_id}"

    def encrypt_provider(self) -> MasterKeyProvider:
        return self._encrypt

    def decrypt_provider(self) -> MasterKeyProvider:
        return self._decrypt

    def settings(self) -> KmsSettings:
        return KmsSettings(kind="aws", key_id=self.key_id, decrypt_key_ids=self.decrypt_key_ids)


def create_kms_key(description: str) -> str:
    """Create a symmetric KMS key for card data keys (for `shopmesh up --kms-create`); return its ARN."""
    session = kms_botocore_session()
    if session.get_config_variable("region") is None:
        raise KeyServiceError("no AWS region is configured for creating a KMS key: set AWS_REGION")
    client = boto3.session.Session(botocore_session=session).client("kms")
    try:
        created = client.create_key(
            Description=description,
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            Tags=[{"TagKey": "shopmesh:purpose", "TagValue": "card-data-keys"}],
        )
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        translated = classify_kms_error(exc, "(new key)")
        raise KeyServiceError(str(translated) if translated else f"creating a KMS key failed ({type(exc).__name__})") from None
    return str(created["KeyMetadata"]["Arn"])


# --- choosing and recording the provider -------------------------------------------


def key_provider_for(kms: KmsSettings, data_dir: Path) -> CardKeyProvider:
    if kms.kind == "aws":
        assert kms.key_id is not None  # settings validation guarantees it
        session = kms_botocore_session()
        # Caught here rather than at the first card: without credentials no
        # KMS call can ever succeed, so this is configuration, not an outage.
        if session.get_credentials() is None:
            raise ConfigError(
                f"SHOPMESH_KMS=aws but no AWS credentials were found for key {kms.key_id} "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role)"
            )
        return AwsKmsCardKeyProvider(kms.key_id, kms.decrypt_key_ids, botocore_session=session)
    return LocalCardKeyProvider.in_data_dir(data_dir)


def record_provider(data_dir: Path, kms: KmsSettings) -> None:
    """Write which keys the service uses (ARNs, never key material) for the admin commands."""
    path = data_dir / PROVIDER_RECORD
    ensure_private_dir(path.parent, what=str(path.parent))
    body = {"kms": kms.kind, "key_id": kms.key_id, "decrypt_key_ids": list(kms.decrypt_key_ids)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def recorded_provider(data_dir: Path) -> KmsSettings:
    """What record_provider wrote; the local provider when nothing was recorded."""
    path = data_dir / PROVIDER_RECORD
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return KmsSettings()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({type(exc).__name__}); it is rewritten when payments starts") from None
    if body.get("kms") == "aws":
        return KmsSettings(kind="aws", key_id=str(body["key_id"]), decrypt_key_ids=tuple(body.get("decrypt_key_ids", ())))
    return KmsSettings()
