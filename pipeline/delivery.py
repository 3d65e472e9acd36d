"""``deliver``: the one entry every worker calls for one delivery of a job.

The in-process queue, the SAQ worker, the Lambda on SQS and the SQS dev poller all
call :func:`deliver` and act on its :class:`Outcome`; the rules they share are
written here once:

- A job lost ``job_max_attempts`` times (deliveries that neither ended it nor
  handed it back on shutdown) fails with ``worker_lost`` on its next delivery, and
  so does a job whose last delivery (``last_delivery``, as the queue counts them)
  crashed.
- ``deadline_cap`` ends the run by then (a Lambda invocation's time limit): the
  job fails with ``timeout`` and a message that says why; a run that outlives the
  cap by ``CAP_GRACE_S`` anyway is failed the same way from here.
- An interrupted delivery (the worker stops: the awaiting task is cancelled)
  re-raises ``CancelledError`` for the queue to deliver again, after storing what
  it can: a hand-back when the process is stopping, a loss otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from enum import StrEnum

import structlog

from pipeline.deps import Deps
from pipeline.job_run import JobRun
from pipeline.model import Job
from pipeline.request import RequestInvalid
from pipeline.scheduler import SLIDING_WINDOW, Scheduler
from pipeline.transitions import end_job, fail_active_job, job_error
from pipeline.vocabulary import ACTIVE_STATUSES, ErrorCode, JobStatus, StepState

log = structlog.get_logger(__name__)

CAP_GRACE_S = 2.5
"""How long past ``deadline_cap`` a run may take to end itself before it is cut off."""


class Outcome(StrEnum):
    COMPLETED = "completed"
    """The job completed (in this delivery or before)."""
    FAILED = "failed"
    """The job ended failed or cancelled (in this delivery or before)."""
    SUPERSEDED = "superseded"
    """Another delivery runs the job now: this one wrote nothing more once it knew."""
    LOST = "lost"
    """This delivery failed the job with ``worker_lost`` (its worker kept dying)."""
    CRASHED = "crashed"
    """The delivery raised (``Delivery.error``; the store may be away): deliver again."""
    UNKNOWN = "unknown"
    """No such job (deleted, or expired)."""


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    job: Job | None
    """The job as this delivery left it (as last read after a crash)."""
    error: BaseException | None = None
    """Why the delivery crashed (with any outcome: a job may have ended all the same)."""


async def deliver(
    job_id: str,
    deps: Deps,
    *,
    last_delivery: bool = False,
    deadline_cap: float | None = None,
    scheduler: Scheduler = SLIDING_WINDOW,
) -> Delivery:
    """Run one delivery of ``job_id`` and say how it ended (see the module's rules)."""
    async with _exclusive(job_id):
        try:
            if deadline_cap is None:
                job = await _run(job_id, deps, deadline_cap, scheduler)
            else:
                job = await _run_capped(job_id, deps, deadline_cap, scheduler)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await _crashed(job_id, deps, exc, last_delivery)
    if job is None:
        return Delivery(Outcome.UNKNOWN, None)
    if job.status == JobStatus.COMPLETED:
        return Delivery(Outcome.COMPLETED, job)
    if job.active:
        return Delivery(Outcome.SUPERSEDED, job)
    lost = job.error is not None and job.error.get("code") == ErrorCode.WORKER_LOST
    return Delivery(Outcome.LOST if lost else Outcome.FAILED, job)


async def run_job(job_id: str, deps: Deps, *, scheduler: Scheduler = SLIDING_WINDOW) -> Job | None:
    """:func:`deliver` for callers that want the job: the job as left (``None`` if
    unknown); a crashed delivery raises its error."""
    delivery = await deliver(job_id, deps, scheduler=scheduler)
    if delivery.outcome is Outcome.CRASHED and delivery.error is not None:
        raise delivery.error
    return delivery.job


async def _run_capped(
    job_id: str, deps: Deps, deadline_cap: float, scheduler: Scheduler
) -> Job | None:
    guard = asyncio.timeout(max(0.0, deadline_cap - time.time()) + CAP_GRACE_S)
    try:
        async with guard:
            return await _run(job_id, deps, deadline_cap, scheduler)
    except TimeoutError:
        if not guard.expired():
            raise
    # Safety net only: the capped deadline normally ends the job first.
    job = await deps.store.get(job_id)
    message = "the run outlived its invocation's time limit"
    return None if job is None else await fail_active_job(deps.store, job, ErrorCode.TIMEOUT, message)


async def _crashed(job_id: str, deps: Deps, exc: Exception, last_delivery: bool) -> Delivery:
    job: Job | None = None
    with contextlib.suppress(Exception):
        job = await deps.store.get(job_id)
    if job is not None and not job.active:  # it ended all the same
        ended_as = Outcome.COMPLETED if job.status == JobStatus.COMPLETED else Outcome.FAILED
        return Delivery(ended_as, job, exc)
    if last_delivery and job is not None:
        message = f"its deliveries kept failing; the last: {exc!r}"
        with contextlib.suppress(Exception):
            ended = await fail_active_job(deps.store, job, ErrorCode.WORKER_LOST, message)
            if ended is not None and not ended.active:
                return Delivery(Outcome.LOST, ended, exc)
    return Delivery(Outcome.CRASHED, job, exc)


async def _run(
    job_id: str, deps: Deps, deadline_cap: float | None, scheduler: Scheduler
) -> Job | None:
    store = deps.store
    # One round trip: the checkpoints are read along, as a job to run is the rule.
    job, cancel_requested, checkpoints = await asyncio.gather(
        store.get(job_id), store.cancel_requested(job_id), store.list_artifacts(job_id)
    )
    if job is None:
        log.warning("job_unknown", job_id=job_id)
        return None
    if not job.active:
        return job
    if cancel_requested:
        error = job_error(ErrorCode.CANCELLED, "cancelled before it started")
        return await end_job(store, job, JobStatus.CANCELLED, error, ACTIVE_STATUSES)
    attempts = job.attempts + 1
    lost = job.attempts - job.handoffs
    if lost >= deps.config.job_max_attempts:
        running = [n for n, s in job.steps.items() if s == StepState.RUNNING]
        message = f"the worker was lost {lost} times; giving up"
        error = job_error(ErrorCode.WORKER_LOST, message, running[0] if running else None)
        return await end_job(store, job, JobStatus.FAILED, error, ACTIVE_STATUSES, attempts=attempts)
    started = job.started_at if job.started_at is not None else time.time()
    # The run writes this (status running, attempts, started_at) with its first commit.
    job = replace(job, status=JobStatus.RUNNING, attempts=attempts, started_at=started)
    try:
        run = JobRun(job, deps, scheduler=scheduler, deadline_cap=deadline_cap)
    except RequestInvalid as exc:
        error = job_error(ErrorCode.INVALID_REQUEST, f"stored request no longer valid: {exc}")
        return await end_job(
            store, job, JobStatus.FAILED, error, ACTIVE_STATUSES, attempts=attempts, started_at=started
        )
    return await run.execute(checkpoints)


class _DeliveryGate:
    """One delivery of a job at a time per process (and event loop). A duplicate
    delivery, e.g. a redelivery while the first run is still alive here, waits and
    then finds the job finished or resumes it; it never runs the steps twice."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _DeliveryGate]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _exclusive(job_id: str) -> AsyncIterator[None]:
    gates = _gates.setdefault(asyncio.get_running_loop(), {})
    gate = gates.setdefault(job_id, _DeliveryGate())
    gate.users += 1
    try:
        if gate.lock.locked():
            log.info("job_delivery_waits", job_id=job_id)
        async with gate.lock:
            yield
    finally:
        gate.users -= 1
        if gate.users == 0:
            gates.pop(job_id, None)
