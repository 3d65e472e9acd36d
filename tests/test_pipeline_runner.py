"""run_job end to end on a real SQLite store with the offline provider."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from pipeline.delivery import run_job
from pipeline.deps import Deps, PipelineConfig
from pipeline.graph import LLM_STEPS, STEP_BY_NAME, STEP_NAMES, STEPS
from pipeline.hashing import content_hash
from pipeline.model import Event, Job, LLMError, LLMReply, LLMRequest, StoreUnavailable
from pipeline.offline import OfflineProvider
from pipeline.ports import JobStore, TextSink
from pipeline.request import validate_request
from pipeline.views import initial_progress, initial_steps, status_view
from pipeline.vocabulary import JobStatus

BODY = {
    "project_title": "GreenGrid",
    "elevator_pitch": (
        "GreenGrid balances neighbourhood solar batteries for municipal utilities. "
        "Utilities pay per kilowatt-hour shifted. Three pilots run in Bavaria."
    ),
    "language": "en",
}
Opener = Callable[[SqliteStore], Awaitable[SqliteStore]]
FAST = PipelineConfig(cancel_poll_s=0.02, llm_backoff_base_s=0.01, llm_backoff_max_s=0.05)


async def new_job(store: JobStore, **body: Any) -> str:
    request = validate_request({**BODY, **body})
    job = Job(
        id=str(uuid.uuid4()),
        tenant="t",
        request=request.to_dict(),
        progress=initial_progress(),
        steps=initial_steps(),
    )
    await store.create(job)
    return job.id


async def wait_for_artifacts(store: JobStore, job_id: str, count: int) -> list[Event]:
    """Follow the event log until ``count`` artifacts were announced."""
    seen: list[Event] = []
    while sum(e.type == "artifact_written" for e in seen) < count:
        after = seen[-1].id if seen else 0
        batch = await store.read_events(job_id, after, wait_s=10)
        assert batch, "no progress within 10 s"
        seen += batch
    return seen


async def test_all_fifteen_artifacts_are_stored_with_verifiable_hashes(store: SqliteStore) -> None:
    """A completed job has one artifact per step, of the step's type, hashed as sha256 of canonical JSON."""
    llm = OfflineProvider()
    job = await run_job(await new_job(store), Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.COMPLETED, job and job.error
    artifacts = await store.list_artifacts(job.id)
    assert sorted(a.name for a in artifacts) == sorted(s.artifact for s in STEPS)
    by_name = {a.name: a for a in artifacts}
    for step in STEPS:
        artifact = by_name[step.artifact]
        assert artifact.type == step.artifact_type
        assert artifact.hash == content_hash(artifact.data)
        assert len(artifact.hash) == 64
    assert job.steps == {name: "completed" for name in STEP_NAMES}
    assert job.result is not None and job.result["success"] is True
    assert job.result["data"] == by_name["dossier"].data
    assert job.result["meta"]["offline"] is True
    assert job.result["meta"]["llm_calls"] == len(LLM_STEPS) == llm.calls
    assert by_name["dossier"].data["meta"]["offline"] is True
    view = status_view(job, artifacts)
    assert set(view["artifacts"]) == {s.artifact for s in STEPS}


@pytest.mark.parametrize("limit", [1, 2, 4])
async def test_parallel_limit_is_used_but_never_exceeded(store: SqliteStore, limit: int) -> None:
    """Concurrent LLM calls reach parallel_limit and never go beyond it."""
    llm = OfflineProvider(latency_ms=100)
    job = await run_job(await new_job(store, parallel_limit=limit), Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.COMPLETED
    assert llm.max_in_flight == limit
    assert llm.in_flight == 0


async def test_critical_path_first_with_one_slot(store: SqliteStore) -> None:
    """With one slot, market (longest remaining chain) runs before the other sections."""
    order: list[str] = []

    class Recording(OfflineProvider):
        async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
            order.append(request.step)
            return await super().complete(request, on_text)

    job = await run_job(await new_job(store, parallel_limit=1), Deps(store, Recording(), FAST))
    assert job is not None and job.status == JobStatus.COMPLETED
    assert order.index("market") == 2
    assert order.index("business_model") < order.index("problem")
    assert order[-1] == "investor_score"


async def test_second_identical_job_is_served_from_the_cache(store: SqliteStore) -> None:
    """An identical second job makes no LLM call, marks steps cached and yields the same dossier."""
    llm = OfflineProvider()
    deps = Deps(store, llm, FAST)
    first = await run_job(await new_job(store), deps)
    calls_after_first = llm.calls
    second = await run_job(await new_job(store), deps)
    assert first is not None and second is not None and second.status == JobStatus.COMPLETED
    assert llm.calls == calls_after_first
    assert all(second.steps[s] == "cached" for s in LLM_STEPS)
    assert second.steps["input"] == second.steps["assemble"] == "completed"
    assert second.result is not None and first.result is not None
    assert second.result["meta"]["cache_hits"] == len(LLM_STEPS)
    assert second.result["meta"]["llm_calls"] == 0
    dossier_hashes = {
        (await store.get_artifact(j.id, "dossier")).hash  # type: ignore[union-attr]
        for j in (first, second)
    }
    assert len(dossier_hashes) == 1
    trace = await store.get_trace(second.id)
    assert len(trace) == len(LLM_STEPS) and all(r["cache_hit"] for r in trace)


async def test_skip_cache_calls_every_step_again(store: SqliteStore) -> None:
    """skip_cache skips cache reads: every LLM step is called even though the cache holds them."""
    llm = OfflineProvider()
    deps = Deps(store, llm, FAST)
    await run_job(await new_job(store), deps)
    job = await run_job(await new_job(store, skip_cache=True), deps)
    assert job is not None and job.status == JobStatus.COMPLETED
    assert llm.calls == 2 * len(LLM_STEPS)
    assert all(job.steps[s] == "completed" for s in LLM_STEPS)


async def test_different_language_is_a_cache_miss(store: SqliteStore) -> None:
    """Language enters the cache key: the German job calls every step and answers in German."""
    llm = OfflineProvider()
    deps = Deps(store, llm, FAST)
    await run_job(await new_job(store), deps)
    job = await run_job(await new_job(store, language="de"), deps)
    assert job is not None and job.result is not None
    assert llm.calls == 2 * len(LLM_STEPS)
    assert "Offline-Modus" in " ".join(job.result["data"]["brief"]["assumptions"])


async def test_deadline_fails_the_job_with_timeout_and_aborts_calls(store: SqliteStore) -> None:
    """A job slower than timeout_ms fails with code timeout, naming a step, with no call left in flight."""
    llm = OfflineProvider(latency_ms=400)
    job_id = await new_job(store, parallel_limit=1, timeout_ms=1000)
    job = await run_job(job_id, Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "timeout"
    assert job.error["step"] in LLM_STEPS
    assert job.steps[job.error["step"]] == "failed"
    assert llm.in_flight == 0
    assert llm.calls < len(LLM_STEPS)
    events = await store.read_events(job_id)
    assert [e.type for e in events[-3:]] == ["status", "error", "done"]
    assert events[-1].data == {"status": JobStatus.FAILED}


async def test_cancel_mid_run_ends_cancelled_and_aborts_calls(store: SqliteStore) -> None:
    """A cancel request while steps run ends the job cancelled with no call left in flight."""
    llm = OfflineProvider(latency_ms=200)
    job_id = await new_job(store, parallel_limit=2)
    task = asyncio.create_task(run_job(job_id, Deps(store, llm, FAST)))
    await wait_for_artifacts(store, job_id, 2)
    await store.request_cancel(job_id)
    job = await task
    assert job is not None and job.status == JobStatus.CANCELLED
    assert job.error is not None and job.error["code"] == "cancelled"
    assert llm.in_flight == 0
    assert "running" not in job.steps.values()
    assert len(await store.list_artifacts(job_id)) < len(STEPS)
    assert (await store.read_events(job_id))[-1].data == {"status": JobStatus.CANCELLED}


async def test_cancel_of_one_job_leaves_its_neighbours_running(store: SqliteStore) -> None:
    """Jobs of one process share a cancel poller: only the flagged job ends cancelled,
    the others complete with every step."""
    llm = OfflineProvider(latency_ms=60)
    deps = Deps(store, llm, FAST)
    ids = [await new_job(store, parallel_limit=2) for _ in range(3)]
    tasks = [asyncio.create_task(run_job(job_id, deps)) for job_id in ids]
    await wait_for_artifacts(store, ids[1], 2)
    await store.request_cancel(ids[1])
    jobs = await asyncio.gather(*tasks)
    assert [j.status if j else None for j in jobs] == [
        JobStatus.COMPLETED,
        JobStatus.CANCELLED,
        JobStatus.COMPLETED,
    ]
    for job_id in (ids[0], ids[2]):
        assert len(await store.list_artifacts(job_id)) == len(STEPS)
    assert llm.in_flight == 0


async def test_trace_holds_every_call_and_events_carry_every_artifact(store: SqliteStore) -> None:
    """Buffered writes lose nothing: one trace record per LLM call, one artifact event per
    step, and the job run_job returns is the job as stored."""
    llm = OfflineProvider(latency_ms=5)
    job_id = await new_job(store, parallel_limit=3)
    job = await run_job(job_id, Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.COMPLETED
    trace = await store.get_trace(job_id)
    assert sorted(r["step"] for r in trace) == sorted(LLM_STEPS)
    assert job.result is not None and job.result["meta"]["llm_calls"] == len(trace)
    events = await store.read_events(job_id)
    announced = [e.data["name"] for e in events if e.type == "artifact_written"]
    assert sorted(announced) == sorted(s.artifact for s in STEPS)
    stored = await store.get(job_id)
    assert stored == job


async def test_cancel_before_start_makes_no_call(store: SqliteStore) -> None:
    """A job whose cancel flag is up when delivered ends cancelled without any LLM call."""
    llm = OfflineProvider()
    job_id = await new_job(store)
    await store.request_cancel(job_id)
    job = await run_job(job_id, Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.CANCELLED and llm.calls == 0


async def test_killed_delivery_resumes_without_repeating_finished_steps(store: SqliteStore) -> None:
    """Cancelling run_job (worker death) leaves the job running; the next delivery runs only what is left."""
    llm = OfflineProvider(latency_ms=40)
    deps = Deps(store, llm, FAST)
    job_id = await new_job(store, parallel_limit=2)
    task = asyncio.create_task(run_job(job_id, deps))
    await wait_for_artifacts(store, job_id, 6)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.in_flight == 0
    interrupted = await store.get(job_id)
    assert interrupted is not None and interrupted.status == JobStatus.RUNNING
    finished = {a.name for a in await store.list_artifacts(job_id)}
    finished_llm_steps = {s for s in LLM_STEPS if STEP_BY_NAME[s].artifact in finished}
    assert finished_llm_steps, "the kill came before any LLM step finished"
    calls_before = dict(llm.calls_by_step)

    job = await run_job(job_id, deps)
    assert job is not None and job.status == JobStatus.COMPLETED
    assert job.attempts == 2
    assert job.started_at == interrupted.started_at
    for step in finished_llm_steps:
        assert llm.calls_by_step[step] == calls_before[step] == 1
    assert set(llm.calls_by_step) == set(LLM_STEPS)
    assert len(await store.list_artifacts(job_id)) == len(STEPS)


async def test_progress_never_decreases_in_the_event_log(store: SqliteStore) -> None:
    """percentage and currentStep of consecutive status events never go down, ending at 100/15."""
    job_id = await new_job(store, parallel_limit=1)
    await run_job(job_id, Deps(store, OfflineProvider(latency_ms=30), FAST))
    events = await store.read_events(job_id)
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    progress = [e.data["progress"] for e in events if e.type == "status"]
    # Moves step by step: each call is slower than a commit, so each step end has its own.
    assert len({p["percentage"] for p in progress}) >= 12
    for before, after in itertools.pairwise(progress):
        assert after["percentage"] >= before["percentage"]
        assert after["currentStep"] >= before["currentStep"]
    assert progress[-1] == {
        "step": "final_assembly",
        "percentage": 100,
        "currentStep": 15,
        "totalSteps": 15,
    }
    displays = {p["step"] for p in progress}
    assert displays <= {s.display for s in STEPS} and len(displays) >= 5
    assert "investor_scoring" in displays
    assert [e.type for e in events[-3:]] == ["status", "result", "done"]


async def test_worker_lost_after_max_attempts(store: SqliteStore) -> None:
    """A job already delivered job_max_attempts times fails with worker_lost instead of running again."""
    llm = OfflineProvider()
    job_id = await new_job(store)
    await store.update(job_id, status=JobStatus.RUNNING, attempts=3, started_at=1.0)
    job = await run_job(job_id, Deps(store, llm, PipelineConfig(job_max_attempts=3)))
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "worker_lost"
    assert llm.calls == 0
    assert (await store.read_events(job_id))[-1].data == {"status": JobStatus.FAILED}


@pytest.mark.parametrize(("stopping", "ends"), [(True, JobStatus.COMPLETED), (False, JobStatus.FAILED)])
async def test_only_an_interruption_on_shutdown_is_a_hand_back(
    store: SqliteStore, stopping: bool, ends: str
) -> None:
    """A delivery interrupted while its process shuts down is handed back, which
    worker_lost does not count (with one attempt allowed the job still completes); any
    other interruption (the sweep's abort of a stalled worker) is a lost delivery."""
    config = PipelineConfig(cancel_poll_s=0.02, job_max_attempts=1)
    deps = Deps(store, OfflineProvider(latency_ms=40), config, stopping=lambda: stopping)
    job_id = await new_job(store)
    task = asyncio.create_task(run_job(job_id, deps))
    await wait_for_artifacts(store, job_id, 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    interrupted = await store.get(job_id)
    assert interrupted is not None and interrupted.handoffs == int(stopping)
    job = await run_job(job_id, deps)
    assert job is not None and job.status == ends


async def test_finished_and_unknown_jobs_are_left_alone(store: SqliteStore) -> None:
    """A second delivery of a completed job changes nothing; an unknown id returns None."""
    llm = OfflineProvider()
    deps = Deps(store, llm, FAST)
    job_id = await new_job(store)
    first = await run_job(job_id, deps)
    events = len(await store.read_events(job_id))
    again = await run_job(job_id, deps)
    assert first == again and llm.calls == len(LLM_STEPS)
    assert len(await store.read_events(job_id)) == events
    assert await run_job("no-such-job", deps) is None


class FailingStep(OfflineProvider):
    """Answers like the offline provider except for one step, which gets a fixed error."""

    def __init__(self, step: str, error: LLMError) -> None:
        super().__init__(latency_ms=10)
        self.step = step
        self.error = error

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        if request.step == self.step:
            self.calls_by_step[request.step] += 1
            raise self.error
        return await super().complete(request, on_text)


async def test_permanent_llm_error_fails_the_job_with_its_code_and_step(store: SqliteStore) -> None:
    """A non-transient provider error is not retried and fails the job with {code, message, step}."""
    llm = FailingStep("market", LLMError("llm_auth", "key rejected", status=401))
    job = await run_job(await new_job(store, parallel_limit=4), Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error == {"code": "llm_auth", "message": "key rejected", "step": "market"}
    assert job.steps["market"] == "failed"
    assert llm.calls_by_step["market"] == 1
    assert llm.in_flight == 0
    assert "running" not in job.steps.values()


async def test_learned_step_durations_steer_the_critical_path(store: SqliteStore) -> None:
    """Once the process has seen team take far longer than other steps, one slot runs it right after brief."""
    order: list[str] = []

    class Recording(OfflineProvider):
        async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
            order.append(request.step)
            return await super().complete(request, on_text)

    deps = Deps(store, Recording(), FAST)
    for step in LLM_STEPS:
        deps.latency.observe(step, "offline", 5.0 if step == "team" else 0.1)
    job = await run_job(await new_job(store, parallel_limit=1), deps)
    assert job is not None and job.status == JobStatus.COMPLETED
    assert order.index("team") == 2
    estimate = deps.latency.estimate("market", "offline")
    assert estimate is not None and estimate < 0.1, "the run did not feed what it saw back"


@pytest.fixture
async def opened() -> AsyncIterator[Opener]:
    """Opens the stores a test builds, and closes them when it ends."""
    stores: list[SqliteStore] = []

    async def open_store(store: SqliteStore) -> SqliteStore:
        await store.open()
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        await store.close()


class _SlowCommits(SqliteStore):
    """A store whose commits take ``delay_s`` and which logs what they carried."""

    def __init__(self, log: list[tuple[str, str]], delay_s: float) -> None:
        super().__init__(":memory:")
        self.log = log
        self.delay_s = delay_s

    async def commit(self, job_id: str, **parts: Any) -> bool:
        await asyncio.sleep(self.delay_s)
        held = await super().commit(job_id, **parts)
        self.log.extend(("committed", a.name) for a in parts.get("artifacts", ()))
        return held


class _LoggedProvider(OfflineProvider):
    def __init__(self, log: list[tuple[str, str]], latency_ms: float = 0) -> None:
        super().__init__(latency_ms)
        self.log = log

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        self.log.append(("called", request.step))
        return await super().complete(request, on_text)


def _inputs_committed_first(log: list[tuple[str, str]]) -> None:
    committed = [name for kind, name in log if kind == "committed"]
    for step in STEPS:
        if step.artifact in committed:
            for dep in step.depends_on:
                dep_artifact = STEP_BY_NAME[dep].artifact
                assert dep_artifact in committed, (step.name, dep)
                assert committed.index(dep_artifact) <= committed.index(step.artifact)


async def test_dependent_steps_do_not_wait_for_the_store(opened: Opener) -> None:
    """Dependents call the LLM before a step's checkpoint is written; checkpoints land in graph order."""
    log: list[tuple[str, str]] = []
    store = await opened(_SlowCommits(log, delay_s=0.05))
    job_id = await new_job(store, parallel_limit=1)
    job = await run_job(job_id, Deps(store, _LoggedProvider(log), FAST))
    assert job is not None and job.status == JobStatus.COMPLETED
    assert log.index(("called", "brief")) < log.index(("committed", "pitch"))
    _inputs_committed_first(log)
    assert {a.name for a in await store.list_artifacts(job_id)} == {s.artifact for s in STEPS}


class _LosesACommit(_SlowCommits):
    """The ``lose``-th commit that carries artifacts fails (after the usual delay) as an
    unreachable store would."""

    def __init__(self, log: list[tuple[str, str]], lose: int) -> None:
        super().__init__(log, delay_s=0.02)
        self.left = lose

    async def commit(self, job_id: str, **parts: Any) -> bool:
        if parts.get("artifacts"):
            self.left -= 1
            if self.left == 0:
                await asyncio.sleep(self.delay_s)
                raise StoreUnavailable("store went away")
        return await super().commit(job_id, **parts)


async def test_a_lost_checkpoint_stops_later_ones_and_the_next_delivery_completes(
    opened: Opener,
) -> None:
    """After a lost checkpoint no later one lands; the next delivery redoes what was lost and completes."""
    log: list[tuple[str, str]] = []
    store = await opened(_LosesACommit(log, lose=2))
    job_id = await new_job(store, parallel_limit=2)
    # Calls faster than a commit: later steps end while the lost commit is out.
    llm = _LoggedProvider(log, latency_ms=5)
    with pytest.raises(StoreUnavailable):
        await run_job(job_id, Deps(store, llm, FAST))
    landed = {a.name for a in await store.list_artifacts(job_id)}
    assert landed and len(landed) < len(STEPS)
    _inputs_committed_first(log)
    after_loss = len(log)

    job = await run_job(job_id, Deps(store, llm, FAST))
    assert job is not None and job.status == JobStatus.COMPLETED and job.attempts == 2
    redone = {name for kind, name in log[after_loss:] if kind == "called"}
    assert not redone & {s.name for s in STEPS if s.artifact in landed}
    _inputs_committed_first(log)
    assert {a.name for a in await store.list_artifacts(job_id)} == {s.artifact for s in STEPS}
