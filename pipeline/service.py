"""``JobService``: what the HTTP handlers, the CLI and the legacy endpoints do with
jobs, independent of the web framework and the backend."""

from __future__ import annotations

import builtins
import time
import uuid
from typing import Any

import structlog

from pipeline.budget import check_priced
from pipeline.deps import Deps
from pipeline.model import Job, StoreUnavailable
from pipeline.ports import Queue
from pipeline.request import RequestInvalid, validate_request
from pipeline.transitions import cancel_queued
from pipeline.views import initial_progress, initial_steps, status_event, status_view
from pipeline.vocabulary import ACTIVE_STATUSES, STATUSES, TERMINAL_STATUSES, EventType, JobStatus

log = structlog.get_logger(__name__)

QUEUE_TIMEOUT_SLACK_S = 60.0
"""A delivery may run a little past the job deadline: time to record the timeout."""


class JobService:
    def __init__(self, deps: Deps, queue: Queue, *, backend: str | None = None) -> None:
        self.deps = deps
        self.store = deps.store
        self.queue = queue
        self.backend = backend or queue.name

    async def submit(
        self, body: object, tenant: str, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Validate and enqueue a job. Returns ``(job, created)``; ``created`` is False
        when ``idempotency_key`` matched an earlier job of ``tenant``. Raises
        :class:`RequestInvalid`, or :class:`StoreUnavailable` with nothing left behind."""
        request = validate_request(body)
        check_priced(self.deps.config, request)
        job = Job(
            id=str(uuid.uuid4()),
            tenant=tenant,
            request=request.to_dict(),
            progress=initial_progress(),
            steps=initial_steps(),
            idempotency_key=idempotency_key,
        )
        job, created = await self.store.create(job, events=[(EventType.STATUS, status_event(job))])
        if not created:
            return job, False
        try:
            await self.queue.enqueue(job.id, request.timeout_ms / 1000 + QUEUE_TIMEOUT_SLACK_S, tenant)
        except StoreUnavailable:
            await self._forget(job.id)
            raise
        log.info("job_submitted", job_id=job.id, tenant=tenant, limit=request.parallel_limit)
        return job, True

    async def _forget(self, job_id: str) -> None:
        try:
            await self.store.delete(job_id)
        except StoreUnavailable:
            log.error("job_orphaned", job_id=job_id)

    async def get(self, job_id: str, tenant: str | None) -> Job | None:
        """The job, or ``None`` when unknown or another tenant's (``tenant=None``: no auth)."""
        job = await self.store.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            return None
        return job

    async def visible(self, job_id: str, tenant: str | None) -> bool:
        """Whether ``get`` would find the job, without loading it."""
        owner = await self.store.tenant_of(job_id)
        return owner is not None and (tenant is None or owner == tenant)

    async def view(self, job_id: str, tenant: str | None) -> dict[str, Any] | None:
        job = await self.get(job_id, tenant)
        if job is None:
            return None
        return status_view(job, await self.store.list_artifacts(job_id))

    async def cancel(self, job_id: str, tenant: str | None) -> Job | None:
        """Idempotent. Queued: cancelled now. Running: the worker stops within
        ``cancel_poll_s`` plus unwinding. Finished: unchanged."""
        job = await self.get(job_id, tenant)
        if job is None or job.status in TERMINAL_STATUSES:
            return job
        await self.store.request_cancel(job_id)
        if job.status == JobStatus.QUEUED:
            cancelled = await cancel_queued(self.store, job)
            if cancelled is not None:
                return cancelled
        log.info("job_cancel_requested", job_id=job_id)
        return await self.store.get(job_id)

    async def list(
        self,
        tenant: str | None,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise RequestInvalid(
                [{"field": "status", "message": f"must be one of {', '.join(STATUSES)}"}]
            )
        jobs, next_cursor = await self.store.list_jobs(tenant, status, limit, cursor)
        return {"jobs": [status_event(job) for job in jobs], "nextCursor": next_cursor}

    async def trace(self, job_id: str, tenant: str | None) -> dict[str, Any] | None:
        if await self.get(job_id, tenant) is None:
            return None
        calls = await self.store.get_trace(job_id)
        costs = [c["cost_usd"] for c in calls if c.get("cost_usd") is not None]
        totals = {
            "calls": len(calls),
            "llm_calls": sum(1 for c in calls if not c.get("cache_hit")),
            "cache_hits": sum(1 for c in calls if c.get("cache_hit")),
            "prompt_tokens": sum(int(c.get("prompt_tokens", 0)) for c in calls),
            "completion_tokens": sum(int(c.get("completion_tokens", 0)) for c in calls),
            "duration_ms": round(sum(float(c.get("duration_ms", 0)) for c in calls), 1),
            "cost_usd": round(sum(costs), 6) if costs else None,
        }
        return {"jobId": job_id, "calls": calls, "totals": totals}

    async def artifacts(
        self, job_id: str, tenant: str | None
    ) -> builtins.list[dict[str, Any]] | None:
        if await self.get(job_id, tenant) is None:
            return None
        return [a.meta() for a in await self.store.list_artifacts(job_id)]

    async def artifact(self, job_id: str, tenant: str | None, name: str) -> dict[str, Any] | None:
        if await self.get(job_id, tenant) is None:
            return None
        found = await self.store.get_artifact(job_id, name)
        if found is None:
            return None
        return {
            "name": found.name,
            "type": found.type,
            "data": found.data,
            "hash": found.hash,
            "timestamp": found.timestamp,
        }

    async def wait_finished(self, job_id: str, timeout_s: float) -> Job:
        """The job once it is finished, or as it is after ``timeout_s``. Follows the
        event log (the store waits for new events), so there is no polling loop."""
        deadline = time.monotonic() + timeout_s
        after = 0
        while True:
            job = await self.store.get(job_id)
            if job is None:
                raise KeyError(job_id)
            remaining = deadline - time.monotonic()
            if job.status in TERMINAL_STATUSES or remaining <= 0:
                return job
            events = await self.store.read_events(job_id, after, wait_s=remaining)
            if events:
                after = events[-1].id
                if any(e.type == EventType.DONE for e in events):
                    final = await self.store.get(job_id)
                    return final if final is not None else job

    async def stats(self) -> dict[str, Any]:
        counts = await self.store.count_by_status()
        queue = await self.queue.stats()
        return {
            "jobs": counts,
            "active": sum(counts.get(s, 0) for s in ACTIVE_STATUSES),
            "running": counts.get(JobStatus.RUNNING, 0),
            "queue": queue,
            "workers": queue.get("workers"),
            "backend": self.backend,
            "provider": self.deps.llm.name,
        }
