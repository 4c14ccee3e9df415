"""Logging for the apps: plain `logging` to stderr, one line per event.

The local runner redirects each app's stderr to a file, so stderr is the
only sink; the format is the same for every process of the mesh so their
logs can be read side by side.
"""

from __future__ import annotations

import logging
import os

from shopmesh.telemetry import TraceContextLogFilter

# trace_context is " trace_id=… span_id=…" inside a span, else empty
# (shopmesh.telemetry.TraceContextLogFilter).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s%(trace_context)s"
LOG_LEVEL_ENV = "SHOPMESH_LOG_LEVEL"


def setup_logging(service_name: str, level: int | str | None = None) -> logging.Logger:
    """Configure the root logger for this process and return the app's logger.

    `level` defaults to $SHOPMESH_LOG_LEVEL, else INFO.
    """
    chosen = level if level is not None else os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    logging.basicConfig(format=LOG_FORMAT, level=chosen, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceContextLogFilter())
    return logging.getLogger(service_name)
