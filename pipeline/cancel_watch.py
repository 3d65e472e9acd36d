"""One poller of cancel flags per store and event loop, for every job the process runs."""

from __future__ import annotations

import asyncio
import weakref

import structlog

from pipeline.ports import JobStore

log = structlog.get_logger(__name__)


class CancelWatch:
    """One poller of cancel flags per store and event loop, for every job this process
    runs: one ``cancel_requested_many`` round trip per period instead of one per job.
    ``add`` returns a future that is resolved when the job's flag is seen."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.jobs: dict[str, tuple[asyncio.Future[None], float]] = {}
        self.task: asyncio.Task[None] | None = None
        self.sleeping = False

    def add(self, job_id: str, interval_s: float) -> asyncio.Future[None]:
        flagged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.jobs[job_id] = (flagged, interval_s)
        if self.task is None:
            self.task = asyncio.create_task(self._poll(), name="jobq:cancel-watch")
        return flagged

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        if not self.jobs and self.task is not None and self.sleeping:
            self.task.cancel()  # idle: no reason to outlive the last job

    async def _poll(self) -> None:
        try:
            while self.jobs:
                try:
                    flagged = await self.store.cancel_requested_many(list(self.jobs))
                except Exception as exc:  # a store hiccup: poll again next period
                    log.warning("cancel_poll_failed", error=str(exc), jobs=len(self.jobs))
                    flagged = set()
                for job_id in flagged:
                    entry = self.jobs.get(job_id)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(None)
                if not self.jobs:
                    break
                self.sleeping = True
                try:
                    await asyncio.sleep(min(interval for _, interval in self.jobs.values()))
                finally:
                    self.sleeping = False
        finally:
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
