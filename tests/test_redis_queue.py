"""SaqQueue on a real Redis with a real SAQ worker: keys, stats, shutdown hand-back, sweep."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from saq import Worker
from saq.job import Job as SaqJob
from saq.job import Status
from saq.utils import now

from adapters import saq_overrides
from adapters.redis_store import RedisStore
from adapters.saq_overrides import JobqWorker
from adapters.saq_queue import RUN_JOB_FUNCTION, SaqQueue
from handlers.saq_worker import run_job
from pipeline.delivery import Delivery, Outcome, deliver
from pipeline.deps import Deps
from pipeline.model import Job, StoreUnavailable
from pipeline.offline import OfflineProvider
from pipeline.request import validate_request
from pipeline.vocabulary import JobStatus
from tests.support.redis_server import free_port, redis_url, unique_prefix


@pytest.fixture
async def queue() -> AsyncIterator[SaqQueue]:
    made = SaqQueue.from_url(redis_url(), prefix=unique_prefix(), heartbeat_s=7, max_attempts=3)
    made.saq.settle_s = 0.3
    await made.open()
    yield made
    await made.close()


async def test_enqueue_keys_the_saq_job_by_job_id_with_crash_settings(queue: SaqQueue) -> None:
    """The SAQ job key is the job id; timeout covers the job's, heartbeat and retries are set."""
    job_id = uuid.uuid4().hex
    await queue.enqueue(job_id, timeout_s=300)
    await queue.enqueue(job_id, timeout_s=300)
    job = await queue.saq.job(job_id)
    assert job is not None
    assert (job.key, job.function, job.kwargs) == (job_id, RUN_JOB_FUNCTION, {"job_id": job_id})
    assert job.timeout >= 300 and job.heartbeat == 7 and job.retries >= 3 + 1
    stats = await queue.stats()
    assert stats["queued"] == 1 and stats["workers"] == 0


async def test_a_real_worker_runs_jobs_and_counts_as_live(queue: SaqQueue) -> None:
    """A SAQ worker on the queue receives each job id once and shows up in stats while alive."""
    seen: list[str] = []

    async def run_job(ctx: Any, *, job_id: str) -> None:
        seen.append(job_id)

    worker: Worker[Any] = Worker(
        queue.saq,
        functions=[(RUN_JOB_FUNCTION, run_job)],
        concurrency=4,
        dequeue_timeout=0.2,
        timers={"worker_info": 1},  # type: ignore[arg-type]  # SAQ's TypedDict wants every timer
    )
    task = asyncio.create_task(worker.start())
    ids = [uuid.uuid4().hex for _ in range(5)]
    for job_id in ids:
        await queue.enqueue(job_id, timeout_s=30)
    async with asyncio.timeout(20):
        while True:
            if len(seen) == len(ids) and (await queue.stats())["workers"] == 1:
                break
            await asyncio.sleep(0.05)
    await worker.stop()
    task.cancel()
    assert sorted(seen) == sorted(ids)


async def test_a_stopping_worker_puts_a_just_received_job_back_at_the_head(queue: SaqQueue) -> None:
    """A job a blocked dequeue receives after shutdown began goes back untouched, first in line."""
    calls = {"n": 0}

    def stopping() -> bool:
        calls["n"] += 1
        return calls["n"] > 1  # not yet when the dequeue starts, yes once it returns

    queue.saq.should_stop = stopping
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    await queue.enqueue(first, timeout_s=30)
    await queue.enqueue(second, timeout_s=30)
    assert await queue.saq.dequeue(timeout=1) is None
    assert await queue.saq.count("active") == 0
    assert await queue.saq.count("queued") == 2
    stored = await queue.saq.job(first)
    assert stored is not None and stored.status == Status.QUEUED and stored.attempts == 0
    # first in line: the next dequeue (jobs now wait in their tenant's queue, so the head
    # of SAQ's own queued list is no longer where to look)
    queue.saq.should_stop = lambda: False
    head = await queue.saq.dequeue(timeout=1)
    assert head is not None and head.key == first


