"""Fair scheduling in SaqQueue on a real Redis: turns across tenants, the running cap,
and the per-tenant counts through finish, retry (the sweep's path), hand-back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from saq.job import Job as SaqJob
from saq.job import Status

from adapters.saq_queue import RUN_JOB_FUNCTION, SaqQueue
from tests.support.redis_server import redis_url, unique_prefix


async def _queue(**options: object) -> SaqQueue:
    made = SaqQueue.from_url(redis_url(), prefix=unique_prefix(), heartbeat_s=7, max_attempts=3, **options)  # type: ignore[arg-type]
    await made.open()
    return made


@pytest.fixture
async def queue() -> AsyncIterator[SaqQueue]:
    made = await _queue()
    yield made
    await made.close()


@pytest.fixture
async def capped() -> AsyncIterator[SaqQueue]:
    made = await _queue(tenant_max_running=1)
    yield made
    await made.close()


async def _submit(queue: SaqQueue, tenant: str, count: int = 1) -> list[str]:
    ids = [f"{tenant}-{n}-{uuid.uuid4().hex[:6]}" for n in range(count)]
    for job_id in ids:
        await queue.enqueue(job_id, timeout_s=30, tenant=tenant)
    return ids


async def _take(queue: SaqQueue) -> SaqJob | None:
    return await queue.saq.dequeue(timeout=0.2)


async def _running(queue: SaqQueue) -> dict[str, int]:
    raw = await queue.saq.redis.hgetall(queue.saq.namespace("fair:running"))
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_tenants_take_turns_whatever_their_backlog(queue: SaqQueue) -> None:
    """Tenant B's one job is picked right after the job of A in turn, ahead of A's backlog."""
    a_jobs = await _submit(queue, "a", 5)
    b_jobs = await _submit(queue, "b", 1)
    order = [job.key for job in [await _take(queue) for _ in range(6)] if job is not None]
    assert order == [a_jobs[0], b_jobs[0], *a_jobs[1:]]
    assert await _take(queue) is None
    assert await _running(queue) == {"a": 5, "b": 1}
    assert await queue.saq.count("queued") == 0 and await queue.saq.count("active") == 6


async def test_fair_scheduling_off_is_first_in_first_out() -> None:
    """With fair scheduling off, jobs come out in submit order, whatever the tenant."""
    queue = await _queue(fair=False)
    try:
        a_jobs = await _submit(queue, "a", 3)
        b_jobs = await _submit(queue, "b", 1)
        order = [job.key for job in [await _take(queue) for _ in range(4)] if job is not None]
        assert order == [*a_jobs, *b_jobs]
    finally:
        await queue.close()


async def test_a_tenant_at_its_cap_waits_while_others_run(capped: SaqQueue) -> None:
    """With TENANT_MAX_RUNNING=1 a second job of a running tenant waits; another tenant's runs."""
    a_jobs = await _submit(capped, "a", 2)
    b_jobs = await _submit(capped, "b", 1)
    first, second = await _take(capped), await _take(capped)
    assert first is not None and second is not None
    assert (first.key, second.key) == (a_jobs[0], b_jobs[0])
    assert await _take(capped) is None  # a's second job: a is at its cap
    assert await capped.saq.count("queued") == 1
    await first.finish(Status.COMPLETE)
    third = await _take(capped)  # the finish freed a's slot (and woke a slot for it)
    assert third is not None and third.key == a_jobs[1]
    assert await _running(capped) == {"a": 1, "b": 1}


async def test_a_retried_job_is_uncounted_and_queued_again_for_its_tenant(capped: SaqQueue) -> None:
    """A retry (how the sweep re-queues a dead worker's job) frees the tenant's slot and the
    job runs again, once."""
    (a_job,) = await _submit(capped, "a", 1)
    taken = await _take(capped)
    assert taken is not None
    await taken.retry("swept")
    assert await _running(capped) == {}
    again = await _take(capped)
    assert again is not None and again.key == a_job
    assert await _take(capped) is None
    assert await capped.saq.count("active") == 1 and await capped.saq.count("queued") == 0


async def test_a_stopping_worker_hands_a_picked_job_back_uncounted(capped: SaqQueue) -> None:
    """A job a stopping worker picked goes back first in its tenant's line, uncounted."""
    a_jobs = await _submit(capped, "a", 2)
    calls = {"n": 0}

    def stopping() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    capped.saq.should_stop = stopping
    assert await _take(capped) is None
    assert await _running(capped) == {} and await capped.saq.count("active") == 0
    capped.saq.should_stop = lambda: False
    again = await _take(capped)
    assert again is not None and again.key == a_jobs[0]


async def test_a_job_in_saqs_own_layout_is_still_delivered(queue: SaqQueue) -> None:
    """A job queued without a tenant (fair scheduling off, or an older release) is delivered."""
    key = uuid.uuid4().hex
    await queue.saq.enqueue(RUN_JOB_FUNCTION, key=key, job_id=key, timeout=30)
    (a_job,) = await _submit(queue, "a", 1)
    keys = {job.key for job in [await _take(queue), await _take(queue)] if job is not None}
    assert keys == {key, a_job}
    assert await _running(queue) == {"a": 1}
