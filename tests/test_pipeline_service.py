"""JobService on the local backend's real parts: SqliteStore, LocalQueue workers, deliver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.local_queue import LocalQueue
from adapters.saq_queue import SaqQueue
from adapters.sqlite_store import SqliteStore
from handlers.bootstrap import bootstrap
from handlers.settings import Settings
from pipeline.delivery import Delivery, deliver
from pipeline.deps import Deps, PipelineConfig
from pipeline.graph import LLM_STEPS, STEPS
from pipeline.model import StoreUnavailable
from pipeline.offline import OfflineProvider
from pipeline.request import RequestInvalid
from pipeline.service import JobService
from pipeline.vocabulary import JobStatus
from tests.support.service import free_port

BODY = {"project_title": "Acme", "elevator_pitch": "Robots fold hotel laundry.", "language": "en"}


@dataclass
class Local:
    store: SqliteStore
    llm: OfflineProvider
    queue: LocalQueue
    service: JobService


@pytest.fixture
async def local() -> AsyncIterator[Local]:
    """A service whose queue workers are not started yet (``await local.queue.open()``)."""
    store = SqliteStore(":memory:")
    await store.open()
    llm = OfflineProvider(latency_ms=5)
    deps = Deps(store, llm, PipelineConfig(cancel_poll_s=0.02))

    async def run(job_id: str) -> Delivery:
        return await deliver(job_id, deps)

    queue = LocalQueue(run, store, concurrency=2)
    yield Local(store, llm, queue, JobService(deps, queue))
    await queue.close()
    await store.close()


async def test_submitted_job_completes_and_every_view_shows_it(local: Local) -> None:
    """submit -> queued with a first status event; a worker completes it; view, artifacts, trace agree."""
    job, created = await local.service.submit(BODY, tenant="a")
    assert created and job.status == "queued"
    first = await local.store.read_events(job.id)
    assert [e.type for e in first] == ["status"] and first[0].data["status"] == "queued"
    await local.queue.open()
    done = await local.service.wait_finished(job.id, timeout_s=30)
    assert done.status == "completed"
    view = await local.service.view(job.id, "a")
    assert view is not None and view["result"]["success"] is True
    assert len(view["artifacts"]) == len(STEPS)
    listed = await local.service.artifacts(job.id, "a")
    assert listed is not None and next(a["name"] for a in listed) == "pitch"
    brief = await local.service.artifact(job.id, "a", "brief")
    assert brief is not None and set(brief) == {"name", "type", "data", "hash", "timestamp"}
    assert await local.service.artifact(job.id, "a", "nope") is None
    assert await local.service.artifact(job.id, "a", "../etc/passwd") is None
    trace = await local.service.trace(job.id, "a")
    assert trace is not None and trace["totals"]["llm_calls"] == len(LLM_STEPS)
    assert trace["totals"]["prompt_tokens"] == sum(c["prompt_tokens"] for c in trace["calls"]) > 0


async def test_invalid_body_creates_nothing(local: Local) -> None:
    """A body breaking the rules raises RequestInvalid and no job exists afterwards."""
    with pytest.raises(RequestInvalid) as info:
        await local.service.submit({"project_title": ""}, tenant="a")
    assert {d["field"] for d in info.value.details} == {"project_title", "elevator_pitch"}
    assert sum((await local.store.count_by_status()).values()) == 0


async def test_idempotency_key_returns_the_same_job_per_tenant(local: Local) -> None:
    """The same key from the same tenant returns the first job; another tenant gets its own."""
    first, created = await local.service.submit(BODY, tenant="a", idempotency_key="k1")
    again, created_again = await local.service.submit(BODY, tenant="a", idempotency_key="k1")
    other, created_other = await local.service.submit(BODY, tenant="b", idempotency_key="k1")
    assert created and not created_again and created_other
    assert again.id == first.id != other.id
    assert (await local.store.count_by_status())["queued"] == 2


async def test_unreachable_queue_leaves_nothing_half_created() -> None:
    """When enqueueing fails with StoreUnavailable the job is deleted and the error re-raised."""
    store = SqliteStore(":memory:")
    await store.open()
    queue = SaqQueue.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="dead")
    service = JobService(Deps(store, OfflineProvider()), queue)
    try:
        with pytest.raises(StoreUnavailable):
            await service.submit(BODY, tenant="a")
        assert sum((await store.count_by_status()).values()) == 0
        jobs, _ = await store.list_jobs(None)
        assert jobs == []
    finally:
        await queue.close()
        await store.close()


async def test_other_tenants_jobs_are_invisible(local: Local) -> None:
    """Every read or cancel by another tenant answers None; no tenant (no auth) sees all."""
    job, _ = await local.service.submit(BODY, tenant="a")
    service = local.service
    assert await service.get(job.id, "b") is None
    assert await service.view(job.id, "b") is None
    assert await service.cancel(job.id, "b") is None
    assert await service.trace(job.id, "b") is None
    assert await service.artifacts(job.id, "b") is None
    assert await service.artifact(job.id, "b", "pitch") is None
    assert (await service.get(job.id, None)) is not None
    assert (await service.list("b"))["jobs"] == []
    assert (await local.store.get(job.id)).status == "queued"  # type: ignore[union-attr]


async def test_cancel_of_a_queued_job_is_immediate_and_idempotent(local: Local) -> None:
    """Cancelling a queued job ends it at once (status/error/done); repeating it changes nothing."""
    job, _ = await local.service.submit(BODY, tenant="a")
    cancelled = await local.service.cancel(job.id, "a")
    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.error is not None and cancelled.error["code"] == "cancelled"
    events = await local.store.read_events(job.id)
    assert [e.type for e in events] == ["status", "status", "error", "done"]
    again = await local.service.cancel(job.id, "a")
    assert again is not None and again.status == "cancelled"
    assert len(await local.store.read_events(job.id)) == len(events)
    await local.queue.open()
    finished = await local.service.wait_finished(job.id, timeout_s=5)
    assert finished.status == "cancelled" and local.llm.calls == 0


async def test_cancel_of_a_running_job_raises_the_flag_and_the_worker_stops(local: Local) -> None:
    """Cancelling a running job returns it still running; the worker then ends it cancelled."""
    local.llm.latency_ms = 200
    job, _ = await local.service.submit(BODY, tenant="a")
    await local.queue.open()
    while (await local.store.get(job.id)).status != "running":  # type: ignore[union-attr]
        await local.store.read_events(job.id, after=1, wait_s=5)
    answer = await local.service.cancel(job.id, "a")
    assert answer is not None and answer.status == "running"
    assert await local.store.cancel_requested(job.id)
    finished = await local.service.wait_finished(job.id, timeout_s=10)
    assert finished.status == "cancelled"
    assert local.llm.in_flight == 0


async def test_wait_finished_returns_the_unfinished_job_after_its_timeout(local: Local) -> None:
    """A job that does not finish in time comes back as it is (queued here), without raising."""
    job, _ = await local.service.submit(BODY, tenant="a")
    still = await local.service.wait_finished(job.id, timeout_s=0.2)
    assert still.status == "queued"


async def test_list_filters_by_status_and_pages_with_a_cursor(local: Local) -> None:
    """list shows the tenant's jobs newest first, filters by status and pages by cursor."""
    ids = [(await local.service.submit(BODY, tenant="a"))[0].id for _ in range(3)]
    await local.service.cancel(ids[0], "a")
    page = await local.service.list("a", limit=2)
    assert [j["jobId"] for j in page["jobs"]] == ids[:0:-1]
    assert "artifacts" not in page["jobs"][0] and "result" not in page["jobs"][0]
    rest = await local.service.list("a", limit=2, cursor=page["nextCursor"])
    assert [j["jobId"] for j in rest["jobs"]] == [ids[0]] and rest["nextCursor"] is None
    cancelled = await local.service.list("a", status="cancelled")
    assert [j["jobId"] for j in cancelled["jobs"]] == [ids[0]]
    with pytest.raises(RequestInvalid):
        await local.service.list("a", status="bogus")