async def test_sweep_leaves_a_job_that_is_just_being_started(queue: SaqQueue) -> None:
    """A job moved to the active list but marked active only a moment later is not re-queued."""
    job_id = uuid.uuid4().hex
    await queue.enqueue(job_id, timeout_s=30)
    job = await queue.saq.dequeue(timeout=1)
    assert job is not None

    async def mark_active_soon() -> None:
        await asyncio.sleep(0.1)
        job.started, job.attempts = now(), 1  # what the SAQ worker does after dequeue
        await job.update(status=Status.ACTIVE)

    swept, _ = await asyncio.gather(queue.saq.sweep(lock=1), mark_active_soon())
    assert swept == []
    assert await queue.saq.count("queued") == 0 and await queue.saq.count("active") == 1


async def test_a_live_worker_stops_the_one_running_job_that_is_aborted(queue: SaqQueue) -> None:
    """A job aborted while a live worker runs it (a sweep's abort) is cancelled within
    the abort timer's seconds; the worker's other jobs keep running."""
    running: dict[str, asyncio.Event] = {}
    cancelled: list[str] = []
    one_cancelled = asyncio.Event()

    async def run_job(ctx: Any, *, job_id: str) -> None:
        running[job_id].set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(job_id)
            one_cancelled.set()
            raise

    worker = JobqWorker(
        queue.saq,
        functions=[(RUN_JOB_FUNCTION, run_job)],
        concurrency=4,
        dequeue_timeout=0.2,
        timers={"abort": 1, "sweep": 600},  # type: ignore[arg-type]  # SAQ's TypedDict wants every timer
    )
    ids = [uuid.uuid4().hex for _ in range(3)]
    running.update((job_id, asyncio.Event()) for job_id in ids)
    task = asyncio.create_task(worker.start())
    try:
        for job_id in ids:
            await queue.enqueue(job_id, timeout_s=120)
        async with asyncio.timeout(20):
            await asyncio.gather(*(event.wait() for event in running.values()))
        job = await queue.saq.job(ids[1])
        assert job is not None
        await queue.saq.abort(job, error="stuck")
        async with asyncio.timeout(10):
            await one_cancelled.wait()
        await asyncio.sleep(1.5)  # another abort pass: the others are left alone
        assert cancelled == [ids[1]]
    finally:
        await worker.stop()
        task.cancel()


async def silent_deliveries(queue: SaqQueue, count: int) -> list[SaqJob]:
    """``count`` jobs, each taken by a delivery that beats once and then falls silent
    for a heartbeat period (its worker died)."""
    jobs = []
    for _ in range(count):
        await queue.enqueue(uuid.uuid4().hex, timeout_s=30)
        job = await queue.saq.dequeue(timeout=1)
        assert job is not None
        job.started, job.attempts = now(), 1
        await job.update(status=Status.ACTIVE, heartbeat=1)
        jobs.append(job)
    await asyncio.sleep(1.2)  # one heartbeat period without a beat
    return jobs


async def delivered_then_swept(queue: SaqQueue) -> tuple[str, SaqJob, list[str]]:
    """A silent delivery and what the next sweep re-queued: (job id, that delivery,
    swept ids)."""
    queue.saq.sweep_abort_wait_s = 0.2
    (job,) = await silent_deliveries(queue, 1)
    return job.key, job, await queue.saq.sweep(lock=1)


async def test_sweep_requeues_a_job_whose_heartbeat_stopped(queue: SaqQueue) -> None:
    """An active job whose worker stopped beating is re-queued for another delivery."""
    job_id, _, swept = await delivered_then_swept(queue)
    assert swept == [queue.saq.job_id(job_id)]
    again = await queue.saq.job(job_id)
    assert again is not None and again.status == Status.QUEUED and again.attempts == 1
    assert await queue.saq.count("queued") == 1


