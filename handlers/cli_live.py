"""``jobq submit --live``: the text each running step's model is writing, under the
progress bar, from the stream's ``delta`` events (SPEC 7.1)."""

from __future__ import annotations

import itertools
import string
import textwrap
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich import get_console
from rich.console import Console, RenderableType
from rich.progress import Progress
from rich.text import Text


@dataclass
class _Partial:
    attempt: int
    start: int
    """Offset of ``text``'s first character in the attempt's answer (0 unless a gap)."""
    text: str
    seen: int
    """When the step's text last grew (a counter), to show the busiest steps."""


class LiveText:
    """What each running step's model has written so far, from ``delta`` events (SPEC
    7.1: ``{step, attempt, offset, text}``). A new attempt drops the old text; a replayed
    delta (offset inside what is held) overwrites instead of repeating; a step leaves
    once the job's status says it is no longer running. Read by the progress display's
    refresh thread, hence the lock."""

    SHOWN_STEPS = 3
    LINES = 4

    def __init__(self) -> None:
        self.steps: dict[str, _Partial] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def event(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._event(kind, data)

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "delta":
            self._delta(data)
        elif kind == "status":
            steps = data.get("steps") or {}
            for step in [s for s in self.steps if steps.get(s) in ("completed", "cached", "failed")]:
                del self.steps[step]
        elif kind in ("result", "error", "done"):
            self.steps.clear()

    def _delta(self, data: dict[str, Any]) -> None:
        step, text = str(data.get("step", "")), str(data.get("text", ""))
        try:
            attempt, offset = int(data.get("attempt", 1)), int(data.get("offset", 0))
        except (TypeError, ValueError):
            return
        held = self.steps.get(step)
        if held is None or attempt > held.attempt:
            held = self.steps[step] = _Partial(attempt, offset, "", 0)
        elif attempt < held.attempt:
            return
        if held.start <= offset <= held.start + len(held.text):
            held.text = held.text[: offset - held.start] + text
        else:  # a gap (or text before what is held): keep what follows it
            held.start, held.text = offset, text
        held.seen = next(self._clock)

    def tail(self, width: int) -> list[tuple[str, list[str]]]:
        """``(step label, its last LINES lines wrapped to width)`` for the steps written
        to most recently, in the order they started."""
        with self._lock:
            held_now = list(self.steps.items())
        busiest = {step for step, _ in sorted(held_now, key=lambda kv: kv[1].seen)[-self.SHOWN_STEPS :]}
        result = []
        for step, held in (kv for kv in held_now if kv[0] in busiest):
            label = step if held.attempt == 1 else f"{step} (attempt {held.attempt})"
            lines: list[str] = []
            for line in readable(held.text).split("\n"):
                lines += textwrap.wrap(line, max(width, 20), replace_whitespace=False) or [""]
            tail = lines[-self.LINES :]
            if held.start > 0 or len(lines) > self.LINES:
                tail[0] = "…" + tail[0]
            result.append((label, tail))
        return result


_JSON_ESCAPES = {"n": "\n", "t": " ", "r": "", "b": "", "f": "", '"': '"', "\\": "\\", "/": "/"}


def readable(raw: str) -> str:
    """A model's (partial) JSON answer as text to read: each string or number on its own
    line after its key (``headline: ...``), list items as ``- ...``, escapes decoded,
    nesting indented; cut off anywhere it still reads. Text that is no JSON stays as is."""
    body = raw.lstrip()
    if body.startswith("```"):
        body = body.partition("\n")[2].lstrip()
    if not body.startswith(("{", "[")):
        return raw
    out: list[str] = []
    frames: list[list[str]] = []  # [kind "{" or "[", current key]
    expect_key = False
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == '"':
            value, i = _json_string(body, i + 1)
            if frames and frames[-1][0] == "{" and expect_key:
                frames[-1][1], expect_key = value, False
            else:
                out.append(_prefix(frames) + value)
            continue
        if c in "{[":
            if frames and frames[-1][0] == "{":
                out.append(f"{_indent(frames)}{frames[-1][1]}:")
            frames.append([c, ""])
            expect_key = c == "{"
        elif c in "}]":
            if frames:
                frames.pop()
        elif c == ",":
            expect_key = bool(frames) and frames[-1][0] == "{"
        elif not c.isspace() and c != ":":
            j = i
            while j < n and body[j] not in ",}] \n\t\r":
                j += 1
            out.append(_prefix(frames) + body[i:j])
            i = j
            continue
        i += 1
    text = "\n".join(out)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _json_string(body: str, i: int) -> tuple[str, int]:
    """The string starting at ``i`` (after its quote), decoded, and where the scan goes on."""
    chars: list[str] = []
    n = len(body)
    while i < n and body[i] != '"':
        if body[i] != "\\":
            chars.append(body[i])
            i += 1
        elif i + 1 < n and body[i + 1] == "u":
            digits = body[i + 2 : i + 6]
            if len(digits) < 4:
                return "".join(chars), n
            if all(d in string.hexdigits for d in digits):
                chars.append(chr(int(digits, 16)))
            i += 6
        elif i + 1 < n:
            chars.append(_JSON_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            return "".join(chars), n
    return "".join(chars), i + 1


def _indent(frames: list[list[str]]) -> str:
    return "  " * max(len(frames) - 1, 0)


def _prefix(frames: list[list[str]]) -> str:
    if not frames:
        return ""
    kind, key = frames[-1]
    return _indent(frames) + (f"{key}: " if kind == "{" else "- ")


class LiveProgress(Progress):
    """The progress bar, and under it (with ``writing``) the tail of each running step's text."""

    def __init__(self, *columns: Any, writing: LiveText | None, **kwargs: Any) -> None:
        # Set before Progress.__init__, which renders once before ``self.live`` exists.
        self.writing = writing
        self.screen: Console = kwargs.get("console") or get_console()
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.writing is None:
            return
        for label, lines in self.writing.tail(self.screen.width - 4):
            yield Text(f"  ▸ {label}", style="bold cyan")
            for line in lines:
                yield Text(f"    {line}", style="dim", no_wrap=True, overflow="ellipsis")
