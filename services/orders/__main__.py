"""Run the orders service: `python -m services.orders`.

Environment: SHOPMESH_APP_LISTEN (default 127.0.0.1:50051), SHOPMESH_DATA_DIR
(required; orders.db lives there), SHOPMESH_UPSTREAM_SEARCH and
SHOPMESH_UPSTREAM_PAYMENTS (the sidecar's outbound listeners on 127.0.0.1;
defaults from shopmesh.topology).
"""

from __future__ import annotations

import sys

from services.orders.server import Upstreams, orders_servicer
from shopmesh.config import APP_HOST, AppConfig, env_address, format_address
from shopmesh.server import run_app, serve
from shopmesh.topology import OUTBOUND_PORTS

SEARCH_ENV = "SHOPMESH_UPSTREAM_SEARCH"
PAYMENTS_ENV = "SHOPMESH_UPSTREAM_PAYMENTS"


def upstreams_from_env() -> Upstreams:
    # Loopback only: these are plaintext hops to the local sidecar.
    search = env_address(SEARCH_ENV, f"{APP_HOST}:{OUTBOUND_PORTS['search']}")
    payments = env_address(PAYMENTS_ENV, f"{APP_HOST}:{OUTBOUND_PORTS['payments']}")
    return Upstreams(search=format_address(*search), payments=format_address(*payments))


async def main(config: AppConfig) -> None:
    upstreams = upstreams_from_env()
    async with orders_servicer(config.data_dir, upstreams) as servicer:
        await serve(config.listen, servicer.register)


if __name__ == "__main__":
    sys.exit(run_app("orders", main))
