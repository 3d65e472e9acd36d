"""The redis backend's queue: SAQ on Redis. The SAQ job key is the job id.

Crash safety comes from SAQ's sweep: a delivery whose worker stopped sending
heartbeats for ``heartbeat_s`` is aborted and retried by the next sweep of any
live worker. With the defaults (heartbeat 20 s, sweep every 10 s, 5 s abort
wait) a SIGKILLed worker's job is running again within about 35 s.

SAQ's ``retries`` counts deliveries, hand-backs on shutdown included. The
pipeline is the authority on giving up (it fails a job with ``worker_lost`` once
``JOB_MAX_ATTEMPTS`` deliveries were lost, hand-backs not counted), so a sweep
always re-queues, and SAQ's limit, well above that, only ends a job whose
deliveries keep raising (the worker then fails it in the job store too). An
extra delivery of a finished job returns at once.

Knobs read from the environment (the same in web and worker processes, since
the web process enqueues with them): ``SAQ_HEARTBEAT_S`` (20),
``SAQ_SWEEP_ABORT_WAIT_S`` (5), ``SAQ_TIMEOUT_MARGIN_S`` (60), ``JOB_MAX_ATTEMPTS`` (3).

Fair scheduling: tenants take turns for free worker slots (round robin over the
tenants with queued jobs) and ``tenant_max_running`` (``TENANT_MAX_RUNNING``, 0: no cap)
caps the jobs of one tenant running at once across all workers; ``fair=False``
(``FAIR_SCHEDULING=0``) queues jobs first in, first out as upstream SAQ does.

Where this project changes SAQ's own behaviour (fair scheduling, the sweep, shutdown,
guarded writes of a superseded delivery), and why: :mod:`adapters.saq_overrides`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from saq.job import Job as SaqJob

from adapters.constants import KEY_PREFIX, SAQ_QUEUE_NAME
from adapters.redis_clients import RedisClients, bounded
from adapters.saq_overrides import JobqRedisQueue, schedule_for
from pipeline.model import JSON
from pipeline.ports import Queue

__all__ = ["RUN_JOB_FUNCTION", "JobqRedisQueue", "SaqQueue", "queue_name"]

RUN_JOB_FUNCTION = "run_job"
"""The SAQ function name the worker registers (``handlers.saq_worker.run_job``)."""
FINISHED_JOB_TTL_S = 3600
"""How long SAQ keeps a finished delivery's record (the job itself lives in the store)."""


def queue_name(prefix: str) -> str:
    """Deployments sharing a Redis keep apart by key prefix, and so do their queues."""
    return SAQ_QUEUE_NAME if prefix == KEY_PREFIX else f"{SAQ_QUEUE_NAME}-{prefix}"


HANDOFF_ALLOWANCE = 20
"""Deliveries SAQ allows beyond ``JOB_MAX_ATTEMPTS + 3``: hand-backs on shutdown count
there too (its limit applies to a delivery that raised; the worker then fails the job)."""


class SaqQueue(Queue):
    """``Queue`` on SAQ. ``saq`` is the underlying SAQ queue the worker consumes.

    ``clients`` are the process's Redis connections (see :mod:`adapters.redis_clients`),
    shared with the job store: SAQ's commands go over the command pool, a worker
    slot's blocking dequeue over the blocking pool. :meth:`from_url` makes its own."""

    name = "redis"

    def __init__(
        self,
        clients: RedisClients,
        prefix: str = KEY_PREFIX,
        *,
        heartbeat_s: float = 20,
        max_attempts: int = 3,
        timeout_margin_s: float = 60,
        sweep_abort_wait_s: float = 5.0,
        fair: bool = True,
        tenant_max_running: int = 0,
    ) -> None:
        self.clients = clients
        self.url = clients.url
        self.prefix = prefix
        self.heartbeat_s = max(1, int(heartbeat_s))
        self.retries = max_attempts + 3 + HANDOFF_ALLOWANCE
        self.timeout_margin_s = timeout_margin_s
        self.saq = JobqRedisQueue(
            clients.commands,
            name=queue_name(prefix),
            blocking=clients.blocking,
            sweep_abort_wait_s=sweep_abort_wait_s,
            fair=fair,
            tenant_max_running=tenant_max_running,
        )
        self._opened = False

    @classmethod
    def from_url(cls, url: str, prefix: str = KEY_PREFIX, **options: Any) -> SaqQueue:
        """A queue with connections of its own to the Redis at ``url``."""
        return cls(RedisClients.from_url(url), prefix, **options)

    def stopping(self) -> bool:
        return self.saq.should_stop()

    async def open(self) -> None:
        if not self._opened:
            await self.saq.connect()
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            with contextlib.suppress(Exception):
                await self.saq.disconnect()
        await self.clients.aclose()

    async def ping(self) -> None:
        await self.clients.ping("redis queue")

    async def stats(self) -> JSON:
        async with bounded("redis queue"):
            info: Any = await self.saq.info()
        return {
            "workers": len(info["workers"]),
            "queued": int(info["queued"]),
            "active": int(info["active"]),
            "queue": self.saq.name,
        }

    async def _enqueue(self, job_id: str, timeout_s: float, tenant: str) -> None:
        job = SaqJob(
            RUN_JOB_FUNCTION,
            kwargs={"job_id": job_id},
            key=job_id,
            timeout=int(timeout_s + self.timeout_margin_s),
            heartbeat=self.heartbeat_s,
            retries=self.retries,
            ttl=FINISHED_JOB_TTL_S,
        )
        if self.saq.fair:  # else in SAQ's own first-in, first-out list
            schedule_for(job, tenant)
        async with bounded("redis queue"):
            await self.saq.enqueue(job)
