"""Payments settings from the environment, validated at start-up.

    SHOPMESH_KMS                         local (default) | aws
    SHOPMESH_KMS_KEY_ID                  aws: the key ARN that wraps new data keys (required)
    SHOPMESH_KMS_DECRYPT_KEY_IDS         aws: comma-separated key ARNs that may still unwrap
                                         old records (the keys before a rotation); optional
    SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S    seconds a cached data key is used (default 300)
    SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES messages encrypted under one data key (default 100)
    SHOPMESH_DATA_KEY_CACHE_MAX_BYTES    bytes encrypted under one data key (default 65536)
    SHOPMESH_PAYMENTS_PAUSE_AFTER_AUTHORIZE
                                         test hook: a marker file path; see failpoints.py

AWS itself is configured the standard way (AWS_REGION, AWS_ENDPOINT_URL_KMS
or AWS_ENDPOINT_URL, credentials), so moto, LocalStack and AWS all work.
A bad value raises ConfigError naming the variable and the value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shopmesh.config import ConfigError

KMS_ENV = "SHOPMESH_KMS"
KMS_KEY_ID_ENV = "SHOPMESH_KMS_KEY_ID"
KMS_DECRYPT_KEY_IDS_ENV = "SHOPMESH_KMS_DECRYPT_KEY_IDS"
CACHE_MAX_AGE_ENV = "SHOPMESH_DATA_KEY_CACHE_MAX_AGE_S"
CACHE_MAX_MESSAGES_ENV = "SHOPMESH_DATA_KEY_CACHE_MAX_MESSAGES"
CACHE_MAX_BYTES_ENV = "SHOPMESH_DATA_KEY_CACHE_MAX_BYTES"
PAUSE_AFTER_AUTHORIZE_ENV = "SHOPMESH_PAYMENTS_PAUSE_AFTER_AUTHORIZE"

KMS_KINDS = ("local", "aws")

# A data key is reused for at most 5 minutes, 100 messages and 64 KiB. With
# one encryption context per record (see vault.py) reuse only happens when
# one record is sealed again; the decryption side is where the cache pays
# (repeated charges of one card cost one KMS Decrypt per 5 minutes).
DEFAULT_CACHE_MAX_AGE_S = 300.0
DEFAULT_CACHE_MAX_MESSAGES = 100
DEFAULT_CACHE_MAX_BYTES = 64 * 1024
# The Encryption SDK's own ceilings: 2^32 messages, 2^63 - 1 bytes per data key.
MAX_CACHE_MESSAGES = 2**32
MAX_CACHE_BYTES = 2**63 - 1
MAX_CACHE_AGE_S = 86400.0

# Full key ARNs only: the Encryption SDK's strict provider needs them to
# decrypt, and an alias could be re-pointed to another key without anyone
# touching this configuration.
KEY_ARN_PATTERN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]{1,128}$")


@dataclass(frozen=True)
class CacheLimits:
    max_age_s: float = DEFAULT_CACHE_MAX_AGE_S
    max_messages: int = DEFAULT_CACHE_MAX_MESSAGES
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES


@dataclass(frozen=True)
class KmsSettings:
    kind: str = "local"  # "local" or "aws"
    key_id: str | None = None  # aws: the key ARN new records are wrapped under
    decrypt_key_ids: tuple[str, ...] = ()  # aws: earlier keys, for decryption only

    def to_env(self) -> dict[str, str]:
        """The environment that selects these settings (for the runner)."""
        env = {KMS_ENV: self.kind}
        if self.key_id:
            env[KMS_KEY_ID_ENV] = self.key_id
        if self.decrypt_key_ids:
            env[KMS_DECRYPT_KEY_IDS_ENV] = ",".join(self.decrypt_key_ids)
        return env


@dataclass(frozen=True)
class PaymentsSettings:
    kms: KmsSettings
    cache: CacheLimits
    pause_after_authorize: Path | None = None


def check_key_arn(value: str, *, what: str) -> str:
    if not KEY_ARN_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{what}={value!r} is not a KMS key ARN "
            "(expected arn:aws:kms:<region>:<account>:key/<key id>; aliases and bare key ids are not accepted)"
        )
    return value


def kms_settings(kind: str, key_id: str | None, decrypt_key_ids: tuple[str, ...], *, names: tuple[str, str, str]) -> KmsSettings:
    """Validate a KMS choice; `names` are how the three values are called in errors (env vars or flags)."""
    kind_name, key_name, decrypt_name = names
    if kind not in KMS_KINDS:
        raise ConfigError(f"{kind_name}={kind!r}: expected one of {', '.join(KMS_KINDS)}")
    if kind == "local":
        if key_id or decrypt_key_ids:
            given = key_name if key_id else decrypt_name
            raise ConfigError(f"{given} is set but {kind_name}=local; KMS key ids only apply with {kind_name}=aws")
        return KmsSettings()
    if not key_id:
        raise ConfigError(f"{kind_name}=aws needs {key_name} (the ARN of the KMS key that wraps card data keys)")
    check_key_arn(key_id, what=key_name)
    for arn in decrypt_key_ids:
        check_key_arn(arn, what=decrypt_name)
    return KmsSettings(kind="aws", key_id=key_id, decrypt_key_ids=tuple(a for a in dict.fromkeys(decrypt_key_ids) if a != key_id))


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool, upper: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or not 0 < value <= upper:
        limit = f"{int(upper)}" if integer else f"{upper:g}"
        raise ConfigError(f"{name}={raw!r} must be greater than 0 and at most {limit}")
    return value


def settings_from_env(environ: Mapping[str, str] | None = None) -> PaymentsSettings:
    env = os.environ if environ is None else environ
    decrypt_raw = env.get(KMS_DECRYPT_KEY_IDS_ENV, "").strip()
    kms = kms_settings(
        env.get(KMS_ENV, "").strip() or "local",
        env.get(KMS_KEY_ID_ENV, "").strip() or None,
        tuple(part.strip() for part in decrypt_raw.split(",") if part.strip()) if decrypt_raw else (),
        names=(KMS_ENV, KMS_KEY_ID_ENV, KMS_DECRYPT_KEY_IDS_ENV),
    )
    cache = CacheLimits(
        max_age_s=float(_number(env, CACHE_MAX_AGE_ENV, DEFAULT_CACHE_MAX_AGE_S, integer=False, upper=MAX_CACHE_AGE_S)),
        max_messages=int(_number(env, CACHE_MAX_MESSAGES_ENV, DEFAULT_CACHE_MAX_MESSAGES, integer=True, upper=MAX_CACHE_MESSAGES)),
        max_bytes=int(_number(env, CACHE_MAX_BYTES_ENV, DEFAULT_CACHE_MAX_BYTES, integer=True, upper=MAX_CACHE_BYTES)),
    )
    pause_raw = env.get(PAUSE_AFTER_AUTHORIZE_ENV, "").strip()
    pause = Path(pause_raw).absolute() if pause_raw else None
    if pause is not None and not pause.parent.is_dir():
        raise ConfigError(f"{PAUSE_AFTER_AUTHORIZE_ENV}={pause_raw!r}: directory {str(pause.parent)!r} does not exist")
    return PaymentsSettings(kms=kms, cache=cache, pause_after_authorize=pause)
