"""Opaque, validated page tokens and page sizes for List/Search methods.

A page token is the service's own note to itself ("continue after row N of
this query"), signed with HMAC-SHA256 under a key kept in the app's data
directory. The client can't read meaning into it, and the service rejects
any token it did not issue (or issued for another method) with
INVALID_ARGUMENT instead of trusting a forged offset. Keeping the key on disk
means tokens survive a restart of the app.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from shopmesh.config import load_or_create_secret
from shopmesh.server import InvalidArgument

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
PAGE_TOKEN_KEY_BYTES = 32
# Our tokens are well under this; a longer one cannot be ours.
_MAX_TOKEN_CHARS = 512
_MAC_BYTES = 16

PageTokenPayload = Mapping[str, str | int]


class InvalidPageToken(InvalidArgument):
    def __init__(self) -> None:
        super().__init__("page_token is not one this service issued")


def resolve_page_size(page_size: int) -> int:
    """0 means the default (20); 1..100 as asked; anything else is INVALID_ARGUMENT."""
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 1 to {MAX_PAGE_SIZE} (or 0 for {DEFAULT_PAGE_SIZE}), got {page_size}")
    return page_size


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Issue and check page tokens for one method (`purpose`)."""

    def __init__(self, key: bytes, purpose: str) -> None:
        if len(key) < 16:
            raise ValueError("page token key must be at least 16 bytes")
        self._key = key
        self._purpose = purpose

    @classmethod
    def from_key_file(cls, path: Path, purpose: str) -> PageTokens:
        return cls(load_or_create_secret(path, PAGE_TOKEN_KEY_BYTES), purpose)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, self._purpose.encode() + b"\x00" + body, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, payload: PageTokenPayload) -> str:
        body = json.dumps(dict(payload), sort_keys=True, separators=(",", ":")).encode()
        return f"{_b64encode(body)}.{_b64encode(self._mac(body))}"

    def parse(self, token: str) -> dict[str, str | int]:
        """The payload of a token this object issued; InvalidPageToken otherwise."""
        if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 1:
            raise InvalidPageToken()
        body_text, mac_text = token.split(".")
        try:
            body = _b64decode(body_text)
            mac = _b64decode(mac_text)
        except (binascii.Error, ValueError):
            raise InvalidPageToken() from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidPageToken()
        payload = json.loads(body)
        if not isinstance(payload, dict):
            raise InvalidPageToken()
        return payload
