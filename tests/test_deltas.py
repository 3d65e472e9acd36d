"""Deltas in the runner: a retry restarts at offset 0, coalescing, switching off,
and the trace of a call aborted mid-stream."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from adapters.sqlite_store import SqliteStore
from pipeline.delivery import run_job
from pipeline.deltas import COALESCE_S
from pipeline.deps import Deps, PipelineConfig
from pipeline.model import Event, LLMError, LLMReply, LLMRequest
from pipeline.offline import OfflineProvider
from pipeline.ports import TextSink
from tests.test_pipeline_runner import FAST, new_job

SLOW = 600


class CutOnce(OfflineProvider):
    """Streams half of ``step``'s first answer, then fails it as a cut stream would."""

    def __init__(self, step: str) -> None:
        super().__init__(latency_ms=SLOW)
        self.step = step
        self.cut = False

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        if request.step != self.step or self.cut:
            return await super().complete(request, on_text)
        self.cut = True
        reply = await super().complete(request)
        for piece in (reply.text[:40], reply.text[40:80]):
            if on_text is not None:
                on_text(piece)
            await asyncio.sleep(0.15)
        raise LLMError("llm_unavailable", "stream cut", transient=True)


async def _follow(store: SqliteStore, job_id: str) -> list[Event]:
    events: list[Event] = []
    while not events or events[-1].type != "done":
        events += await store.read_events(job_id, events[-1].id if events else 0, wait_s=10)
    return events


async def test_a_retry_restarts_its_deltas_at_offset_zero(store: SqliteStore) -> None:
    """The text of a cut attempt is followed by attempt 2 starting again at offset 0."""
    job_id = await new_job(store, parallel_limit=1, timeout_ms=60_000)
    follow = asyncio.create_task(_follow(store, job_id))
    job = await run_job(job_id, Deps(store, CutOnce("brief"), FAST))
    events = await follow
    assert job is not None and job.status == "completed"
    brief = [e.data for e in events if e.type == "delta" and e.data["step"] == "brief"]
    attempts = [d["attempt"] for d in brief]
    assert attempts == sorted(attempts) and {1, 2} <= set(attempts), brief
    first_of_second = next(d for d in brief if d["attempt"] == 2)
    assert first_of_second["offset"] == 0
    assert next(d["offset"] for d in brief if d["attempt"] == 1) == 0


async def test_deltas_are_coalesced_to_one_per_step_per_period(store: SqliteStore) -> None:
    """A step streaming for 0.6 s in ~50 ms pieces writes at most one delta per 100 ms."""
    job_id = await new_job(store, parallel_limit=1)
    follow = asyncio.create_task(_follow(store, job_id))
    await run_job(job_id, Deps(store, OfflineProvider(latency_ms=SLOW), FAST))
    per_step: dict[str, int] = defaultdict(int)
    for event in await follow:
        if event.type == "delta":
            per_step[event.data["step"]] += 1
    assert per_step, "no deltas"
    most = int(SLOW / 1000 / COALESCE_S) + 1
    assert max(per_step.values()) <= most, per_step
    assert min(per_step.values()) >= 2, per_step


async def test_deltas_switched_off_write_none(store: SqliteStore) -> None:
    """With live_deltas off a slow job's log has no delta event."""
    job_id = await new_job(store, parallel_limit=4)
    follow = asyncio.create_task(_follow(store, job_id))
    config = PipelineConfig(cancel_poll_s=0.02, live_deltas=False)
    await run_job(job_id, Deps(store, OfflineProvider(latency_ms=300), config))
    assert not [e for e in await follow if e.type == "delta"]


async def test_a_call_aborted_mid_stream_is_traced_with_the_tokens_received(store: SqliteStore) -> None:
    """Cancelling a job while its calls stream records them as aborted with an estimate
    of the completion tokens received, flagged as an estimate."""
    job_id = await new_job(store, parallel_limit=2)
    deps = Deps(store, OfflineProvider(latency_ms=2000), FAST)
    run = asyncio.create_task(run_job(job_id, deps))
    await asyncio.sleep(1.0)
    await store.request_cancel(job_id)
    job = await run
    assert job is not None and job.status == "cancelled"
    aborted: list[dict[str, Any]] = [r for r in await store.get_trace(job_id) if r["outcome"] == "aborted"]
    assert aborted
    assert all(r["tokens_estimated"] and r["completion_tokens"] > 0 for r in aborted), aborted
