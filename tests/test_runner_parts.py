"""The runner's parts on their own: progress, the scheduler, one step's execution,
the commit buffer, the delivery entry and the atomic cancel of a queued job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from pipeline.commit_buffer import STATUS_AT_COMMIT, CommitBuffer, Stopped, last_status_only
from pipeline.delivery import Outcome, deliver
from pipeline.deps import Deps, PipelineConfig
from pipeline.graph import FINAL_STEP, LLM_STEPS, STEP_BY_NAME, STEPS, Step
from pipeline.hashing import make_artifact
from pipeline.model import Artifact, Job, StoreUnavailable
from pipeline.offline import OfflineProvider
from pipeline.progress import JobProgress
from pipeline.request import validate_request
from pipeline.scheduler import SlidingWindow
from pipeline.service import JobService
from pipeline.step_exec import StepExecutor, StepFailed
from pipeline.vocabulary import ErrorCode, EventType, JobStatus, StepState
from tests.test_pipeline_runner import BODY, FAST, new_job

# -- progress ----------------------------------------------------------------


def test_progress_never_goes_down_when_steps_end_out_of_order() -> None:
    """Steps finishing in any order, some started later, never lower percentage or currentStep."""
    progress = JobProgress(Job(id="j", tenant="t", request={}))
    seen: list[tuple[int, int]] = []
    order = list(STEPS)
    for step in order[:6]:
        progress.started(step)
        seen.append((progress.progress["percentage"], progress.progress["currentStep"]))
    for step in reversed(order[:6]):
        progress.finished_step(step, cached=False)
        seen.append((progress.progress["percentage"], progress.progress["currentStep"]))
    assert seen == sorted(seen)
    assert progress.progress["percentage"] == round(6 * 100 / 15)


def test_a_resumed_delivery_keeps_finished_steps_and_resets_the_rest() -> None:
    """Steps with a checkpoint are completed (or stay cached); all others are pending again."""
    job = Job(id="j", tenant="t", request={}, steps={"input": "cached", "evidence": "running"})
    progress = JobProgress(job)
    progress.resumed({"input", "brief"})
    assert progress.steps["input"] == StepState.CACHED
    assert progress.steps["brief"] == StepState.COMPLETED
    assert progress.steps["evidence"] == StepState.PENDING
    assert progress.finished == 2


# -- the scheduler -------------------------------------------------------------


class _Host:
    """A delivery stand-in: each LLM step takes ``latency[step]`` seconds."""

    def __init__(self, limit: int, latency: Mapping[str, float], priority: Mapping[str, float]) -> None:
        self.job_id = "j"
        self.limit = limit
        self.latency = latency
        self.priority = priority
        self.done: dict[str, Artifact] = {}
        self.started: list[str] = []
        self.running = 0
        self.peak = 0

    async def run_step(self, step: Step) -> Artifact:
        self.started.append(step.name)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.latency.get(step.name, 0.0))
        finally:
            self.running -= 1
        artifact = make_artifact(step.artifact, step.artifact_type, {"step": step.name})
        self.done[step.name] = artifact
        return artifact

    async def start_free_steps(self, seen: set[str]) -> list[Step]:
        ready: list[Step] = []
        progressed = True
        while progressed:
            progressed = False
            for step in STEPS:
                if step.name in seen or not set(step.depends_on) <= self.done.keys():
                    continue
                seen.add(step.name)
                if step.uses_llm:
                    ready.append(step)
                else:
                    self.done[step.name] = make_artifact(step.artifact, step.artifact_type, {})
                    progressed = True
        return ready


@pytest.mark.parametrize("limit", [1, 2, 4])
async def test_sliding_window_keeps_at_most_limit_calls_and_finishes(limit: int) -> None:
    """The window never runs more than parallel_limit LLM steps at once and ends with the final artifact."""
    host = _Host(limit, {s: 0.01 for s in LLM_STEPS}, {s.name: 1.0 for s in STEPS})
    final = await SlidingWindow()(host)
    assert final.name == STEP_BY_NAME[FINAL_STEP].artifact
    assert host.peak == min(limit, 9)
    assert sorted(host.started) == sorted(LLM_STEPS)


async def test_sliding_window_starts_the_most_urgent_ready_step_first() -> None:
    """With one slot, of the ready steps the one with the highest priority runs first."""
    priority = {s.name: 1.0 for s in STEPS} | {"brief": 9.0}
    host = _Host(1, {}, priority)
    await SlidingWindow()(host)
    assert host.started[0] == "brief"


# -- one step's execution ------------------------------------------------------


async def _executor(store: SqliteStore, done: dict[str, Artifact], **body: Any) -> StepExecutor:
    request = validate_request({**BODY, **body})
    deps = Deps(store, OfflineProvider(), FAST)
    return StepExecutor("j", request, deps, done, time.time() + 60, lambda record: None)


async def test_a_step_fed_by_a_fresh_answer_is_not_looked_up_in_the_cache(store: SqliteStore) -> None:
    """Only steps whose inputs did not come from this delivery's calls ask the cache."""
    done: dict[str, Artifact] = {}
    steps = await _executor(store, done)
    done["input"] = steps.compute(STEP_BY_NAME["input"])
    brief = STEP_BY_NAME["brief"]
    await store.cache_put(steps.cache_key(brief), make_artifact("brief", "brief", {"cached": True}))
    assert [a is not None for a in await steps.cached([brief])] == [True]
    done["brief"] = await steps.call(brief)
    done["evidence"] = await steps.call(STEP_BY_NAME["evidence"])
    market = STEP_BY_NAME["market"]
    await store.cache_put(steps.cache_key(market), make_artifact(market.artifact, "section", {}))
    assert await steps.cached([market]) == [None]