async def test_a_dead_worker_s_jobs_are_requeued_together(
    queue: SaqQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sweep re-queues every job of a dead worker within about one abort wait, not one
    abort wait per job (50 jobs took minutes to come back), the active list read in
    slices over several loop turns."""
    monkeypatch.setattr(saq_overrides, "SWEEP_SLICE", 3)
    queue.saq.sweep_abort_wait_s = 1.0
    jobs = await silent_deliveries(queue, 4)
    async with asyncio.timeout(3.0):  # one after another: 4 s and more
        swept = await queue.saq.sweep(lock=1)
    assert sorted(swept) == sorted(job.id for job in jobs)
    assert await queue.saq.count("queued") == 4 and await queue.saq.count("active") == 0


async def one_delivery(queue: SaqQueue, container: object) -> None:
    """Run the worker's real ``run_job`` under a real SAQ worker whose container is
    ``container``, until SAQ has processed one delivery (its finish or retry included)."""
    processed = asyncio.Event()

    async def startup(ctx: Any) -> None:
        ctx["container"] = container

    async def after_process(ctx: Any) -> None:
        processed.set()

    worker: Worker[Any] = Worker(
        queue.saq,
        functions=[(RUN_JOB_FUNCTION, run_job)],
        concurrency=1,
        dequeue_timeout=0.2,
        startup=startup,
        after_process=after_process,
    )
    task = asyncio.create_task(worker.start())
    try:
        async with asyncio.timeout(20):
            await processed.wait()
    finally:
        await worker.stop()
        task.cancel()


async def test_a_delivery_that_lost_its_job_leaves_saq_s_record_alone(queue: SaqQueue) -> None:
    """A delivery that finds the job run by another delivery (the job store refused it)
    returns without marking the job complete in SAQ: it stays active for the other, so
    the sweep still recovers it if that one dies."""
    job_id = uuid.uuid4().hex
    await queue.enqueue(job_id, timeout_s=30)

    class HeldElsewhere:
        async def deliver(self, job_id: str, **_: Any) -> Delivery:
            job = Job(id=job_id, tenant="t", request={}, status=JobStatus.RUNNING, attempts=1)
            return Delivery(Outcome.SUPERSEDED, job)

    await one_delivery(queue, HeldElsewhere())
    stored = await queue.saq.job(job_id)
    assert stored is not None and stored.status == Status.ACTIVE
    assert await queue.saq.count("active") == 1


async def test_a_sweep_cut_off_mid_way_leaves_its_jobs_for_the_next(queue: SaqQueue) -> None:
    """A sweep cancelled while it waits on its aborts (a deploy's SIGTERM) leaves the jobs
    in the active list, and the next sweep re-queues them: none is left in no list."""
    queue.saq.sweep_abort_wait_s = 5.0
    jobs = await silent_deliveries(queue, 3)
    first = asyncio.create_task(queue.saq.sweep(lock=1))
    await asyncio.sleep(0.5)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert await queue.saq.count("active") == 3
    queue.saq.sweep_abort_wait_s = 0.2
    await asyncio.sleep(1.1)  # the cut-off sweep's lock runs out
    assert sorted(await queue.saq.sweep(lock=1)) == sorted(job.id for job in jobs)
    assert await queue.saq.count("queued") == 3 and await queue.saq.count("active") == 0


async def test_a_lone_worker_sweeps_again_one_sweep_period_later(queue: SaqQueue) -> None:
    """Once a sweep ends its lock is back to the sweep period: the same worker's next
    sweep runs and re-queues a job whose worker fell silent in between."""
    queue.saq.sweep_abort_wait_s = 0.2
    assert await queue.saq.sweep(lock=1) == []
    (job,) = await silent_deliveries(queue, 1)  # 1.2 s: past the 1 s sweep period
    assert await queue.saq.sweep(lock=1) == [job.id]


async def test_a_superseded_delivery_leaves_the_new_one_alone(queue: SaqQueue) -> None:
    """After a sweep handed the job to a new delivery, the old one's beat, finish and retry
    change neither the new delivery's record nor its place in the active list."""
    job_id, old, swept = await delivered_then_swept(queue)
    assert swept == [queue.saq.job_id(job_id)]
    new = await queue.saq.dequeue(timeout=1)
    assert new is not None
    new.started, new.attempts = now(), new.attempts + 1
    await new.update(status=Status.ACTIVE)

    await old.update()
    await old.finish(Status.COMPLETE)
    await old.retry("cancelled")

    stored = await queue.saq.job(job_id)
    assert stored is not None and stored.status == Status.ACTIVE and stored.attempts == 2
    assert await queue.saq.count("active") == 1 and await queue.saq.count("queued") == 0
    await new.finish(Status.COMPLETE)
    done = await queue.saq.job(job_id)
    assert done is not None and done.status == Status.COMPLETE
    assert await queue.saq.count("active") == 0


async def test_a_delivery_s_own_finish_is_published(queue: SaqQueue) -> None:
    """A delivery that finishes its own job (failed here) publishes the new status, which
    SAQ's listeners wait for, instead of taking itself for a superseded one."""
    job_id = uuid.uuid4().hex
    await queue.enqueue(job_id, timeout_s=30)
    job = await queue.saq.dequeue(timeout=1)
    assert job is not None
    job.started, job.attempts = now(), 1
    await job.update(status=Status.ACTIVE)
    async with queue.saq.redis.pubsub() as pubsub:
        await pubsub.subscribe(job.id)
        await job.finish(Status.FAILED, error="boom")
        async with asyncio.timeout(10):
            while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)) is None:
                pass
    assert message["data"] == b"failed"
    stored = await queue.saq.job(job_id)
    assert stored is not None and stored.status == Status.FAILED
    assert await queue.saq.count("active") == 0


