"""Keyed card fingerprints: the same card tokenized twice gets the same token.

The fingerprint is HMAC-SHA-256(fingerprint key, card number), what PCI DSS
(3.5.1.1) calls a keyed cryptographic hash of the PAN: without the key, a
fingerprint cannot be matched against a list of candidate numbers (a plain
hash of a 16-digit number with a known prefix and a Luhn digit can be brute
forced in minutes). The number itself is never used to look a card up.

The fingerprint key is 256 random bits created on first use and stored only
wrapped by the card key provider (an Encryption SDK message in
`wrapped_keys`, context {"purpose": "fingerprint-key", "key": "card-fingerprint"}),
so it is exactly as protected as the card data keys, and `rewrap` moves it
to a new wrapping key with the cards. It is unwrapped once per process and
kept in memory; if the key provider is unreachable at that moment, the
KeyUnavailableError reaches the caller (UNAVAILABLE) and the next request
tries again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from services.payments.storage import PaymentsStore
from services.payments.vault import CardVault

FINGERPRINT_KEY_NAME = "card-fingerprint"
FINGERPRINT_KEY_BYTES = 32


class CardFingerprints:
    def __init__(self, vault: CardVault, store: PaymentsStore) -> None:
        self._vault = vault
        self._store = store
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def _load_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                stored = self._store.get_wrapped_key(FINGERPRINT_KEY_NAME)
                if stored is None:
                    fresh = secrets.token_bytes(FINGERPRINT_KEY_BYTES)
                    wrapped = self._vault.seal_key(FINGERPRINT_KEY_NAME, fresh)
                    # Two processes can get here at once: the first insert wins, and
                    # both use the key it stored.
                    winner = self._store.insert_wrapped_key(FINGERPRINT_KEY_NAME, wrapped, self._vault.key_ref)
                    self._key = fresh if winner == wrapped else self._vault.open_key(FINGERPRINT_KEY_NAME, winner)
                else:
                    self._key = self._vault.open_key(FINGERPRINT_KEY_NAME, stored[0])
            return self._key

    def fingerprint(self, number: str) -> str:
        """The keyed fingerprint of a normalized card number (digits only)."""
        return hmac.new(self._load_key(), number.encode("ascii"), hashlib.sha256).hexdigest()
