"""The redis backend's worker: a SAQ worker that runs many jobs at once per process.

``jobq worker`` calls :func:`run_worker`. ``saq handlers.saq_worker.saq_settings``
runs the same worker under SAQ's own CLI (and its web UI with ``--web``).

Shutdown (SIGTERM or SIGINT): the worker stops taking jobs at once, lets running
jobs finish for ``WORKER_GRACE_S`` (default 25 s, below Render's 30 s), then
cancels the rest; SAQ puts each cancelled delivery back on the queue. The job
stays ``running`` in the store and the next delivery resumes from its
checkpoints, so nothing is lost.

Timers from the environment: ``SAQ_SWEEP_S`` (10: how often stuck jobs are
looked for), ``SAQ_WORKER_INFO_S`` (10: how often the worker reports itself alive);
the heartbeat is set per job at enqueue time (``SAQ_HEARTBEAT_S``, see
``adapters.saq_queue``) and sent by :func:`run_job` three times per period.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import Callable
from typing import Any

import structlog
from saq import Worker
from saq.job import Job as SaqJob

from adapters.saq_overrides import JobqWorker
from adapters.saq_queue import RUN_JOB_FUNCTION, JobqRedisQueue, SaqQueue
from handlers.bootstrap import Container, bootstrap
from handlers.settings import Settings
from pipeline.delivery import Outcome
from pipeline.model import StoreUnavailable
from pipeline.vocabulary import JobStatus

log = structlog.get_logger("jobq.worker")

YOUNG_GC_THRESHOLD = 100_000
"""Net allocations (container objects made minus freed) between collections of the
youngest GC generation in a worker. A job's objects are freed by reference counting
when it ends, so above the growth of the in-flight jobs' data this count is rarely
reached: at 20,000 a batch of 200 jobs still paid four collections of ~19 ms each.
Garbage held only by reference cycles may wait for up to this many objects; in the
200-job batch the peak memory per in-flight job rose from 116-120 to 128-138 KiB."""
DEQUEUE_TIMEOUT_S = 1.0
"""A blocked dequeue returns this often, so shutdown does not wait on an idle slot."""


async def _heartbeat(job: SaqJob) -> None:
    """Touch the SAQ job so the sweep knows its worker is alive."""
    if not job.heartbeat:
        return
    interval = max(0.2, job.heartbeat / 3)
    while True:
        await asyncio.sleep(interval)
        try:
            await job.update()
        except Exception as exc:  # Redis may be away for a moment; the next beat retries
            log.warning("heartbeat_failed", job_id=job.key, error=str(exc))


async def run_job(ctx: Any, *, job_id: str) -> None:
    """SAQ function ``run_job``: one delivery of a job (``pipeline.delivery.deliver``).

    A crashed delivery raises for SAQ to retry it; when SAQ will not (its last
    retry), ``deliver`` has failed the job with ``worker_lost`` first."""
    container: Container = ctx["container"]
    delivery: SaqJob = ctx["job"]
    log.info("job_picked_up", job_id=job_id, delivery=delivery.attempts, worker=ctx["worker"].id)
    beat = asyncio.create_task(_heartbeat(delivery), name=f"heartbeat-{job_id}")
    try:
        done = await container.deliver(job_id, last_delivery=not delivery.retryable)
    except asyncio.CancelledError:
        log.warning("job_handed_back", job_id=job_id, delivery=delivery.attempts)
        raise
    finally:
        beat.cancel()
        await asyncio.wait({beat}, timeout=5)
    job = done.job
    if done.error is not None:
        if isinstance(done.error, StoreUnavailable):  # Redis away: the reason is the whole story
            log.warning(
                "job_delivery_crashed", job_id=job_id, delivery=delivery.attempts, error=str(done.error)
            )
        else:
            log.error(
                "job_delivery_crashed", job_id=job_id, delivery=delivery.attempts, exc_info=done.error
            )
        raise done.error
    if done.outcome is Outcome.SUPERSEDED:
        # Another delivery runs the job now: SAQ's record of it is that delivery's.
        if isinstance(delivery.queue, JobqRedisQueue):
            delivery.queue.release(delivery)
        log.info("job_released", job_id=job_id, status=job.status if job else "missing")
    elif job is not None and job.status == JobStatus.FAILED:
        log.info("job_failed", job_id=job_id, status=job.status, error=job.error)
    else:
        log.info("job_finished", job_id=job_id, status=job.status if job else "missing")


def _lifecycle(container: Container, settings: Settings) -> tuple[Any, Any]:
    queue = _saq_queue(container)

    async def startup(ctx: Any) -> None:
        worker: Worker[Any] = ctx["worker"]
        queue.saq.should_stop = worker.event.is_set
        await container.open()
        ctx["container"] = container
        # Everything loaded so far lives as long as the process: keep it out of the
        # cyclic GC, whose full passes over it otherwise stall every job for ~30 ms.
        gc.freeze()
        # A step allocates thousands of short-lived objects, which reference counting
        # frees; collecting the young generation every 700 allocations (the default)
        # cost a few percent of a busy worker's CPU for next to nothing found.
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        log.info(
            "worker_started",
            worker=worker.id,
            queue=queue.saq.name,
            concurrency=worker.concurrency,
            pid=os.getpid(),
            backend=settings.backend,
        )

    async def shutdown(ctx: Any) -> None:
        await container.close()
        log.info("worker_stopped", worker=ctx["worker"].id)

    return startup, shutdown


def _saq_queue(container: Container) -> SaqQueue:
    queue = container.queue
    if not isinstance(queue, SaqQueue):
        raise RuntimeError(f"the SAQ worker needs the redis backend's queue, not {queue.name!r}")
    return queue


def worker_kwargs(settings: Settings, container: Container) -> dict[str, Any]:
    """SAQ ``Worker`` arguments (also SAQ's settings dict) for ``container``, whose queue,
    store and rate limiter share the process's Redis connections (``bootstrap``)."""
    startup, shutdown = _lifecycle(container, settings)
    return {
        "queue": _saq_queue(container).saq,
        "functions": [(RUN_JOB_FUNCTION, run_job)],
        "concurrency": settings.worker_concurrency,
        "startup": startup,
        "shutdown": shutdown,
        "timers": {
            "sweep": int(settings.saq_sweep_s),
            "worker_info": int(settings.saq_worker_info_s),
            "schedule": 1,
            "abort": 1,
        },
        "dequeue_timeout": DEQUEUE_TIMEOUT_S,
        "shutdown_grace_period_s": int(settings.worker_grace_s),
        "metadata": {"pid": os.getpid(), "host": socket.gethostname()},
    }


def saq_settings() -> dict[str, Any]:
    """For ``saq handlers.saq_worker.saq_settings``: settings from the environment."""
    settings = Settings.from_env()
    return worker_kwargs(settings, bootstrap(settings))


async def serve_worker(settings: Settings) -> None:
    container = bootstrap(settings)
    queue = _saq_queue(container)
    worker = JobqWorker(**worker_kwargs(settings, container))
    try:
        await queue.open()
        await worker.start()
    finally:
        await queue.close()


def run_worker(settings: Settings) -> None:
    """``jobq worker`` on the redis backend: run until SIGTERM/SIGINT.

    On uvloop when it is installed (it is a dependency; ``JOBQ_UVLOOP=0`` opts out):
    a worker spends much of its CPU in the event loop and socket I/O to Redis."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_worker(settings))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("JOBQ_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
