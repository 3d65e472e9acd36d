"""How a job ends without a result: ``failed`` or ``cancelled``, its ``status``,
``error`` and ``done`` events written by the same store operation as the change."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import structlog

from pipeline.model import JSON, Job
from pipeline.ports import JobStore
from pipeline.views import status_event
from pipeline.vocabulary import ACTIVE_STATUSES, ErrorCode, EventType, JobStatus, StepState

log = structlog.get_logger(__name__)


def job_error(code: ErrorCode, message: str, step: str | None = None) -> JSON:
    """A job's ``error``: ``{code, message, step}``."""
    return {"code": code, "message": message, "step": step}


async def end_job(
    store: JobStore,
    job: Job,
    status: JobStatus,
    error: JSON,
    expect: Iterable[str],
    **changes: Any,
) -> Job | None:
    """Move ``job`` (as last read or written) to ``failed`` or ``cancelled`` if its
    status is in ``expect``, and publish ``status``, ``error``, ``done`` with the same
    store write. Returns the job as stored (another writer's, if the change lost)."""
    now = time.time()
    ended = replace(job, status=status, error=error, completed_at=now, **changes)
    events = [
        (EventType.STATUS, status_event(ended)),
        (EventType.ERROR, error),
        (EventType.DONE, {"status": status}),
    ]
    stored = await store.update(
        job.id, expect=expect, events=events, status=status, error=error, completed_at=now,
        **changes,
    )
    if stored is None:
        return await store.get(job.id)
    event = "job_cancelled" if status == JobStatus.CANCELLED else "job_failed"
    log.info(event, job_id=job.id, code=error["code"], step=error["step"], message=error["message"])
    return stored


async def fail_active_job(store: JobStore, job: Job, code: ErrorCode, message: str) -> Job | None:
    """Fail ``job`` if it is still queued or running, from outside a run (a lost
    worker, a poison message): steps left running are marked failed."""
    if not job.active:
        return job
    steps = dict(job.steps)
    running = [name for name, state in steps.items() if state == StepState.RUNNING]
    for name in running:
        steps[name] = StepState.FAILED
    error = job_error(code, message, running[0] if running else None)
    return await end_job(store, job, JobStatus.FAILED, error, ACTIVE_STATUSES, steps=steps)


async def cancel_queued(store: JobStore, job: Job) -> Job | None:
    """Cancel ``job`` if it is still queued; ``None`` if it is not any more."""
    error = job_error(ErrorCode.CANCELLED, "cancelled before it started")
    ended = await end_job(store, job, JobStatus.CANCELLED, error, {JobStatus.QUEUED})
    return ended if ended is not None and ended.status == JobStatus.CANCELLED else None