async def test_skip_cache_reads_nothing(store: SqliteStore) -> None:
    """With skip_cache a stored entry is not used."""
    done: dict[str, Artifact] = {}
    steps = await _executor(store, done, skip_cache=True)
    done["input"] = steps.compute(STEP_BY_NAME["input"])
    brief = STEP_BY_NAME["brief"]
    await store.cache_put(steps.cache_key(brief), make_artifact("brief", "brief", {"cached": True}))
    assert await steps.cached([brief]) == [None]


async def test_a_code_step_that_raises_fails_with_internal_error(store: SqliteStore) -> None:
    """A code step without its inputs fails the step with code internal_error, naming the step."""
    steps = await _executor(store, {})
    with pytest.raises(StepFailed) as info:
        steps.compute(STEP_BY_NAME["validate"])
    assert info.value.error["code"] == ErrorCode.INTERNAL_ERROR
    assert info.value.error["step"] == "validate"


# -- the commit buffer ---------------------------------------------------------


class _CountingStore(SqliteStore):
    """A real SQLite store that records its commits (artifact names per commit)."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.commits: list[list[str]] = []

    async def commit(self, job_id: str, **parts: Any) -> bool:
        self.commits.append([a.name for a in parts.get("artifacts", ())])
        return await super().commit(job_id, **parts)


async def _running(store: SqliteStore) -> Job:
    job_id = await new_job(store)
    job = await store.update(job_id, status=JobStatus.RUNNING, attempts=1)
    assert job is not None
    return job


def _buffer(store: SqliteStore, job: Job) -> CommitBuffer:
    progress = JobProgress(job)
    return CommitBuffer(store, job.id, job.attempts, progress.fields, progress.status)


async def test_writes_buffered_together_go_out_in_one_commit_in_order() -> None:
    """Two checkpoints buffered before a flush land in one commit; their events keep their order."""
    store = _CountingStore()
    await store.open()
    job = await _running(store)
    writes = _buffer(store, job)
    first = make_artifact("pitch", "input", {"n": 1})
    second = make_artifact("brief", "brief", {"n": 2})
    writes.buffer(events=[(EventType.ARTIFACT, first.meta()), STATUS_AT_COMMIT], artifacts=[first])
    writes.buffer(events=[(EventType.ARTIFACT, second.meta()), STATUS_AT_COMMIT], artifacts=[second])
    await writes.flush()
    await writes.close()
    assert store.commits == [["pitch", "brief"]]
    events = await store.read_events(job.id)
    types = [e.type for e in events]
    assert types[-3:] == ["artifact_written", "artifact_written", "status"]
    await store.close()


async def test_a_commit_after_the_job_left_running_raises_stopped(store: SqliteStore) -> None:
    """Once the job is cancelled by someone else, the buffer's next commit changes no job state and stops."""
    job = await _running(store)
    writes = _buffer(store, job)
    await store.update(job.id, status=JobStatus.CANCELLED)
    writes.buffer(artifacts=[make_artifact("pitch", "input", {})])
    with pytest.raises(Stopped):
        await writes.flush()
    await writes.close()
    stored = await store.get(job.id)
    assert stored is not None and stored.status == JobStatus.CANCELLED
    assert "artifact_written" not in [e.type for e in await store.read_events(job.id)]


