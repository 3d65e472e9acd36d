"""Log output: the fast plain renderer keeps the console renderer's look."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from handlers.logging import _PlainConsoleRenderer

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
