"""structlog set-up shared by every entry point: console lines or JSON (``LOG_JSON``).

Standard-library loggers (uvicorn, saq, botocore) go through the same renderer so
an operator sees one format.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", json: bool = False) -> None:
    """Configure structlog and the root logger once per process (idempotent)."""
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            # the console renderer formats exceptions itself, JSON needs them as a string
            *([structlog.processors.format_exc_info] if json else []),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # asyncio warns for every write to a socket a streaming client already closed.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.ERROR))
    # botocore logs every request at debug; keep it quiet unless asked for warnings.
    for noisy in ("botocore", "boto3", "urllib3", "aiobotocore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