async def test_a_job_whose_deliveries_keep_raising_ends_failed_in_the_store(queue: SaqQueue) -> None:
    """When SAQ gives up on a job whose deliveries keep raising, the worker fails the job
    in the job store too (worker_lost), so it does not stay queued or running for good."""
    store = RedisStore.from_url(redis_url(), prefix=queue.prefix)
    request = validate_request({"project_title": "Acme", "elevator_pitch": "Robots."}).to_dict()
    job, _ = await store.create(Job(id=uuid.uuid4().hex, tenant="t", request=request))
    await queue.saq.enqueue(RUN_JOB_FUNCTION, key=job.id, job_id=job.id, retries=1, timeout=30)

    class StoreAway(OfflineProvider):
        async def complete(self, request: Any, on_text: Any = None) -> Any:
            raise StoreUnavailable("the store went away mid-run")

    class Crashing:
        deps = Deps(store, StoreAway())

        async def deliver(self, job_id: str, *, last_delivery: bool = False, **_: Any) -> Delivery:
            return await deliver(job_id, self.deps, last_delivery=last_delivery)

    try:
        await one_delivery(queue, Crashing())
        ended = await store.get(job.id)
    finally:
        await store.close()
    assert ended is not None and ended.status == JobStatus.FAILED, ended
    assert ended.error is not None and ended.error["code"] == "worker_lost"


async def test_unreachable_redis_is_store_unavailable() -> None:
    """With nothing on the port, ping, stats and enqueue raise StoreUnavailable (HTTP 503)."""
    queue = SaqQueue.from_url(f"redis://127.0.0.1:{free_port()}", prefix=unique_prefix())
    await queue.open()
    async with asyncio.timeout(1.0):
        with pytest.raises(StoreUnavailable):
            await queue.ping()
    with pytest.raises(StoreUnavailable):
        await queue.stats()
    with pytest.raises(StoreUnavailable):
        await queue.enqueue("x", timeout_s=10)
    await queue.close()
