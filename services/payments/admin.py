"""Card vault administration: what `shopmesh payments …` and `shopmesh up --kms …` run.

    shopmesh up --kms local|aws [--kms-key-id ARN | --kms-create] [--kms-decrypt-key-id ARN]…
    shopmesh payments rotate-key      add a new local wrapping key (local provider)
    shopmesh payments rewrap          re-encrypt every card under the current key, resumably
    shopmesh payments audit verify    check the audit log's hash chain

The commands work on the payments data directory
(`<state dir>/pods/payments/data`, or --data-dir) with the key provider the
service last ran with (keys/provider.json), so they can run while the mesh
is up: rewrap swaps each record with a compare-and-swap on its ciphertext,
so a record the service changed meanwhile is read again, never overwritten.
AWS access comes from the caller's standard AWS SDK environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.payments.audit import AUDIT_PATH, AuditChainBroken, AuditError, AuditLog, current_caller, verify
from services.payments.fingerprint import CardFingerprints
from services.payments.keys import (
    CardKeyProvider,
    KeyServiceError,
    create_kms_key,
    key_provider_for,
    recorded_provider,
    rotate_local_key,
)
from services.payments.settings import KmsSettings, kms_settings
from services.payments.storage import DB_NAME, PaymentsStore
from services.payments.vault import CardVault, VaultError
from shopmesh.config import ConfigError

# Where the local runner puts the payments app's data (runner._start_pod:
# <state dir>/pods/<pod>/data).
PAYMENTS_DATA_DIR = Path("pods") / "payments" / "data"
PROGRESS_EVERY = 25
BATCH = 50

Print = Callable[[str], None]


class AdminError(Exception):
    """An admin command cannot run; the message says why and what to do."""


# --- `shopmesh up --kms …` -----------------------------------------------------------


def add_kms_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("card keys (payments)")
    group.add_argument("--kms", choices=("local", "aws"), default="local",
                       help="who wraps card data keys: a local AES key in the state dir, or AWS KMS (default: %(default)s)")
    group.add_argument("--kms-key-id", metavar="ARN", help="with --kms aws: the KMS key ARN that wraps new card data keys")
    group.add_argument("--kms-create", action="store_true",
                       help="with --kms aws: create a new KMS key (for moto/LocalStack demos) and use it")
    group.add_argument("--kms-decrypt-key-id", metavar="ARN", action="append", default=[],
                       help="with --kms aws: an earlier key ARN still allowed to decrypt old records (after a rotation); repeatable")


def payments_env_for_up(args: argparse.Namespace, state_dir: Path, out: Print = print) -> dict[str, str]:
    """The payments app's key-provider environment for `shopmesh up`; AdminError if the flags do not fit."""
    if args.kms_create and args.kms_key_id:
        raise AdminError("--kms-key-id and --kms-create exclude each other: use an existing key or create one")
    if args.kms_create and args.kms != "aws":
        raise AdminError("--kms-create needs --kms aws")
    key_id = args.kms_key_id
    try:
        if args.kms_create:
            key_id = create_kms_key(f"ShopMesh card data keys (state dir {state_dir})")
            out(f"created KMS key {key_id} (to keep using it: --kms aws --kms-key-id {key_id})")
        chosen = kms_settings(
            args.kms, key_id, tuple(args.kms_decrypt_key_id), names=("--kms", "--kms-key-id", "--kms-decrypt-key-id")
        )
    except (ConfigError, KeyServiceError) as exc:
        raise AdminError(str(exc)) from None
    return chosen.to_env()


# --- rewrap -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RewrapResult:
    run_id: str
    target_key: str
    done: int
    total: int
    finished: bool
    error: str | None = None


def rewrap(
    data_dir: Path,
    keys: CardKeyProvider,
    *,
    max_records: int | None = None,
    out: Print = print,
) -> RewrapResult:
    """Re-encrypt every card (and the fingerprint key) under keys.key_ref.

    Progress is stored after every card, in the same transaction as the
    card, so a run that stops (an error, a kill, --max-records) resumes at
    the next card. Each record is decrypted with any key the provider still
    trusts and sealed again with a fresh data key under the current one.
    """
    if not (data_dir / DB_NAME).exists():
        raise AdminError(f"no payments database at {data_dir / DB_NAME}; is --state-dir / --data-dir right?")
    store = PaymentsStore.in_data_dir(data_dir)
    audit = AuditLog.in_data_dir(data_dir)
    vault = CardVault(keys, audit=audit)
    fingerprints = CardFingerprints(vault, store)
    target = keys.key_ref
    current_caller.set(f"operator:uid={os.getuid()} (shopmesh payments rewrap)")

    for name in store.wrapped_key_names():
        stored = store.get_wrapped_key(name)
        if stored is None:
            continue
        old, old_ref = stored
        try:
            new = vault.seal_key(name, vault.open_key(name, old))
        except VaultError as exc:
            raise AdminError(f"rewrap stopped before the cards: {exc}; fix that and run it again") from None
        if store.replace_wrapped_key(name, old, new, target):
            audit.append("rewrap", "ok", details={"key_name": name, "from": old_ref, "to": target})

    run, created = store.open_rewrap_run("rw_" + uuid.uuid4().hex[:12], target)
    done, last = run.done, run.last_token
    out(f"rewrap: {'starting' if created else 'resuming'} run {run.run_id}: {done}/{run.total} cards done; target {target}")
    processed = 0
    while True:
        batch = store.cards_after(last, BATCH)
        if not batch:
            break
        for card, fingerprint in batch:
            if max_records is not None and processed >= max_records:
                out(f"rewrap: paused after {processed} cards at {done}/{max(run.total, done)}; run it again to continue")
                return RewrapResult(run.run_id, target, done, max(run.total, done), finished=False)
            token = card.card.token
            try:
                outcome = _rewrap_card(store, vault, fingerprints, run.run_id, token, target, fingerprint is None)
            except VaultError as exc:
                audit.append("rewrap", "error", token=token, details={"to": target})
                message = f"rewrap stopped at {done}/{max(run.total, done)}: {exc}; run it again to resume"
                out(message)
                return RewrapResult(run.run_id, target, done, max(run.total, done), finished=False, error=message)
            last = token
            processed += 1
            if outcome is None:
                continue
            audit.append("rewrap", "ok", token=token, details={"from": outcome, "to": target})
            done += 1
            if done % PROGRESS_EVERY == 0:
                out(f"rewrap: {done}/{max(run.total, done)} cards ({100 * done // max(run.total, done, 1)}%)")
    store.finish_rewrap_run(run.run_id)
    in_use = ", ".join(f"{count} under {ref}" for ref, count in store.key_providers_in_use().items()) or "no cards"
    out(f"rewrap: done: {done}/{max(run.total, done)} cards re-encrypted under {target} (cards now: {in_use})")
    return RewrapResult(run.run_id, target, done, max(run.total, done), finished=True)


