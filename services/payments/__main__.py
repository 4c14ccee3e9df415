"""Run the payments service: `python -m services.payments`.

Environment: SHOPMESH_APP_LISTEN (default 127.0.0.1:50051), SHOPMESH_DATA_DIR
(required; payments.db, keys/ and audit/ live there), and the key provider
and data key cache settings described in settings.py (SHOPMESH_KMS, …).
"""

from __future__ import annotations

import logging
import sys

from services.payments.server import payments_servicer
from services.payments.settings import settings_from_env
from shopmesh.config import AppConfig
from shopmesh.server import run_app, serve

# Libraries whose log lines must stay out of the service log whatever
# SHOPMESH_LOG_LEVEL says: botocore's DEBUG output includes KMS response
# bodies, i.e. plaintext data keys; the Encryption SDK logs tracebacks of
# library errors whose text we do not vet (the vault reports failures
# itself, by type) and, at INFO, every encryption context.
_QUIET_LOGGERS = {
    "aws_encryption_sdk": logging.CRITICAL,
    "botocore": logging.WARNING,
    "boto3": logging.WARNING,
    "urllib3": logging.WARNING,
}


async def main(config: AppConfig) -> None:
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    settings = settings_from_env()
    with payments_servicer(config.data_dir, settings=settings) as servicer:
        await serve(config.listen, servicer.register)


if __name__ == "__main__":
    sys.exit(run_app("payments", main))
