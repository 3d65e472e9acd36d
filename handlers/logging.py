"""structlog set-up shared by every entry point: console lines or JSON (``LOG_JSON``).

Standard-library loggers (uvicorn, saq, botocore) go through the same renderer so
an operator sees one format.

The project's own log calls do not pass through the standard library: structlog
renders them and writes each line to stderr itself. A busy worker writes two lines
per step. Measured on this project's dev machine: through ``logging`` (a
``LogRecord``, a handler, a formatter) a line cost ~40 us more (JSON: 56 -> 15 us),
and logging at info took a worker running 200 jobs at once from 8.7 to 12.8 ms of
CPU per job before these changes (~0.7 ms after).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import msgspec
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


class _PlainConsoleRenderer:
    """The lines of structlog's ``ConsoleRenderer`` without colors (time, level,
    event, logger, then the other keys sorted), with exceptions as plain text.

    structlog's renderer builds every key=value pair through a ``StringIO`` of its
    own: a whole line took 49 us with it and takes 17 us with this one (measured).
    Used where nobody watches a terminal (a deployment's log stream, a file)."""

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        timestamp = event_dict.pop("timestamp", None)
        level = event_dict.pop("level", name)
        event = str(event_dict.pop("event", ""))
        logger_name = event_dict.pop("logger", None)
        stack = event_dict.pop("stack", None)
        exception = event_dict.pop("exception", None)
        parts = [f"{timestamp} " if timestamp else "", f"[{level:<9}] {event:<30}"]
        if logger_name:
            parts.append(f" [{logger_name}]")
        for key in sorted(event_dict):
            value = event_dict[key]
            parts.append(f" {key}={value if isinstance(value, str) else repr(value)}")
        line = "".join(parts).rstrip(" ")
        if stack:
            line += "\n" + stack
        if exception:
            line += "\n" + exception
        return line


_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
"""Errors that mean Redis cannot be reached (now): a line each, no traceback."""


SECRET_QUERY_RE = re.compile(
    r"(?i)([?&](?:[\w.-]*token|api[_-]?key|x-api-key|key|auth|authorization|secret|password|"
    r"signature|sig)=)[^&\s\"']*"
)
"""A query parameter whose value is a secret (``token``, ``api_key``, ``key``, ...)."""


def redact_secrets(text: str) -> str:
    """``text`` with the values of secret-looking query parameters replaced."""
    return SECRET_QUERY_RE.sub(r"\1[redacted]", text)


class _RedactSecretsInUrls(logging.Filter):
    """No secret in a log line: uvicorn's access line holds the whole URL, query
    included, and a stream URL's ``token`` (or a client's misplaced ``api_key``) would
    otherwise be written out in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" in message:
            redacted = redact_secrets(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class _SaqErrorsInOneLine(logging.Filter):
    """SAQ's own error lines, trimmed. Its "Error processing job" repeats the worker's
    ``job_delivery_crashed``, so it is dropped; an error because Redis cannot be reached
    is one line without a traceback (an upkeep task printed one every two seconds per
    worker for as long as Redis was away)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Error processing job"):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, _UNREACHABLE):
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {exc}", None
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(level: str = "info", json: bool = False) -> None:
    """Configure structlog and the root logger once per process (idempotent)."""
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    terminal = sys.stderr.isatty() and not json
    renderer: structlog.types.Processor
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    elif terminal:
        # plain tracebacks: rich's would print every frame's locals into the log
        renderer = structlog.dev.ConsoleRenderer(
            colors=True, exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = _PlainConsoleRenderer()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            # the terminal renderer formats exceptions itself, the others take text
            *([] if terminal else [structlog.processors.format_exc_info]),
            renderer,
        ],
        logger_factory=_WriteLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactSecretsInUrls())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([] if terminal else [structlog.processors.format_exc_info]),
                renderer,
            ],
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
    saq = logging.getLogger("saq")
    saq.setLevel(max(numeric, logging.WARNING))
    saq.filters[:] = [_SaqErrorsInOneLine()]
    # asyncio warns for every write to a socket a streaming client already closed.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.ERROR))
    # botocore logs every request at debug; keep it quiet unless asked for warnings.
    for noisy in ("botocore", "boto3", "urllib3", "aiobotocore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
