"""Guards before the refactoring of issue 12, at the runner: a resumed job does not
redo its finished steps, neither by calling the LLM again nor from the step cache."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from pipeline.delivery import run_job
from pipeline.deps import Deps
from pipeline.graph import LLM_STEPS, STEP_BY_NAME, STEPS
from pipeline.model import Artifact
from pipeline.offline import OfflineProvider
from tests.test_pipeline_runner import FAST, new_job, wait_for_artifacts


class CountingStore(SqliteStore):
    """A SQLite store that counts the artifacts written through it, by name."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.artifact_writes: Counter[str] = Counter()

    async def commit(self, job_id: str, *, artifacts: Sequence[Artifact] = (), **rest: Any) -> bool:
        self.artifact_writes.update(a.name for a in artifacts)
        return await super().commit(job_id, artifacts=artifacts, **rest)

    async def put_artifact(self, job_id: str, artifact: Artifact) -> None:
        self.artifact_writes[artifact.name] += 1
        await super().put_artifact(job_id, artifact)


@pytest.fixture
async def counting_store() -> AsyncIterator[CountingStore]:
    store = CountingStore()
    await store.open()
    yield store
    await store.close()


async def test_resumed_job_keeps_finished_artifacts_and_does_not_redo_them_from_the_cache(
    counting_store: CountingStore,
) -> None:
    """After a worker died mid-job, the redelivery keeps every finished artifact as it
    was (same hash and timestamp, never written again, not served from the cache)."""
    store = counting_store
    llm = OfflineProvider(latency_ms=40)
    deps = Deps(store, llm, FAST)
    job_id = await new_job(store, parallel_limit=2)  # the step cache is on (no skip_cache)
    first = asyncio.create_task(run_job(job_id, deps))
    await wait_for_artifacts(store, job_id, 6)
    first.cancel()  # the worker dies: the job stays running, to be delivered again
    with pytest.raises(asyncio.CancelledError):
        await first

    checkpoints = {a.name: a for a in await store.list_artifacts(job_id)}
    finished_llm_steps = {s for s in LLM_STEPS if STEP_BY_NAME[s].artifact in checkpoints}
    assert finished_llm_steps and len(checkpoints) < len(STEPS), sorted(checkpoints)
    assert all(n == 1 for n in store.artifact_writes.values()), store.artifact_writes
    calls_before = Counter(llm.calls_by_step)
    trace_before = len(await store.get_trace(job_id))
    store.artifact_writes.clear()
    await asyncio.sleep(0.005)  # a step redone now would get another timestamp

    job = await run_job(job_id, deps)
    assert job is not None and job.status == "completed", job and job.error
    assert job.attempts == 2

    # Nothing finished is written again, called again, or taken from the cache.
    rewritten = {name: n for name, n in store.artifact_writes.items() if name in checkpoints}
    assert not rewritten, f"finished artifacts written again: {rewritten}"
    after = {a.name: a for a in await store.list_artifacts(job_id)}
    for name, artifact in checkpoints.items():
        assert (after[name].hash, after[name].timestamp) == (artifact.hash, artifact.timestamp), name
    for step in finished_llm_steps:
        assert llm.calls_by_step[step] == calls_before[step] == 1, step
        assert job.steps[step] == "completed", (step, job.steps[step])
    resumed_trace = (await store.get_trace(job_id))[trace_before:]
    assert not [r for r in resumed_trace if r["cache_hit"]], resumed_trace
    assert job.result is not None and job.result["meta"]["cache_hits"] == 0

    # What was left is written exactly once, and each artifact announced once.
    left = {s.artifact for s in STEPS} - set(checkpoints)
    assert dict(store.artifact_writes) == dict.fromkeys(left, 1)
    announced = Counter(
        e.data["name"] for e in await store.read_events(job_id) if e.type == "artifact_written"
    )
    assert announced == Counter({s.artifact: 1 for s in STEPS})
