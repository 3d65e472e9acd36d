"""The local backend's queue: an asyncio queue drained by worker tasks in the web process.

The store is the source of truth, so nothing is lost when the process dies: on
start, jobs still queued or running are delivered again and resume from their
checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from pipeline.delivery import Delivery, Outcome
from pipeline.model import JSON
from pipeline.ports import JobStore, Queue

log = structlog.get_logger("jobq.worker")


class LocalQueue(Queue):
    name = "local"

    def __init__(
        self,
        run: Callable[[str], Awaitable[Delivery]],
        store: JobStore,
        concurrency: int = 4,
    ) -> None:
        self._run = run
        self._store = store
        self._concurrency = concurrency
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._waiting: set[str] = set()
        """Job ids in ``_pending``: a job enqueued before ``open`` is not delivered twice."""
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        self._closing = False

    async def open(self) -> None:
        if self._workers:
            return
        for job_id in await self._store.unfinished_job_ids():
            if job_id not in self._waiting:
                log.info("job_resumed_on_start", job_id=job_id)
                self._put(job_id)
        self._workers = [
            asyncio.create_task(self._work(n), name=f"jobq-worker-{n}")
            for n in range(self._concurrency)
        ]
        log.info("worker_started", backend=self.name, concurrency=self._concurrency)

    async def close(self) -> None:
        """Stop the workers. Running jobs stay ``running`` in the store and resume on
        the next start."""
        self._closing = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []

    def stopping(self) -> bool:
        return self._closing

    async def ping(self) -> None:
        return None

    async def stats(self) -> JSON:
        return {
            "workers": len(self._workers),
            "busy": self._busy,
            "queued": self._pending.qsize(),
            "concurrency": self._concurrency,
        }

    async def _enqueue(self, job_id: str, timeout_s: float) -> None:
        if job_id not in self._waiting:
            self._put(job_id)

    def _put(self, job_id: str) -> None:
        self._waiting.add(job_id)
        self._pending.put_nowait(job_id)

    async def _work(self, n: int) -> None:
        while True:
            job_id = await self._pending.get()
            self._waiting.discard(job_id)
            self._busy += 1
            try:
                delivery = await self._run(job_id)
            except Exception:  # not a delivery's crash (deliver returns those): a bug
                log.exception("job_crashed", job_id=job_id, worker=n)
                continue
            finally:
                self._busy -= 1
            if delivery.outcome is Outcome.CRASHED:
                log.error("job_crashed", job_id=job_id, worker=n, exc_info=delivery.error)
                self._pending.task_done()
