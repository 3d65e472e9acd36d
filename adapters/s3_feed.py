"""Waiting reads of the S3 store's event logs: one poller per job per process (SPEC §7.2).

S3 cannot block a reader until an object appears, so somebody must list. Every
stream of a job in this process shares the job's :class:`JobPoller`: it lists the
job's events every ``FAST_S`` after an event and backs off while the job is idle
(``FAST_S``, doubling to ``SLOW_S``), hands new events to every waiting stream, and
stops ``LINGER_S`` after the last stream stopped waiting. A stream at the head of
the poller's ring waits without any request of its own; one further behind reads
the log itself (LIST from its position, then GETs).

Requests: an idle watched job costs one LIST per ``SLOW_S`` (0.5 per second)
whatever the number of its streams, and a stream costs one LIST when it starts
waiting on a job nobody in this process watches. A job that writes events is listed
every ``FAST_S`` plus one GET per new event. ``S3_POLL_REQUESTS`` in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from adapters.event_watch import EventWatch, ReadNow
from pipeline.model import Event

log = structlog.get_logger("jobq.s3_feed")

FAST_S = 0.25
"""Poll interval right after an event."""
SLOW_S = 2.0
"""Poll interval of a job idle for a while (FAST_S doubling up to this)."""
LINGER_S = 5.0
"""A poller nobody waited on for this long stops."""


class JobPoller:
    """One task listing one job's events for every stream of it in this process."""

    def __init__(self, job_id: str, cursor: int, read_now: ReadNow) -> None:
        self.job_id = job_id
        self.watch = EventWatch(cursor)
        self.watch.armed = True
        self._read_now = read_now
        self.polls = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        delay = FAST_S
        while True:
            await asyncio.sleep(delay)
            self.watch.trim(time.monotonic())
            if self.watch.idle_since(time.monotonic() - LINGER_S):
                self.watch.armed = False
                return
            self.polls += 1
            try:
                events = await self._read_now(self.job_id, self.watch.cursor)
            except Exception as exc:  # S3 trouble: keep polling (slowly); streams keep waiting
                log.warning("s3_poll_failed", job_id=self.job_id, error=repr(exc))
                events = []
            if events:
                self.watch.add(events)
                delay = FAST_S
            else:
                delay = min(delay * 2, SLOW_S)


class S3EventFeed:
    """The process's pollers, one per job being waited on."""

    def __init__(self, read_now: ReadNow) -> None:
        self._read_now = read_now
        self._pollers: dict[str, JobPoller] = {}

    @property
    def polling(self) -> int:
        return len(self._pollers)

    async def read(self, job_id: str, after: int, wait_s: float) -> list[Event]:
        poller = self._pollers.get(job_id)
        if poller is not None and poller.watch.armed:
            poller.watch.used = time.monotonic()
            ring = poller.watch.since(after)
            if ring:
                return ring
            if ring is not None and wait_s > 0:
                return await poller.watch.wait(job_id, after, wait_s, self._read_now)
        events = await self._read_now(job_id, after)
        if events or wait_s <= 0:
            return events
        poller = self._pollers.get(job_id)
        if poller is None or not poller.watch.armed:
            poller = self._pollers[job_id] = JobPoller(job_id, after, self._read_now)
            poller.task = asyncio.create_task(poller.run(), name=f"s3-poll-{job_id}")
            poller.task.add_done_callback(lambda _: self._ended(poller))
        return await poller.watch.wait(job_id, after, wait_s, self._read_now)

    def _ended(self, poller: JobPoller) -> None:
        if self._pollers.get(poller.job_id) is poller:
            del self._pollers[poller.job_id]
        poller.watch.armed = False

    async def aclose(self) -> None:
        for poller in list(self._pollers.values()):
            if poller.task is not None:
                poller.task.cancel()
                with contextlib.suppress(BaseException):
                    await poller.task
