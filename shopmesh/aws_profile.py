"""compose.yaml's `aws` profile: the CA on ACM Private CA, payments on AWS KMS.

    COMPOSE_PROFILES=aws docker compose up -d

A compose profile can add services but cannot change the ones that are
always there, so the profile works in two halves:

- `profiles: [aws]` adds `moto`, the AWS endpoint (`python -m shopmesh.aws_profile
  moto -- …` checks the profile, then runs moto);
- the ca and payments containers get COMPOSE_PROFILES interpolated into
  SHOPMESH_COMPOSE_PROFILES. When it names `aws`, the CA runs
  `pki.ca_server --ca acm-pca --pca-create` (shopmesh.ca_pod asks
  `ca_server_args()`), and payments starts through
  `python -m shopmesh.aws_profile payments -- python -m services.payments`,
  which creates the KMS key that wraps card data keys on first start, keeps
  its ARN in payments' own data volume (an ARN, not a secret), and runs
  payments with SHOPMESH_KMS=aws and that key.

`docker compose --profile aws up` would start moto without switching
anything: moto's entry point notices (SHOPMESH_COMPOSE_PROFILES lacks `aws`)
and exits with a message saying to use COMPOSE_PROFILES=aws instead. AWS
itself is configured the standard way (AWS_ENDPOINT_URL, AWS_REGION,
credentials), so the same code runs against real AWS.

    python -m shopmesh.aws_profile moto -- COMMAND...         moto's entry point
    python -m shopmesh.aws_profile payments -- COMMAND...     payments' entry point
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("shopmesh.aws_profile")

PROFILES_ENV = "SHOPMESH_COMPOSE_PROFILES"
PCA_MODE_ENV = "SHOPMESH_PCA_MODE"
PROFILE = "aws"
KMS_KEY_FILE = "kms-key-arn"
WAIT_S = 180.0


class AwsProfileError(Exception):
    """The aws profile cannot be set up; the message says what to do."""


def active(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return PROFILE in {p.strip() for p in env.get(PROFILES_ENV, "").split(",")}


def ca_server_args(environ: dict[str, str] | None = None) -> list[str]:
    """Extra `pki.ca_server` flags for the CA container: ACM PCA under the aws profile, else none."""
    if not active(environ):
        return []
    # --pca-create: a root PCA made (once per CA state volume) at the endpoint.
    # SHOPMESH_PCA_MODE (.env): "upstream" by default, PCA signs one mesh
    # intermediate that signs the short-lived SVIDs (one PCA call per
    # intermediate, not per SVID); "direct" has PCA sign every SVID.
    mode = (environ if environ is not None else os.environ).get(PCA_MODE_ENV, "").strip() or "upstream"
    if mode not in ("direct", "upstream"):
        raise AwsProfileError(f"{PCA_MODE_ENV}={mode!r}: use direct or upstream")
    return ["--ca", "acm-pca", "--pca-create", "--pca-mode", mode]


def wait_for_endpoint(timeout_s: float = WAIT_S) -> None:
    """Wait until AWS_ENDPOINT_URL accepts connections (moto starting up); no-op without one."""
    url = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if not url:
        return
    parts = urlsplit(url)
    if not parts.hostname:
        raise AwsProfileError(f"AWS_ENDPOINT_URL={url!r} has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((parts.hostname, port), timeout=2).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise AwsProfileError(f"the AWS endpoint {url} did not answer within {timeout_s:.0f}s ({err}); "
                                      "is the moto service running (COMPOSE_PROFILES=aws)?") from None
        time.sleep(1.0)  # polling another container's port with a deadline


def _key_exists(arn: str) -> bool:
    import boto3
    import botocore.exceptions

    try:
        boto3.client("kms").describe_key(KeyId=arn)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        return False
    return True


def require_active() -> None:
    """moto's entry point: refuse to serve an endpoint nothing will use."""
    if not active():
        raise AwsProfileError(
            f"the aws profile's moto is starting, but {PROFILES_ENV} (COMPOSE_PROFILES) does not name 'aws', "
            "so the CA and payments stay on their local backends. `--profile aws` cannot switch them: "
            "run `COMPOSE_PROFILES=aws docker compose up -d` instead"
        )


def payments_env(data_dir: Path, timeout_s: float = WAIT_S) -> dict[str, str]:
    """SHOPMESH_KMS and SHOPMESH_KMS_KEY_ID for payments under the aws profile.

    The key is created on first start and its ARN kept in payments' own data
    volume; a recorded key the endpoint no longer knows (moto forgets
    everything when it restarts) is replaced, and the log says so.
    """
    from services.payments.keys import KeyServiceError, create_kms_key

    wait_for_endpoint(timeout_s)
    record = data_dir / KMS_KEY_FILE
    try:
        arn = record.read_text().strip()
    except FileNotFoundError:
        arn = ""
    if arn and _key_exists(arn):
        return {"SHOPMESH_KMS": "aws", "SHOPMESH_KMS_KEY_ID": arn}
    if arn:
        log.warning("the KMS key %s recorded in %s is gone from the endpoint; cards sealed under it cannot be "
                    "read any more; creating a new key", arn, record)
    try:
        arn = create_kms_key("ShopMesh card data keys (compose aws profile)")
    except KeyServiceError as err:
        raise AwsProfileError(f"creating the KMS key failed: {err}") from err
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = record.with_name(f".{KMS_KEY_FILE}.tmp")
    tmp.write_text(arn + "\n")
    tmp.replace(record)
    log.info("created KMS key %s for card data keys; its ARN is kept in %s", arn, record)
    return {"SHOPMESH_KMS": "aws", "SHOPMESH_KMS_KEY_ID": arn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shopmesh.aws_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("moto", help="check the profile, then run the AWS endpoint")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the moto command")
    p = sub.add_parser("payments", help="start payments, on AWS KMS when the aws profile is on")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SHOPMESH_DATA_DIR", "/var/lib/shopmesh/data")))
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the payments command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error(f"{args.role}: give the command to run after --")
    env = dict(os.environ)
    try:
        if args.role == "moto":
            require_active()
        elif active():
            env.update(payments_env(args.data_dir))
            log.info("aws profile: payments on AWS KMS key %s", env["SHOPMESH_KMS_KEY_ID"])
    except AwsProfileError as err:
        log.error("%s", err)
        return 1
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