async def test_stats_count_jobs_by_status_and_name_the_backend(local: Local) -> None:
    """stats reports per-status counts, the queue's own stats and the backend."""
    await local.service.submit(BODY, tenant="a")
    stats = await local.service.stats()
    assert stats["jobs"]["queued"] == 1 and stats["jobs"]["completed"] == 0
    assert stats["backend"] == "local" and stats["provider"] == "offline"
    assert "workers" in stats["queue"]


async def test_a_job_running_when_the_local_worker_stops_is_handed_back(tmp_path: Path) -> None:
    """Stopping the local backend (``jobq serve`` shutting down) hands its running job back:
    it stays running, to resume on the next start, and worker_lost does not count it."""
    settings = Settings.from_env({"JOBS_STORE_URL": f"sqlite:///{tmp_path / 'jobs.db'}"})
    container = bootstrap(settings, llm=OfflineProvider(latency_ms=100))
    await container.open()
    try:
        job, _ = await container.service.submit(BODY, "t")
        async with asyncio.timeout(30):
            while len(await container.store.list_artifacts(job.id)) < 2:  # noqa: ASYNC110 - polls the store
                await asyncio.sleep(0.02)
        await container.queue.close()
        stored = await container.store.get(job.id)
    finally:
        await container.close()
    assert stored is not None and stored.status == JobStatus.RUNNING and stored.handoffs == 1
