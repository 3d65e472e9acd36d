"""The job event stream (SPEC §4): the store's event log replayed and followed.

Every event carries the store's per-job id, so a reconnect with ``Last-Event-ID``
continues exactly after it. The log holds a finished job's events too, so a late
subscriber sees the final ``status``, ``result``/``error`` and ``done``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from pipeline.model import Job
from pipeline.ports import JobStore
from pipeline.vocabulary import TERMINAL_STATUSES, EventType

RETRY_MS = 2000
MAX_EVENT_ID = 2**53
"""Above any id a job's log issues (and the largest integer JavaScript keeps exact)."""
log = structlog.get_logger("jobq.sse")


def last_event_id(header: str | None, query: str | None) -> int:
    """The id to resume after: the header wins, then ``?lastEventId=``. Junk, which
    includes other scripts' digits and ids no log issues, means 0: replay from the start."""
    for raw in (header, query):
        text = (raw or "").strip()
        if text.isascii() and text.isdecimal() and len(text) <= 16 and int(text) <= MAX_EVENT_ID:
            return int(text)
    return 0


async def job_events(
    store: JobStore,
    job_id: str,
    after: int,
    *,
    heartbeat_s: float,
    window_s: float = 0.0,
    deltas: bool = True,
    load_job: Callable[[], Awaitable[Job | None]],
) -> AsyncIterator[ServerSentEventMessage]:
    """``retry:`` first, then events after ``after`` until ``done``; ``deltas=False``
    leaves out the ``delta`` events (their ids still count, so a resume stays exact).

    Waits in slices no longer than the heartbeat interval; with ``window_s > 0``
    (platforms that buffer the response) the stream ends after that long and the
    client reconnects with ``Last-Event-ID``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + window_s if window_s > 0 else None
    next_beat = started + heartbeat_s
    yield ServerSentEventMessage(data=None, retry=RETRY_MS)
    first = True
    while True:
        now = loop.time()
        if deadline is not None and now >= deadline:
            return
        # The first read does not wait: a reconnect after ``done`` has nothing to wait for.
        wait = 0.0 if first else max(0.0, min(next_beat, deadline or next_beat) - now)
        events = await store.read_events(job_id, after, wait_s=wait)
        for event in events:
            if event.id <= after:
                continue
            after = event.id
            if not deltas and event.type == EventType.DELTA:
                continue
            yield ServerSentEventMessage(id=event.id, event=event.type, data=json.dumps(event.data))
            if event.type == EventType.DONE:
                return
        if first and not events and await _finished_without_done(store, job_id, after, load_job):
            # A client that saw ``done`` and reconnected anyway: tell it again, at once.
            yield await _done_without_id(load_job)
            return
        first = False
        if loop.time() >= next_beat:
            next_beat = loop.time() + heartbeat_s
            if not events and await _finished_without_done(store, job_id, after, load_job):
                # The log lost its tail (expired or never written): close rather than
                # leave the client waiting forever.
                log.warning("sse_log_without_done", job_id=job_id, after=after)
                yield await _done_without_id(load_job)
                return
            yield ServerSentEventMessage(data=None, comment="keep-alive")


async def _done_without_id(load_job: Callable[[], Awaitable[Job | None]]) -> ServerSentEventMessage:
    """A closing ``done`` with no id: the client's last id stays the one to resume after."""
    job = await load_job()
    return ServerSentEventMessage(
        event=EventType.DONE, data=json.dumps({"status": job.status if job else "unknown"})
    )


async def _finished_without_done(
    store: JobStore, job_id: str, after: int, load_job: Callable[[], Awaitable[Job | None]]
) -> bool:
    job = await load_job()
    if job is None or job.status not in TERMINAL_STATUSES:
        return False
    # The terminal events are written right after the status; give them one more look.
    return not await store.read_events(job_id, after, wait_s=0.5)


def sse_response(messages: AsyncIterator[ServerSentEventMessage]) -> ServerSentEvent:
    return ServerSentEvent(
        messages, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
