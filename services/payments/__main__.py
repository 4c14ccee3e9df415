"""Run the payments service: `python -m services.payments`.

Environment: SHOPMESH_APP_LISTEN (default 127.0.0.1:50051), SHOPMESH_DATA_DIR
(required; payments.db and keys/card-wrapping.key live there).
"""

from __future__ import annotations

import logging
import sys

from services.payments.server import payments_servicer
from shopmesh.config import AppConfig
from shopmesh.server import run_app, serve


async def main(config: AppConfig) -> None:
    # The Encryption SDK logs every data key it generates at INFO; one line
    # per tokenization in our own audit log is enough.
    logging.getLogger("aws_encryption_sdk").setLevel(logging.WARNING)
    with payments_servicer(config.data_dir) as servicer:
        await serve(config.listen, servicer.register)


if __name__ == "__main__":
    sys.exit(run_app("payments", main))
