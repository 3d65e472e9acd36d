"""Live model output: a running step's streamed text as ``delta`` events (SPEC 7.1).

``{"step", "attempt", "offset", "text"}``: ``offset`` is the number of characters
of this attempt's answer before ``text``, so one attempt's texts in order are its
answer so far, and a reader can tell a duplicate or a gap. Deltas are coalesced:
at most one per step per :data:`COALESCE_S`, the first no earlier than that after
the attempt began, so a step that answers faster writes none (its artifact says
it all). A retry or repair is a new attempt at offset 0.

The log is never rewritten (a replay shows what a live reader saw), so a long
answer's deltas thin out instead: the gap before the next one is at least the
attempt's age over :data:`FULL_RATE_DELTAS`. An attempt of ``T`` seconds writes at
most ``FULL_RATE_DELTAS * (1 + ln(T / (FULL_RATE_DELTAS * COALESCE_S))) + 1``
deltas: about 30 in its first 3 s, 87 in 20 s, 142 in 120 s (``LLM_TIMEOUT_S``'s default).

The text still buffered when a call ends is dropped: the step's artifact (or, for
a failed attempt, the next attempt) supersedes it. Deltas are events of the job's
log like any other, written with :meth:`JobStore.append_event`; a write that fails
keeps its text for the next one, so offsets stay contiguous.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from pipeline.ports import JobStore, TextSink
from pipeline.vocabulary import EventType

log = structlog.get_logger(__name__)

COALESCE_S = 0.1
"""Shortest time between two ``delta`` events of one step."""
FULL_RATE_DELTAS = 30
"""Deltas an attempt writes at the full rate before they thin out."""


class StepDeltas:
    """The ``delta`` events of one step of one job, across its attempts."""

    def __init__(self, store: JobStore, job_id: str, step: str) -> None:
        self.store = store
        self.job_id = job_id
        self.step = step
        self.attempt = 0
        self._offset = 0
        """Characters of this attempt's answer written as deltas."""
        self._pending: list[str] = []
        self._due = 0.0
        self._began = 0.0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        """Starts the writer when the first delta is due."""
        self._writing = False
        """A write of the writer is in flight."""
        self.received = 0
        """Characters the current attempt received."""

    def sink(self, attempt: int) -> TextSink:
        """Where attempt ``attempt``'s text goes; a new attempt drops the old one's (a
        write of the old one in flight lands, then its task ends)."""
        self._cancel_timer()
        self._task = None
        self.attempt = attempt
        self._offset = 0
        self._pending = []
        self.received = 0
        self._began = time.monotonic()
        self._due = self._began + COALESCE_S
        return self._take

    async def close(self) -> None:
        """The call ended: drop what is buffered; a write in flight lands first (so no
        delta of the step arrives after its artifact), a writer waiting for its turn
        is cancelled without a wait (most calls end before their first delta)."""
        self._cancel_timer()
        task, self._task = self._task, None
        self._pending = []
        if task is None or task.done():
            return
        if self._writing:
            await asyncio.wait({task})
        else:
            task.cancel()

    def _take(self, text: str) -> None:
        if not text:
            return
        self._pending.append(text)
        self.received += len(text)
        if self._timer is None and (self._task is None or self._task.done()):
            delay = max(0.0, self._due - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._start, self.attempt)

    def _start(self, attempt: int) -> None:
        self._timer = None
        if self._pending and attempt == self.attempt:
            self._task = asyncio.get_running_loop().create_task(
                self._write_when_due(attempt), name=f"job:{self.job_id}:delta:{self.step}"
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _write_when_due(self, attempt: int) -> None:
        while self._pending and attempt == self.attempt:
            wait = self._due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            parts = len(self._pending)
            text = "".join(self._pending)
            data = {"step": self.step, "attempt": attempt, "offset": self._offset, "text": text}
            self._writing = True
            try:
                await self.store.append_event(self.job_id, EventType.DELTA, data)
            except Exception as exc:  # kept for the next write: offsets stay contiguous
                log.warning("delta_write_failed", job_id=self.job_id, step=self.step, error=str(exc))
                self._due = time.monotonic() + COALESCE_S
                continue
            finally:
                self._writing = False
            if attempt != self.attempt:
                return
            del self._pending[:parts]
            self._offset += len(text)
            now = time.monotonic()
            self._due = now + max(COALESCE_S, (now - self._began) / FULL_RATE_DELTAS)
