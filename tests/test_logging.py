"""Log output: the fast plain renderer keeps the console renderer's look."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError

from handlers.logging import _PlainConsoleRenderer, configure_logging

EVENTS: list[dict[str, Any]] = [
    {
        "event": "step_finished",
        "level": "info",
        "logger": "pipeline.runner",
        "timestamp": "2026-11-28T21:18:31.123456Z",
        "job_id": "8a66b0b0-4739-4f05-b269-03789ba4b55a",
        "step": "market",
        "size": 1234,
        "cached": False,
        "progress": 40,
        "error": None,
        "steps": ["a", "b"],
    },
    {"event": "a rather long event name that is longer than thirty", "level": "warning"},
    {"event": "worker_started", "level": "info", "timestamp": "t", "logger": "jobq.worker"},
]


@pytest.mark.parametrize("event", EVENTS)
def test_plain_lines_read_as_the_console_renderer_writes_them(event: dict[str, Any]) -> None:
    """Where no terminal watches, a line reads as structlog's console renderer writes it uncoloured."""
    ours = _PlainConsoleRenderer()(None, "info", dict(event))
    theirs = structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(event))
    assert ours == theirs


@pytest.fixture
def configured() -> Iterator[None]:
    """``configure_logging`` for one test; the process's logging set-up is restored after."""
    saved = structlog.get_config()
    root, saq = logging.getLogger(), logging.getLogger("saq")
    handlers, level, saq_level, saq_filters = root.handlers[:], root.level, saq.level, saq.filters[:]
    yield
    structlog.configure(**saved)
    root.handlers[:], saq.filters[:] = handlers, saq_filters
    root.setLevel(level)
    saq.setLevel(saq_level)


@pytest.mark.usefixtures("configured")
def test_saq_errors_while_redis_is_away_are_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    """SAQ's error about an unreachable Redis is one line without a traceback, and its
    "Error processing job" (the worker's job_delivery_crashed says the same) is dropped;
    another error keeps its traceback."""
    configure_logging("info", json=True)
    saq = logging.getLogger("saq")
    for exc in (RedisConnectionError("Error 111 connecting"), RuntimeError("a bug")):
        try:
            raise exc
        except Exception:
            saq.exception("Upkeep task failed unexpectedly")
            saq.exception("Error processing job %s", "Job<run_job>")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == [
        "Upkeep task failed unexpectedly: ConnectionError: Error 111 connecting",
        "Upkeep task failed unexpectedly",
    ]
    assert "exception" not in lines[0] and "RuntimeError: a bug" in lines[1]["exception"]
