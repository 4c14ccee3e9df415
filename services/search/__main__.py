"""Run the search service: `python -m services.search`.

Environment: SHOPMESH_APP_LISTEN (default 127.0.0.1:50051), SHOPMESH_DATA_DIR
(required; the catalog database and the page-token key live there).
"""

from __future__ import annotations

import sys

from services.search.server import search_servicer
from shopmesh.config import AppConfig
from shopmesh.server import run_app, serve


async def main(config: AppConfig) -> None:
    with search_servicer(config.data_dir) as servicer:
        await serve(config.listen, servicer.register)


if __name__ == "__main__":
    sys.exit(run_app("search", main))
