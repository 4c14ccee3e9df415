"""The key that wraps card data keys, behind a small interface.

Card numbers are envelope-encrypted (see vault.py): each record has its own
data key, and the data key is wrapped by a long-lived key that never leaves
this provider. Today that is a local AES-256 key in the data directory; AWS
KMS is the next provider, and only this module needs to learn about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from aws_encryption_sdk.exceptions import UnknownIdentityError
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.base import MasterKeyProvider
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

from shopmesh.config import load_or_create_secret

# Relative to the data directory. keys/ is 0700, the key file 0600.
LOCAL_KEY_PATH = Path("keys") / "card-wrapping.key"
LOCAL_KEY_BYTES = 32  # AES-256
LOCAL_PROVIDER_ID = "shopmesh-local"
# Names the key inside the encrypted records, so a later key (rotation)
# can be added beside it and old records still find theirs.
LOCAL_KEY_ID = b"card-wrapping-key-v1"


class CardKeyProvider(Protocol):
    """Where the wrapping key lives. Implementations: local file; AWS KMS (planned)."""

    @property
    def description(self) -> str:
        """For logs: which key, never the key material."""
        ...

    def master_key_provider(self) -> MasterKeyProvider:
        """The AWS Encryption SDK provider that wraps and unwraps data keys."""
        ...


class LocalWrappingKeyProvider(RawMasterKeyProvider):  # type: ignore[misc]  # the SDK is untyped
    """A raw AES-256-GCM wrapping key held in memory (loaded from a 0600 file)."""

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


class LocalCardKeyProvider:
    """The embedded default: an AES-256 key created at first start in the data directory.

    The file is created atomically with mode 0600 in a 0700 directory and is
    never overwritten; losing it makes every stored card undecryptable, which
    is why it is not regenerated when unreadable (start-up fails instead).
    """

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._provider = LocalWrappingKeyProvider()
        self._provider.add_wrapping_key(LOCAL_KEY_ID, load_or_create_secret(key_path, LOCAL_KEY_BYTES))

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> LocalCardKeyProvider:
        return cls(data_dir / LOCAL_KEY_PATH)

    @property
    def description(self) -> str:
        return f"local AES-256 key {self.key_path} (id {LOCAL_KEY_ID.decode()})"

    def master_key_provider(self) -> MasterKeyProvider:
        return self._provider
