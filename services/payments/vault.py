"""Envelope encryption of card numbers with the AWS Encryption SDK.

Each card number becomes one Encryption SDK message:
- key commitment required on encrypt and decrypt (REQUIRE_ENCRYPT_REQUIRE_DECRYPT),
  so a message can only ever decrypt to one plaintext;
- encryption context {"purpose": "card-number", "token": <token>}: authenticated,
  not secret, and checked on decrypt, so a ciphertext moved to another token's
  row (by a bug or by someone with write access to the database) is refused
  instead of charging the wrong card;
- a caching materials manager with explicit limits, so a busy token does not
  cost a key-provider round trip (a KMS call, later) on every charge, while no
  data key is used for long or for many messages.

Nothing here logs, and errors never carry SDK messages: only what failed and
for which token.
"""

from __future__ import annotations

from aws_encryption_sdk import CommitmentPolicy, EncryptionSDKClient
from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager

from services.payments.keys import CardKeyProvider

PURPOSE = "card-number"
CACHE_CAPACITY = 256
# A cached data key is reused for at most 5 minutes and 100 messages.
CACHE_MAX_AGE_SECONDS = 300.0
CACHE_MAX_MESSAGES = 100


class VaultError(Exception):
    """A card record could not be sealed or opened. Never carries card data."""


class RecordBindingError(VaultError):
    """A ciphertext decrypted, but was not sealed for the token it was read for."""


def _failure(action: str, token: str, exc: Exception) -> VaultError:
    """A VaultError naming only the exception type.

    Failures come from the SDK and from `cryptography` underneath it
    (InvalidTag, for a wrong key or a tampered message); their messages are
    not ours to vet, and they could quote what they were given, so none of it
    travels on.
    """
    return VaultError(f"{action} the card for {token} failed ({type(exc).__name__})")


def encryption_context(token: str) -> dict[str, str]:
    return {"purpose": PURPOSE, "token": token}


class CardVault:
    def __init__(self, keys: CardKeyProvider) -> None:
        self.keys = keys
        self._client = EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
        self._materials = CachingCryptoMaterialsManager(
            master_key_provider=keys.master_key_provider(),
            cache=LocalCryptoMaterialsCache(capacity=CACHE_CAPACITY),
            max_age=CACHE_MAX_AGE_SECONDS,
            max_messages_encrypted=CACHE_MAX_MESSAGES,
        )

    def seal(self, token: str, number: str) -> bytes:
        """Encrypt a card number for `token`."""
        try:
            ciphertext, _header = self._client.encrypt(
                source=number.encode("ascii"),
                materials_manager=self._materials,
                encryption_context=encryption_context(token),
            )
        except Exception as exc:  # noqa: BLE001 - see _failure
            raise _failure("encrypting", token, exc) from None
        return bytes(ciphertext)

    def open(self, token: str, ciphertext: bytes) -> str:
        """Decrypt the card number sealed for `token`."""
        try:
            plaintext, header = self._client.decrypt(source=ciphertext, materials_manager=self._materials)
        except Exception as exc:  # noqa: BLE001 - see _failure
            raise _failure("decrypting", token, exc) from None
        context = header.encryption_context
        # The SDK authenticates the context stored in the message; it is up
        # to us to check that it is the context we expect for this row.
        if context.get("purpose") != PURPOSE or context.get("token") != token:
            raise RecordBindingError(f"the stored card for {token} was sealed for another record; refusing to use it")
        return bytes(plaintext).decode("ascii")
