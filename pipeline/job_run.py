"""One delivery's run of a job: its state transitions, from ``running`` to an end.

The run resumes from the artifacts already stored (each is a checkpoint) and lets
a scheduling strategy (:mod:`pipeline.scheduler`) drive the remaining steps, which
a :class:`~pipeline.step_exec.StepExecutor` executes. Its writes go through a
:class:`~pipeline.commit_buffer.CommitBuffer`. Three things end a run early: the
deadline (the job fails with ``timeout``), the cancel flag (``cancelled``) and
cancellation of the run itself (worker shutdown: the job stays ``running`` for
the next delivery to resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any

import structlog

from pipeline.budget import JobBudget
from pipeline.cancel_watch import cancel_watch
from pipeline.commit_buffer import STATUS_AT_COMMIT, CommitBuffer, Stopped, stop_tasks
from pipeline.deps import Deps
from pipeline.graph import (
    DEPENDS_ON,
    FINAL_STEP,
    LLM_STEPS,
    STEP_BY_NAME,
    STEPS,
    TOTAL_STEPS,
    Step,
    remaining_chain,
)
from pipeline.hashing import verify_artifact
from pipeline.llm_call import cache_hit_record
from pipeline.model import JSON, Artifact, Job, StoreUnavailable
from pipeline.progress import JobProgress
from pipeline.request import JobRequest
from pipeline.scheduler import SLIDING_WINDOW, Scheduler
from pipeline.step_exec import StepExecutor, StepFailed
from pipeline.transitions import end_job, job_error
from pipeline.views import status_event
from pipeline.vocabulary import ACTIVE_STATUSES, ErrorCode, EventType, JobStatus, StepState

log = structlog.get_logger(__name__)


class JobRun:
    """The state of one delivery of ``job`` (already counted as this delivery's
    attempt). ``deadline_cap`` (epoch seconds) ends the run earlier than the job's
    own deadline: a Lambda invocation's time limit."""

    def __init__(
        self,
        job: Job,
        deps: Deps,
        *,
        scheduler: Scheduler = SLIDING_WINDOW,
        deadline_cap: float | None = None,
    ) -> None:
        self.job = job
        self.job_id = job.id
        self.deps = deps
        self.store = deps.store
        self.scheduler = scheduler
        self.request = JobRequest.from_dict(job.request)
        started = job.started_at if job.started_at is not None else time.time()
        self.started_at = started
        self.own_deadline = started + self.request.timeout_ms / 1000
        self.deadline = self.own_deadline if deadline_cap is None else min(self.own_deadline, deadline_cap)
        self.limit = self.request.parallel_limit
        self.done: dict[str, Artifact] = {}
        """Finished steps -> artifact, from the moment the artifact is made."""
        self.state = JobProgress(job)
        routes = ((s, deps.config.model_for(s)) for s in LLM_STEPS)
        self.priority = remaining_chain(deps.latency.weights(routes))
        self.writes = CommitBuffer(deps.store, job.id, job.attempts, self.state.fields, self.state.status)
        self.executor = StepExecutor(
            job.id, self.request, deps, self.done, self.deadline, self._trace,
            budget=JobBudget.of(deps, job, self.request),
        )
        self._trace_records = 0
        self._cache_hits = 0
        """Trace records this delivery made: (all, cache hits)."""

    async def execute(self, checkpoints: list[Artifact]) -> Job | None:
        """Run the delivery from ``checkpoints``, the job's stored artifacts.

        The write that marks the job running goes out without being waited for:
        every later commit of the run waits for it first and takes in its outcome,
        so the first steps start at once, and a job that is no longer active stops
        the run at its first commit.

        That write counts this delivery's attempt on condition that no other
        delivery counted one since the job was read, and every later write is on
        condition that the count is still this delivery's: a delivery taken over
        by another (its worker stalled past the heartbeat) writes nothing more."""
        self._load_checkpoints(checkpoints)
        log.info(
            "job_started",
            job_id=self.job_id,
            attempt=self.job.attempts,
            resumed_steps=len(self.done),
            parallel_limit=self.limit,
            provider=self.deps.llm.name,
        )
        self.writes.start(
            self.store.update(
                self.job_id,
                expect=ACTIVE_STATUSES,
                expect_attempts=self.job.attempts - 1,
                events=[self.state.status()],
                status=JobStatus.RUNNING,
                attempts=self.job.attempts,
                started_at=self.started_at,
                **self.state.fields(),
            )
        )
        try:
            return await self._run()
        finally:
            await self.writes.close()

    async def _run(self) -> Job | None:
        if time.time() >= self.deadline:
            return await self._fail(job_error(ErrorCode.TIMEOUT, self._timeout_message()))
        schedule = asyncio.create_task(self.scheduler(self), name=f"job:{self.job_id}:schedule")
        watch = cancel_watch(self.store)
        cancelled = watch.add(self.job_id, self.deps.config.cancel_poll_s)
        try:
            waited: set[asyncio.Future[Any]] = {schedule, cancelled, self.writes.failed}
            await asyncio.wait(
                waited,
                timeout=max(0.0, self.deadline - time.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            await stop_tasks(schedule)
            handoff = {"handoffs": self.job.handoffs + 1} if self.deps.stopping() else None
            await self.writes.flush_interrupted(handoff)
            log.info("job_interrupted", job_id=self.job_id, finished_steps=len(self.done))
            raise
        finally:
            watch.remove(self.job_id)
        if schedule.done():
            return await self._settle(schedule.exception(), schedule)
        if self.writes.failed.done():
            await stop_tasks(schedule)
            return await self._settle(self.writes.failed.exception(), None)
        step = self.state.active_step()
        await stop_tasks(schedule)
        if cancelled.done():
            error = job_error(ErrorCode.CANCELLED, "cancelled on request", step)
            return await self._fail(error, JobStatus.CANCELLED)
        return await self._fail(job_error(ErrorCode.TIMEOUT, self._timeout_message(), step))

    async def _settle(
        self, exc: BaseException | None, schedule: asyncio.Task[Artifact] | None
    ) -> Job | None:
        if exc is None and schedule is not None:
            return await self._complete(schedule.result())
        if isinstance(exc, StepFailed):
            return await self._fail(exc.error)
        if isinstance(exc, Stopped):
            log.info("job_taken_over", job_id=self.job_id)
            return await self.store.get(self.job_id)
        if isinstance(exc, StoreUnavailable):
            raise exc
        log.error("job_crashed", job_id=self.job_id, exc_info=exc)
        return await self._fail(job_error(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))

    def _timeout_message(self) -> str:
        if self.deadline < self.own_deadline:
            return (
                f"job reached the worker's time limit (the Lambda timeout) before its "
                f"deadline of {self.request.timeout_ms} ms; use a shorter timeout_ms"
            )
        return f"job did not finish within its deadline of {self.request.timeout_ms} ms"

    def _load_checkpoints(self, checkpoints: list[Artifact]) -> None:
        stored = {a.name: a for a in checkpoints}
        for step in STEPS:
            artifact = stored.get(step.artifact)
            if artifact is not None and verify_artifact(artifact):
                self.done[step.name] = artifact
        self.state.resumed(set(self.done))

    # -- what the scheduler drives (pipeline.scheduler.StepHost) ----------

    async def start_free_steps(self, seen: set[str]) -> list[Step]:
        """Mark newly ready steps seen: run code steps and serve cache hits at once
        (which may make more steps ready), and return the LLM steps that need a slot.
        The cache is asked about all newly ready steps in one lookup. Code steps run
        inline: they are short, and a task would cost their dependents a loop turn."""
        need_slot: list[Step] = []
        progressed = True
        while progressed:
            progressed = False
            llm_ready: list[Step] = []
            done = self.done.keys()
            for step in [s for s in STEPS if s.name not in seen and done >= DEPENDS_ON[s.name]]:
                seen.add(step.name)
                if step.uses_llm:
                    llm_ready.append(step)
                else:
                    self.run_code_step(step)
                    progressed = True
            hits: list[tuple[Step, Artifact]] = []
            for step, hit in zip(llm_ready, await self.executor.cached(llm_ready), strict=True):
                if hit is None:
                    need_slot.append(step)
                else:
                    hits.append((step, hit))
            for step, hit in hits:
                self._finish(step, hit, cached=True)
                progressed = True
        return need_slot

    async def run_step(self, step: Step) -> Artifact:
        """Produce, store and announce the artifact of one step."""
        if not step.uses_llm:
            return self.run_code_step(step)
        self._mark_started(step)
        artifact = await self.executor.call(step)
        self._finish(step, artifact, cached=False)
        return artifact

    def run_code_step(self, step: Step) -> Artifact:
        """``run_step`` of a step computed here (no LLM): it does not wait for anything."""
        self._mark_started(step)
        artifact = self.executor.compute(step)
        self._finish(step, artifact, cached=False)
        return artifact

    # -- bookkeeping ------------------------------------------------------

    def _trace(self, record: JSON) -> None:
        """Trace sink of this job's LLM calls: a successful call's record goes out with
        its step's artifact; others (errors, invalid answers) within the delay."""
        self._trace_records += 1
        self.writes.buffer(traces=[record])
        if record.get("outcome") != "ok":
            self.writes.flush_soon()

    def _mark_started(self, step: Step) -> None:
        if self.writes.stopped:
            raise Stopped
        self.state.started(step)
        self.writes.buffer(events=[STATUS_AT_COMMIT])
        self.writes.flush_soon()
        log.info("step_started", job_id=self.job_id, step=step.name, display=step.display)

    def _finish(self, step: Step, artifact: Artifact, *, cached: bool) -> None:
        """Checkpoint: the artifact (and cache entry, trace) is stored by the same
        commit that marks the step done, and before the job's state changes. The
        final step's commit is the job's completion (``_complete``).

        The commit is written behind: steps that depend on this one start at once,
        without waiting for the store. Commits of a job go out one at a time in
        order, so a later step's checkpoint never lands before this one; a failed
        commit ends the run. Steps ending in the same event-loop turn share one commit."""
        self.done[step.name] = artifact
        self.state.finished_step(step, cached=cached)
        traces: list[JSON] = []
        if cached:
            traces.append(cache_hit_record(self.deps, step.name))
            self._trace_records += 1
            self._cache_hits += 1
        fresh = step.uses_llm and not cached
        generation = self.writes.buffer(
            events=[(EventType.ARTIFACT, artifact.meta()), STATUS_AT_COMMIT],
            artifacts=[artifact],
            cache=[(self.executor.cache_key(step), artifact)] if fresh else [],
            traces=traces,
        )
        if step.name != FINAL_STEP:
            self.writes.write_behind(generation)
        log.info(
            "step_finished",
            job_id=self.job_id,
            step=step.name,
            artifact=artifact.name,
            hash=artifact.hash,
            size=artifact.size,
            cached=cached,
            progress=self.state.progress["percentage"],
        )

    async def _trace_counts(self) -> tuple[int, int]:
        """(cache hits, LLM calls) in the job's whole trace. A first delivery made
        every record itself; a later one reads the trace for the earlier ones."""
        if self.job.attempts <= 1:
            return self._cache_hits, self._trace_records - self._cache_hits
        trace = await self.store.get_trace(self.job_id)
        pending_records = self.writes.pending_traces()
        hits = sum(1 for r in trace if r.get("cache_hit"))
        pending = sum(1 for r in pending_records if r.get("cache_hit"))
        return hits + pending, len(trace) + len(pending_records) - hits - pending

    async def _complete(self, dossier: Artifact) -> Job | None:
        """One commit stores what is buffered (the final artifact among it) and
        the completed job with its ``status``, ``result`` and ``done`` events."""
        now = time.time()
        cache_hits, llm_calls = await self._trace_counts()
        meta = {
            "duration_ms": round((now - self.started_at) * 1000),
            "cache_hits": cache_hits,
            "llm_calls": llm_calls,
            "provider": self.deps.llm.name,
            "offline": self.deps.llm.name == "offline",
        }
        result = {"success": True, "data": dossier.data, "meta": meta}
        progress = {"step": STEP_BY_NAME[FINAL_STEP].display, "percentage": 100,
                    "currentStep": TOTAL_STEPS, "totalSteps": TOTAL_STEPS}
        changes: JSON = {
            "status": JobStatus.COMPLETED,
            "completed_at": now,
            "result": result,
            "progress": progress,
            "steps": dict(self.state.steps),
            "updated_at": now,
        }
        completed = replace(self.job, **changes)
        events: list[tuple[str, JSON]] = [
            (EventType.STATUS, status_event(completed)),
            (EventType.RESULT, result),
            (EventType.DONE, {"status": JobStatus.COMPLETED}),
        ]
        try:
            await self.writes.flush(changes=changes, events=events)
        except Stopped:
            return await self.store.get(self.job_id)
        log.info("job_completed", job_id=self.job_id, **meta)
        return completed

    async def _fail(self, error: JSON, status: JobStatus = JobStatus.FAILED) -> Job | None:
        with contextlib.suppress(Stopped):
            await self.writes.flush()  # buffered traces and marks first, in order
        # Steps cut off by the deadline failed; steps aborted because another one
        # failed, or by a cancel, simply never finished.
        timed_out = error["code"] == ErrorCode.TIMEOUT
        self.state.aborted(StepState.FAILED if timed_out else StepState.PENDING)
        if status == JobStatus.FAILED and error.get("step"):
            self.state.steps[str(error["step"])] = StepState.FAILED
        current = replace(self.job, **self.state.fields())
        return await end_job(
            self.store, current, status, error, frozenset({JobStatus.RUNNING}),
            steps=dict(self.state.steps),
        )
