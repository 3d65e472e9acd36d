"""The local backend's queue: worker tasks in the web process take queued jobs in turns
across tenants.

The store is the source of truth, so nothing is lost when the process dies: on
start, jobs still queued or running are delivered again and resume from their
checkpoints.

Fair scheduling: each tenant has its own queue of job ids, and a free worker takes the
oldest job of the next tenant in turn (round robin over the tenants with queued jobs),
skipping tenants that already run ``tenant_max_running`` jobs (0: no cap). With
``fair=False`` every job waits in one first-in, first-out queue and the cap does not
apply.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import structlog

from pipeline.delivery import Delivery, Outcome
from pipeline.model import JSON
from pipeline.ports import JobStore, Queue
from pipeline.vocabulary import DEFAULT_TENANT

log = structlog.get_logger("jobq.worker")

FIFO = ""
"""The one queue's key with fair scheduling off."""


class LocalQueue(Queue):
    name = "local"

    def __init__(
        self,
        run: Callable[[str], Awaitable[Delivery]],
        store: JobStore,
        concurrency: int = 4,
        *,
        fair: bool = True,
        tenant_max_running: int = 0,
    ) -> None:
        self._run = run
        self._store = store
        self._concurrency = concurrency
        self._fair = fair
        self._cap = tenant_max_running if fair else 0
        self._queues: dict[str, deque[str]] = {}
        """Queued job ids per tenant; the dict's order is the tenants' turn order (a
        tenant is listed while it has queued jobs)."""
        self._running: Counter[str] = Counter()
        self._changed = asyncio.Event()
        """Set when a job is queued or one ends: waiting workers look again."""
        self._waiting: set[str] = set()
        """Queued job ids: a job enqueued before ``open`` is not delivered twice."""
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False

    async def open(self) -> None:
        if self._workers:
            return
        for job_id in await self._store.unfinished_job_ids():
            if job_id not in self._waiting:
                job = await self._store.get(job_id)
                log.info("job_resumed_on_start", job_id=job_id)
                self._put(job_id, job.tenant if job else DEFAULT_TENANT)
        self._workers = [
            asyncio.create_task(self._work(n), name=f"jobq-worker-{n}")
            for n in range(self._concurrency)
        ]
        log.info(
            "worker_started",
            backend=self.name,
            concurrency=self._concurrency,
            fair=self._fair,
            tenant_max_running=self._cap,
        )

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
            "busy": sum(self._running.values()),
            "queued": len(self._waiting),
            "concurrency": self._concurrency,
        }

    async def _enqueue(self, job_id: str, timeout_s: float, tenant: str) -> None:
        if job_id not in self._waiting:
            self._put(job_id, tenant)

    def _put(self, job_id: str, tenant: str) -> None:
        self._waiting.add(job_id)
        self._queues.setdefault(tenant if self._fair else FIFO, deque()).append(job_id)
        self._changed.set()

    def _pick(self) -> tuple[str, str] | None:
        """The oldest job of the next tenant in turn under the cap, as ``(id, tenant)``;
        that tenant's turn then moves to the end."""
        for tenant, jobs in self._queues.items():
            if self._cap and self._running[tenant] >= self._cap:
                continue
            job_id = jobs.popleft()
            del self._queues[tenant]
            if jobs:
                self._queues[tenant] = jobs
            self._running[tenant] += 1
            self._waiting.discard(job_id)
            return job_id, tenant
        return None

    async def _take(self) -> tuple[str, str]:
        while (picked := self._pick()) is None:
            self._changed.clear()
            await self._changed.wait()
        return picked

    def _done(self, tenant: str) -> None:
        self._running[tenant] -= 1
        if self._running[tenant] <= 0:
            del self._running[tenant]
        if self._cap and self._queues:  # a worker may wait while every queued tenant is at the cap
            self._changed.set()

    async def _work(self, n: int) -> None:
        while True:
            job_id, tenant = await self._take()
            try:
                delivery = await self._run(job_id)
            except Exception:  # not a delivery's crash (deliver returns those): a bug
                log.exception("job_crashed", job_id=job_id, worker=n)
                continue
            finally:
                self._done(tenant)
            if delivery.outcome is Outcome.CRASHED:
                log.error("job_crashed", job_id=job_id, worker=n, exc_info=delivery.error)
