"""Envelope encryption of card numbers (and of the fingerprint key) with the AWS Encryption SDK.

Each card number becomes one Encryption SDK message:
- key commitment required on encrypt and decrypt (REQUIRE_ENCRYPT_REQUIRE_DECRYPT),
  so a message can only ever decrypt to one plaintext;
- encryption context {"purpose": "card-number", "token": <token>}:
  authenticated, not secret (KMS logs it in CloudTrail, so it holds no card
  data), and checked on decrypt, so a ciphertext moved to another token's
  row (by a bug or by someone with write access to the database) is refused
  instead of charging the wrong card;
- exactly one encrypted data key, wrapped by the provider's current key
  (keys.py); decryption accepts every key the provider still trusts;
- caching materials managers with explicit limits (settings.CacheLimits:
  age, messages, bytes). The context is part of the cache key (KMS binds a
  data key to its context), so a data key is reused only when the same
  record is sealed again; the decryption cache is what saves KMS calls when
  one card is charged repeatedly.

Every use of a wrapping key (a cache miss: a data key generated, or
unwrapped) is written to the audit log by _AuditedMaterials, with the
caller of the RPC being served.

Nothing here logs, and errors never carry SDK messages: only what failed, for
which record, and for KMS the error class or code.
"""

from __future__ import annotations

from typing import Any

from aws_encryption_sdk import CommitmentPolicy, EncryptionSDKClient
from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
from aws_encryption_sdk.key_providers.base import MasterKeyProvider
from aws_encryption_sdk.materials_managers.base import CryptoMaterialsManager
from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager
from aws_encryption_sdk.materials_managers.default import DefaultCryptoMaterialsManager

from services.payments.audit import AuditLog
from services.payments.keys import LOCAL_PROVIDER_ID, CardKeyProvider, KeyServiceRefused, KeyServiceUnavailable, exception_chain
from services.payments.settings import CacheLimits

PURPOSE = "card-number"
KEY_PURPOSE = "fingerprint-key"
CACHE_CAPACITY = 256


class VaultError(Exception):
    """A record could not be sealed or opened. Never carries card data."""


class RecordBindingError(VaultError):
    """A ciphertext decrypted, but was not sealed for the record it was read for."""


class KeyUnavailableError(VaultError):
    """The key service is unreachable or throttling: nothing was sealed or opened; retry later."""


def _failure(action: str, subject: str, exc: Exception) -> VaultError:
    """A VaultError naming only the exception type (or KMS's classification).

    Failures come from the SDK and from `cryptography` underneath it
    (InvalidTag, for a wrong key or a tampered message); their messages are
    not ours to vet, and they could quote what they were given, so none of it
    travels on. KeyService* messages are ours (key id and error code).
    """
    for link in exception_chain(exc):
        if isinstance(link, KeyServiceUnavailable):
            return KeyUnavailableError(f"{action} the {subject} failed: {link}")
        if isinstance(link, KeyServiceRefused):
            return VaultError(f"{action} the {subject} failed: {link}")
    return VaultError(f"{action} the {subject} failed ({type(exc).__name__})")


def encryption_context(token: str) -> dict[str, str]:
    return {"purpose": PURPOSE, "token": token}


def key_encryption_context(name: str) -> dict[str, str]:
    return {"purpose": KEY_PURPOSE, "key": name}


def _key_label(provider_id: Any, key_info: Any) -> str:
    """"local:card-wrapping-key-v2" or "aws-kms:arn:…" for the key that wrapped a data key."""
    provider = provider_id.decode() if isinstance(provider_id, bytes) else str(provider_id)
    raw = key_info if isinstance(key_info, bytes) else str(key_info).encode()
    if provider == LOCAL_PROVIDER_ID:
        # A raw key's info is its id followed by the binary tag length, IV
        # length and IV of that wrapping (which start with a zero byte).
        return "local:" + raw.split(b"\x00", 1)[0].decode(errors="replace")
    return f"{provider}:{raw.decode(errors='replace')}"


def _outcome(exc: Exception) -> str:
    for link in exception_chain(exc):
        if isinstance(link, KeyServiceUnavailable):
            return "unavailable"
        if isinstance(link, KeyServiceRefused):
            return "refused"
    return f"error:{type(exc).__name__}"


