"""One poller of cancel flags per store and event loop, for every job the process runs."""

from __future__ import annotations

import asyncio
import time
import weakref

import structlog

from pipeline.ports import JobStore

log = structlog.get_logger(__name__)

FULL_READ_S = 5.0
"""Longest time between two reads of every watched job's flag, whatever the store's
cancel mark says: a flag raised by a writer that does not move the mark (an older web
process during a rolling deploy) is seen within this."""


class CancelWatch:
    """One poller of cancel flags per store and event loop, for every job this process
    runs: one ``cancel_requested_many`` round trip per period instead of one per job.
    ``add`` returns a future that is resolved when the job's flag is seen.

    Where the store keeps a cancel mark (:meth:`JobStore.cancel_mark`), a period reads
    the mark, and the flags only of the jobs added since the last read, unless the mark
    moved: a worker running thousands of jobs then reads thousands of flags only when
    someone cancels, not several times a second."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.jobs: dict[str, asyncio.Future[None]] = {}
        self.unread: set[str] = set()
        """Jobs added since the last read of their flags."""
        self.interval_s = float("inf")
        """The shortest poll interval asked for since the poller started."""
        self.task: asyncio.Task[None] | None = None
        self.sleeping = False

    def add(self, job_id: str, interval_s: float) -> asyncio.Future[None]:
        flagged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.jobs[job_id] = flagged
        self.unread.add(job_id)
        self.interval_s = min(self.interval_s, interval_s)
        if self.task is None:
            self.task = asyncio.create_task(self._poll(), name="jobq:cancel-watch")
        return flagged

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.unread.discard(job_id)
        if not self.jobs:
            self.interval_s = float("inf")
            if self.task is not None and self.sleeping:
                self.task.cancel()  # idle: no reason to outlive the last job
                self.task = None  # a job added before it ends starts a new poller

    async def _poll(self) -> None:
        seen: str | None = None
        """The mark at the last read of every flag (None: read them all next time)."""
        read_all_at = 0.0
        try:
            while self.jobs:
                try:
                    mark = await self.store.cancel_mark()
                    unread, self.unread = self.unread, set()
                    if mark is None or mark != seen or time.monotonic() >= read_all_at:
                        job_ids = list(self.jobs)
                        read_all_at = time.monotonic() + FULL_READ_S
                    else:
                        job_ids = [job_id for job_id in unread if job_id in self.jobs]
                    flagged = await self.store.cancel_requested_many(job_ids)
                    seen = mark
                except Exception as exc:  # a store hiccup: read every flag next period
                    log.warning("cancel_poll_failed", error=str(exc), jobs=len(self.jobs))
                    flagged, seen = set(), None
                for job_id in flagged:
                    future = self.jobs.get(job_id)
                    if future is not None and not future.done():
                        future.set_result(None)
                if not self.jobs:
                    break
                self.sleeping = True
                try:
                    await asyncio.sleep(self.interval_s)
                finally:
                    self.sleeping = False
        finally:
            if self.task is asyncio.current_task():
                self.task = None


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[JobStore, CancelWatch]] = (
    weakref.WeakKeyDictionary()
)


def cancel_watch(store: JobStore) -> CancelWatch:
    watches = _watches.setdefault(asyncio.get_running_loop(), {})
    watch = watches.get(store)
    if watch is None:
        watch = watches[store] = CancelWatch(store)
    return watch
