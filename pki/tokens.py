"""Join tokens: SPIRE-style node attestation for the local mesh.

A join token is 32 random bytes (URL-safe base64), bound to one SPIFFE ID,
short-lived and single-use. The CA stores only its SHA-256, so a copy of
ca.db does not let anyone join. Redemption is one atomic UPDATE, so two
agents racing with the same token cannot both get a certificate.

Create one from a shell (the runner does the same through create_join_token):

    python -m pki.tokens create --state-dir .state \\
        --spiffe-id spiffe://shopmesh.internal/ns/shop/sa/orders --ttl 10m --out token.txt
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pki.db import connect
from pki.durations import parse_duration
from pki.errors import JoinTokenError, JoinTokenIdentityError, PkiError
from pki.spiffe_ids import DEFAULT_TRUST_DOMAIN, check_workload_id

log = logging.getLogger("pki.tokens")

DEFAULT_TOKEN_TTL_S = 600.0
# Tokens we hand out are 43 characters; anything far longer is not one of ours
# and is not worth hashing.
_MAX_TOKEN_CHARS = 256


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_fingerprint(token: str) -> str:
    """How errors and logs name a token without revealing it."""
    return f"sha256:{_digest(token)[:12]}"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


class JoinTokenStore:
    """Join tokens in <state>/ca/ca.db; safe to use from several processes at once."""

    def __init__(self, state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.state_dir = Path(state_dir)
        self.trust_domain = trust_domain
        with connect(self.state_dir):
            pass  # create the database and schema now, so errors surface at start-up

    def create_join_token(
        self, spiffe_id: str, ttl_s: float = DEFAULT_TOKEN_TTL_S, *, now: float | None = None
    ) -> str:
        """A new single-use token for spiffe_id, valid ttl_s seconds. Returned once, stored hashed.

        now (epoch seconds) is for tests that need a token created in the past.
        """
        check_workload_id(spiffe_id, self.trust_domain)
        if not ttl_s > 0:
            raise JoinTokenError(f"invalid join token TTL {ttl_s!r}: must be greater than zero seconds")
        token = secrets.token_urlsafe(32)
        now = time.time() if now is None else now
        with connect(self.state_dir) as conn:
            conn.execute(
                "INSERT INTO join_tokens (token_sha256, spiffe_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (_digest(token), spiffe_id, now, now + ttl_s),
            )
        log.info(
            "created join token %s for %s, expires %s", token_fingerprint(token), spiffe_id, _when(now + ttl_s)
        )
        return token

    def check(self, token: str, spiffe_id_requested: str) -> None:
        """Raise what redeem() would, without spending the token.

        The CA server checks a token before it issues (an anonymous caller
        must not make it call ACM PCA) and spends it only once issuance
        worked, so an upstream failure never burns a single-use token.
        """
        if not token:
            raise JoinTokenError("no join token given")
        if len(token) > _MAX_TOKEN_CHARS:
            raise JoinTokenError(f"join token is {len(token)} characters long; tokens are 43")
        with connect(self.state_dir) as conn:
            row = conn.execute(
                "SELECT spiffe_id, expires_at, used_at FROM join_tokens WHERE token_sha256 = ?", (_digest(token),)
            ).fetchone()
        self._refuse_unless_usable(token, spiffe_id_requested, row, time.time())

    @staticmethod
    def _refuse_unless_usable(token: str, spiffe_id_requested: str, row: tuple[str, float, float | None] | None, now: float) -> None:
        name = f"join token {token_fingerprint(token)}"
        if row is None:
            raise JoinTokenError(f"{name} is unknown to this CA")
        bound_id, expires_at, used_at = row
        if used_at is not None:
            raise JoinTokenError(f"{name} was already used at {_when(used_at)}; tokens are single-use")
        if expires_at <= now:
            raise JoinTokenError(f"{name} expired at {_when(expires_at)}")
        if bound_id != spiffe_id_requested:
            raise JoinTokenIdentityError(f"{name} was issued for '{bound_id}', not for '{spiffe_id_requested}'")

    def redeem(self, token: str, spiffe_id_requested: str) -> str:
        """Spend token for spiffe_id_requested; return the SPIFFE ID it was bound to.

        Raises JoinTokenError (and spends nothing) if the token is unknown,
        already used, expired, or bound to another identity.
        """
        if not token:
            raise JoinTokenError("no join token given")
        if len(token) > _MAX_TOKEN_CHARS:
            raise JoinTokenError(f"join token is {len(token)} characters long; tokens are 43")
        digest = _digest(token)
        now = time.time()
        with connect(self.state_dir) as conn:
            # Single use, atomically: of two concurrent redemptions exactly one
            # sees used_at IS NULL.
            cur = conn.execute(
                "UPDATE join_tokens SET used_at = ? "
                "WHERE token_sha256 = ? AND spiffe_id = ? AND used_at IS NULL AND expires_at > ?",
                (now, digest, spiffe_id_requested, now),
            )
            if cur.rowcount == 1:
                return spiffe_id_requested
            row = conn.execute(
                "SELECT spiffe_id, expires_at, used_at FROM join_tokens WHERE token_sha256 = ?", (digest,)
            ).fetchone()
        self._refuse_unless_usable(token, spiffe_id_requested, row, now)
        # Usable a moment ago but not now: another redemption won the race.
        raise JoinTokenError(f"join token {token_fingerprint(token)} was just used by another request; tokens are single-use")


def create_join_token(
    state_dir: Path,
    spiffe_id: str,
    ttl_s: float = DEFAULT_TOKEN_TTL_S,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> str:
    """Convenience for the runner: JoinTokenStore(state_dir).create_join_token(...)."""
    return JoinTokenStore(state_dir, trust_domain).create_join_token(spiffe_id, ttl_s)


def write_token_file(path: Path, token: str) -> None:
    """Write a token for an agent's --join-token-file: mode 0600, replaced atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pki.tokens", description="Manage join tokens.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a join token and print it (or write it to --out)")
    create.add_argument("--state-dir", required=True, type=Path)
    create.add_argument("--spiffe-id", required=True)
    create.add_argument("--ttl", default="10m", help="token lifetime, e.g. 90s, 10m (default 10m)")
    create.add_argument("--out", type=Path, help="write the token to this file (mode 0600) instead of stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        ttl = parse_duration(args.ttl)
    except PkiError as err:
        parser.error(f"--ttl: {err}")
    try:
        token = create_join_token(args.state_dir, args.spiffe_id, ttl.total_seconds())
    except PkiError as err:
        parser.error(f"--spiffe-id: {err}")
    if args.out:
        write_token_file(args.out, token)
    else:
        print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