def _subject(context: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
    """(token, details) of an encryption context, for the audit entry."""
    return context.get("token"), {"purpose": context.get("purpose"), "key_name": context.get("key")}


class _AuditedMaterials(CryptoMaterialsManager):  # type: ignore[misc]  # the SDK is untyped
    """Writes one audit entry per use of a wrapping key.

    It sits behind the caching manager, so it sees only cache misses: the
    moments a wrapping key (a KMS key) is actually used.
    """

    def __init__(self, provider: MasterKeyProvider, audit: AuditLog | None, current_key: str) -> None:
        self._inner = DefaultCryptoMaterialsManager(provider)
        self._audit = audit
        self._current_key = current_key

    def get_encryption_materials(self, request: Any) -> Any:
        token, details = _subject(dict(request.encryption_context))
        try:
            materials = self._inner.get_encryption_materials(request)
        except Exception as exc:
            self._record("key.generate-data-key", token, _outcome(exc), {**details, "key": self._current_key})
            raise
        info = materials.data_encryption_key.key_provider
        self._record("key.generate-data-key", token, "ok", {**details, "key": _key_label(info.provider_id, info.key_info)})
        return materials

    def decrypt_materials(self, request: Any) -> Any:
        token, details = _subject(dict(request.encryption_context))
        try:
            materials = self._inner.decrypt_materials(request)
        except Exception as exc:
            self._record("key.decrypt-data-key", token, _outcome(exc), details)
            raise
        info = materials.data_key.key_provider
        self._record("key.decrypt-data-key", token, "ok", {**details, "key": _key_label(info.provider_id, info.key_info)})
        return materials

    def _record(self, operation: str, token: str | None, outcome: str, details: dict[str, Any]) -> None:
        if self._audit is not None:
            self._audit.append(operation, outcome, token=token, details=details)


class CardVault:
    def __init__(self, keys: CardKeyProvider, cache: CacheLimits | None = None, audit: AuditLog | None = None) -> None:
        limits = cache or CacheLimits()
        self.keys = keys
        self.cache = limits
        # One encrypted data key per message: we only ever wrap under one key,
        # and a crafted message with thousands of them would cost as many
        # unwrap attempts (the SDK's guard against that).
        self._client = EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT, max_encrypted_data_keys=1
        )
        self._encrypt_materials = CachingCryptoMaterialsManager(
            backing_materials_manager=_AuditedMaterials(keys.encrypt_provider(), audit, keys.key_ref),
            cache=LocalCryptoMaterialsCache(capacity=CACHE_CAPACITY),
            max_age=float(limits.max_age_s),
            max_messages_encrypted=limits.max_messages,
            max_bytes_encrypted=limits.max_bytes,
        )
        self._decrypt_materials = CachingCryptoMaterialsManager(
            backing_materials_manager=_AuditedMaterials(keys.decrypt_provider(), audit, keys.key_ref),
            cache=LocalCryptoMaterialsCache(capacity=CACHE_CAPACITY),
            max_age=float(limits.max_age_s),
        )

    @property
    def key_ref(self) -> str:
        return self.keys.key_ref

    def _encrypt(self, plaintext: bytes, context: dict[str, str], subject: str) -> bytes:
        try:
            ciphertext, _header = self._client.encrypt(
                source=plaintext, materials_manager=self._encrypt_materials, encryption_context=context
            )
        except Exception as exc:  # noqa: BLE001 - see _failure
            raise _failure("encrypting", subject, exc) from None
        return bytes(ciphertext)

    def _decrypt(self, ciphertext: bytes, expected: dict[str, str], subject: str) -> bytes:
        try:
            plaintext, header = self._client.decrypt(source=ciphertext, materials_manager=self._decrypt_materials)
        except Exception as exc:  # noqa: BLE001 - see _failure
            raise _failure("decrypting", subject, exc) from None
        context = header.encryption_context
        # The SDK authenticates the context stored in the message; it is up
        # to us to check that it is the context we expect for this record.
        if any(context.get(key) != value for key, value in expected.items()):
            raise RecordBindingError(f"the stored {subject} was sealed for another record; refusing to use it")
        return bytes(plaintext)

    def seal(self, token: str, number: str) -> bytes:
        """Encrypt a card number for `token`."""
        return self._encrypt(number.encode("ascii"), encryption_context(token), f"card for {token}")

    def open(self, token: str, ciphertext: bytes) -> str:
        """Decrypt the card number sealed for `token`."""
        return self._decrypt(ciphertext, encryption_context(token), f"card for {token}").decode("ascii")

    def seal_key(self, name: str, key: bytes) -> bytes:
        """Encrypt a secret key (the fingerprint key) under the wrapping key."""
        return self._encrypt(key, key_encryption_context(name), f"{name} key")

    def open_key(self, name: str, ciphertext: bytes) -> bytes:
        return self._decrypt(ciphertext, key_encryption_context(name), f"{name} key")
