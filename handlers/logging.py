"""structlog set-up shared by every entry point: console lines or JSON (``LOG_JSON``).

Standard-library loggers (uvicorn, saq, botocore) go through the same renderer so
an operator sees one format.

The project's own log calls do not pass through the standard library: structlog
renders them and writes each line to stderr itself. A busy worker writes two lines
per step, and the hop through ``logging`` (a ``LogRecord``, a handler, a formatter)
cost ~40 us a line: a third of a worker's CPU per job at 200 jobs at once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import msgspec
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's plain file logger, with the ``name`` that ``add_logger_name`` reads."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _WriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self.file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self.file, str(args[0]) if args else "")


_json = msgspec.json.Encoder(enc_hook=str)


def _dumps(value: Any, **_: Any) -> str:
    """JSON of a log line by msgspec (what it cannot encode, as ``str``)."""
    return _json.encode(value).decode()


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
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        # plain tracebacks: rich's would print every frame's locals into the log
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            # the console renderer formats exceptions itself, JSON needs them as a string
            *([structlog.processors.format_exc_info] if json else []),
            renderer,
        ],
        logger_factory=_WriteLoggerFactory(sys.stderr),
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
    # SAQ logs each job it processes and finishes; the worker's own job_picked_up and
    # job_finished lines say as much, with the job id.
    logging.getLogger("saq").setLevel(max(numeric, logging.WARNING))
    # asyncio warns for every write to a socket a streaming client already closed.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.ERROR))
    # botocore logs every request at debug; keep it quiet unless asked for warnings.
    for noisy in ("botocore", "boto3", "urllib3", "aiobotocore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