def _rewrap_card(
    store: PaymentsStore,
    vault: CardVault,
    fingerprints: CardFingerprints,
    run_id: str,
    token: str,
    target: str,
    needs_fingerprint: bool,
) -> str | None:
    """Re-encrypt one card; returns the key that had sealed it (None: the card is gone)."""
    # Two attempts: the service may change the row between our read and our
    # swap (nothing in payments does today, but the swap is conditional anyway).
    for _attempt in range(2):
        stored = store.get_card(token)
        if stored is None:
            store.skip_rewrap_card(run_id, token)
            return None
        number = vault.open(token, stored.ciphertext)
        fingerprint = fingerprints.fingerprint(number) if needs_fingerprint else None
        sealed = vault.seal(token, number)
        del number
        if store.rewrap_card(run_id, token, stored.ciphertext, sealed, target, fingerprint):
            return stored.key_provider
    raise VaultError(f"the card for {token} kept changing during rewrap")


# --- `shopmesh payments …` ------------------------------------------------------------------


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir).resolve()
    return Path(args.state_dir).resolve() / PAYMENTS_DATA_DIR


def _keys_for(data_dir: Path) -> CardKeyProvider:
    kms: KmsSettings = recorded_provider(data_dir)
    return key_provider_for(kms, data_dir)


def cmd_rotate_key(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    if recorded_provider(data_dir).kind == "aws":
        raise AdminError(
            "payments uses AWS KMS: rotate in KMS (automatic rotation keeps the ARN; for a new key, restart with "
            "--kms-key-id NEW --kms-decrypt-key-id OLD), then run `shopmesh payments rewrap`"
        )
    key_ref = rotate_local_key(data_dir)
    print(f"new local wrapping key {key_ref} in {data_dir / 'keys'}")
    print("payments uses it for new cards after a restart; then `shopmesh payments rewrap` moves the old ones to it")
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    result = rewrap(data_dir, _keys_for(data_dir), max_records=args.max_records, out=lambda line: print(line, flush=True))
    return 1 if result.error else 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    path = Path(args.audit_log).resolve() if args.audit_log else _data_dir(args) / AUDIT_PATH
    try:
        summary = verify(path)
    except AuditChainBroken as exc:
        print(f"audit log {path} is BROKEN at {exc}", file=sys.stderr)
        return 1
    print(f"audit log {path}: OK, {summary.entries} entries, head sha256 {summary.head}")
    print("record the head somewhere this host cannot write; a later verify must show it (or a longer chain from it)")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_payments_commands(sub: Any, default_state_dir: str) -> None:
    """Add `payments rotate-key|rewrap|audit verify` to the CLI's subparsers."""
    payments = sub.add_parser("payments", help="card vault administration: rotate-key, rewrap, audit verify")
    commands = payments.add_subparsers(dest="payments_command", required=True)

    def add(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        parser.add_argument("--state-dir", default=default_state_dir, help="the mesh's state directory (default: %(default)s)")
        parser.add_argument("--data-dir", help="the payments data directory, instead of <state-dir>/pods/payments/data")
        return parser

    add(commands, "rotate-key", "add a new local wrapping key (new cards use it after a restart)").set_defaults(
        func=_guarded(cmd_rotate_key)
    )
    p = add(commands, "rewrap", "re-encrypt every stored card under the current key (resumable)")
    p.add_argument("--max-records", type=_positive, help="stop after this many cards (run again to continue)")
    p.set_defaults(func=_guarded(cmd_rewrap))
    audit = commands.add_parser("audit", help="the payments audit log").add_subparsers(dest="audit_command", required=True)
    p = add(audit, "verify", "check every entry's hash and its link to the previous one")
    p.add_argument("--audit-log", help="a copy of the audit log to check, instead of the one in the data directory")
    p.set_defaults(func=_guarded(cmd_audit_verify))


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (AdminError, ConfigError, AuditError, KeyServiceError) as exc:
            print(f"shopmesh payments: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ConfigError) else 1

    return run