async def test_a_write_behind_failure_fails_the_buffer() -> None:
    """A checkpoint written behind that fails is handed to the delivery through ``failed``."""

    class Unreachable(SqliteStore):
        async def commit(self, job_id: str, **parts: Any) -> bool:
            raise StoreUnavailable("away")

    store = Unreachable(":memory:")
    await store.open()
    job = await _running(store)
    writes = _buffer(store, job)
    writes.write_behind(writes.buffer(artifacts=[make_artifact("pitch", "input", {})]))
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(writes.failed, 5)
    await writes.close()
    await store.close()


def test_a_commit_keeps_only_its_last_status() -> None:
    """Of several status snapshots in one commit only the last one is published."""
    events = [("status", {"n": 1}), ("artifact_written", {}), ("status", {"n": 2})]
    assert last_status_only(events) == [("artifact_written", {}), ("status", {"n": 2})]


# -- the delivery entry ----------------------------------------------------------


async def test_deliver_says_how_each_delivery_ended(store: SqliteStore) -> None:
    """Completed, unknown, and a job already lost job_max_attempts times is LOST with worker_lost."""
    deps = Deps(store, OfflineProvider(), FAST)
    done = await deliver(await new_job(store), deps)
    assert done.outcome is Outcome.COMPLETED and done.job is not None
    assert (await deliver("no-such-job", deps)).outcome is Outcome.UNKNOWN
    again = await deliver(done.job.id, deps)
    assert again.outcome is Outcome.COMPLETED
    lost_id = await new_job(store)
    await store.update(lost_id, attempts=3)
    lost = await deliver(lost_id, Deps(store, OfflineProvider(), PipelineConfig(job_max_attempts=3)))
    assert lost.outcome is Outcome.LOST
    assert lost.job is not None and lost.job.error is not None
    assert lost.job.error["code"] == ErrorCode.WORKER_LOST


async def test_a_crashed_last_delivery_fails_the_job_with_worker_lost(store: SqliteStore) -> None:
    """A delivery that raises is CRASHED; on the queue's last delivery the job fails with worker_lost."""

    class Breaks(OfflineProvider):
        async def complete(self, request: Any, on_text: Any = None) -> Any:
            raise StoreUnavailable("store away mid-run")

    for last, outcome in ((False, Outcome.CRASHED), (True, Outcome.LOST)):
        job_id = await new_job(store)
        done = await deliver(job_id, Deps(store, Breaks(), FAST), last_delivery=last)
        assert done.outcome is outcome
        assert isinstance(done.error, StoreUnavailable)
        job = await store.get(job_id)
        assert job is not None
        assert job.status == (JobStatus.FAILED if last else JobStatus.RUNNING)


async def test_a_deadline_cap_fails_the_job_with_timeout_naming_the_worker_limit(
    store: SqliteStore,
) -> None:
    """A cap before the job's own deadline ends the job with timeout and says the worker's limit bit."""
    job_id = await new_job(store)
    deps = Deps(store, OfflineProvider(latency_ms=500), FAST)
    done = await deliver(job_id, deps, deadline_cap=time.time() + 0.3)
    assert done.outcome is Outcome.FAILED
    assert done.job is not None and done.job.error is not None
    assert done.job.error["code"] == ErrorCode.TIMEOUT
    assert "time limit" in done.job.error["message"]


# -- cancel of a queued job ------------------------------------------------------


class _OperationLog(SqliteStore):
    """A real SQLite store that records which of its write operations were called."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.calls: list[str] = []

    async def update(self, *args: Any, **kwargs: Any) -> Job | None:
        self.calls.append("update")
        return await super().update(*args, **kwargs)

    async def append_event(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("append_event")
        return await super().append_event(*args, **kwargs)


async def test_cancelling_a_queued_job_is_one_store_operation_with_its_events() -> None:
    """The status change and its status, error and done events are written by one update."""
    store = _OperationLog()
    await store.open()
    job_id = await new_job(store)

    class NoQueue:
        async def enqueue(self, job_id: str, timeout_s: float) -> None: ...

    service = JobService(Deps(store, OfflineProvider(), FAST), NoQueue(), backend="local")  # type: ignore[arg-type]
    store.calls.clear()
    cancelled = await service.cancel(job_id, None)
    assert cancelled is not None and cancelled.status == JobStatus.CANCELLED
    assert store.calls == ["update"]
    events = await store.read_events(job_id)
    assert [e.type for e in events][-3:] == ["status", "error", "done"]
    await store.close()
