"""``run_job``: one delivery of a job, from the queue to a final status.

A delivery loads the job, resumes from the artifacts already stored (each is a
checkpoint), and runs the remaining steps with a sliding window: a step starts as
soon as its inputs exist and one of ``parallel_limit`` LLM slots is free, the
step with the longest remaining chain first. Three things end a delivery early:
the deadline (job fails with ``timeout``), the cancel flag (job ``cancelled``),
and cancellation of ``run_job`` itself (worker shutdown: the job stays
``running`` for the next delivery to resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import structlog

from adapters.constants import (
    ACTIVE_STATUSES,
    CANCELLED,
    COMPLETED,
    EV_ARTIFACT,
    EV_DONE,
    EV_ERROR,
    EV_RESULT,
    EV_STATUS,
    FAILED,
    RUNNING,
    TERMINAL_STATUSES,
)
from adapters.ports import JSON, Artifact, Job, LLMError, StoreUnavailable
from pipeline.deps import Deps
from pipeline.graph import (
    FINAL_STEP,
    LLM_STEPS,
    SECTION_STEPS,
    STEP_BY_NAME,
    STEP_ORDER,
    STEPS,
    TOTAL_STEPS,
    Step,
    remaining_chain,
)
from pipeline.hashing import cache_key, make_artifact, verify_artifact
from pipeline.llm_call import StepCall, call_llm_step, record_cache_hit
from pipeline.prompts import prompt_version
from pipeline.request import JobRequest, RequestInvalid
from pipeline.steps import assemble_dossier, build_pitch
from pipeline.validation import validate_sections
from pipeline.views import initial_progress, initial_steps, status_event

log = structlog.get_logger(__name__)

PENDING, STEP_RUNNING, STEP_COMPLETED, STEP_CACHED, STEP_FAILED = (
    "pending",
    "running",
    "completed",
    "cached",
    "failed",
)


class StepFailed(Exception):
    """A step could not produce its artifact; the job fails with this error."""

    def __init__(self, code: str, message: str, step: str | None) -> None:
        super().__init__(message)
        self.error: JSON = {"code": code, "message": message, "step": step}


class _Stopped(Exception):
    """A conditional job write found another status: someone else owns the job now."""


def _error(code: str, message: str, step: str | None = None) -> JSON:
    return {"code": code, "message": message, "step": step}


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have unwound (in-flight calls aborted)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _end(
    deps: Deps, job_id: str, status: str, error: JSON, expect: frozenset[str], **changes: Any
) -> Job | None:
    """Move a job to ``failed``/``cancelled`` and publish ``status``, ``error``, ``done``."""
    store = deps.store
    job = await store.update(
        job_id, expect=expect, status=status, error=error, completed_at=time.time(), **changes
    )
    if job is None:
        return await store.get(job_id)
    await store.append_event(job_id, EV_STATUS, status_event(job))
    await store.append_event(job_id, EV_ERROR, error)
    await store.append_event(job_id, EV_DONE, {"status": status})
    event = "job_cancelled" if status == CANCELLED else "job_failed"
    log.info(event, job_id=job_id, code=error["code"], step=error["step"], message=error["message"])
    return job


async def fail_active_job(deps: Deps, job_id: str, code: str, message: str) -> Job | None:
    """Fail a job that is still queued or running from outside a delivery (a lost
    worker, a poison message): steps left running are marked failed."""
    job = await deps.store.get(job_id)
    if job is None or not job.active:
        return job
    steps = dict(job.steps)
    running = [name for name, state in steps.items() if state == STEP_RUNNING]
    for name in running:
        steps[name] = STEP_FAILED
    error = _error(code, message, running[0] if running else None)
    return await _end(deps, job_id, FAILED, error, ACTIVE_STATUSES, steps=steps)


class JobRun:
    """The state of one delivery. ``schedule`` is the policy; the bench subclasses it
    to compare with the old batch scheduler on the same step code."""

    def __init__(self, job: Job, deps: Deps) -> None:
        self.job = job
        self.deps = deps
        self.store = deps.store
        self.request = JobRequest.from_dict(job.request)
        started = job.started_at if job.started_at is not None else time.time()
        self.started_at = started
        self.deadline = started + self.request.timeout_ms / 1000
        self.limit = self.request.parallel_limit
        self.done: dict[str, Artifact] = {}
        self.steps: dict[str, str] = {**initial_steps(), **job.steps}
        self.progress: JSON = dict(job.progress) or initial_progress()
        self.running: dict[str, float] = {}
        """Steps in progress -> monotonic start time."""
        routes = ((s, deps.config.model_for(s)) for s in LLM_STEPS)
        self.priority = remaining_chain(deps.latency.weights(routes))
        """Longest remaining chain per step, weighted by the durations seen so far."""
        self._write_lock = asyncio.Lock()

    # -- delivery ---------------------------------------------------------

    async def execute(self) -> Job | None:
        await self._load_checkpoints()
        log.info(
            "job_started",
            job_id=self.job.id,
            attempt=self.job.attempts,
            resumed_steps=len(self.done),
            parallel_limit=self.limit,
            provider=self.deps.llm.name,
        )
        try:
            await self._write()
        except _Stopped:
            return await self.store.get(self.job.id)
        if time.time() >= self.deadline:
            return await self._fail(_error("timeout", self._timeout_message(), None))
        schedule = asyncio.create_task(self.schedule(), name=f"job:{self.job.id}:schedule")
        watcher = asyncio.create_task(self._watch_cancel(), name=f"job:{self.job.id}:cancel")
        try:
            await asyncio.wait(
                {schedule, watcher},
                timeout=max(0.0, self.deadline - time.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            await _stop(schedule, watcher)
            log.info("job_interrupted", job_id=self.job.id, finished_steps=len(self.done))
            raise
        if schedule.done():
            await _stop(watcher)
            return await self._settle(schedule)
        step = self._active_step()
        await _stop(schedule)
        if watcher.done():
            exc = watcher.exception()
            if exc is not None:
                raise exc
            return await self._fail(_error("cancelled", "cancelled on request", step), CANCELLED)
        await _stop(watcher)
        return await self._fail(_error("timeout", self._timeout_message(), step))

    async def _settle(self, schedule: asyncio.Task[Artifact]) -> Job | None:
        exc = schedule.exception()
        if exc is None:
            return await self._complete(schedule.result())
        if isinstance(exc, StepFailed):
            return await self._fail(exc.error)
        if isinstance(exc, _Stopped):
            log.info("job_taken_over", job_id=self.job.id)
            return await self.store.get(self.job.id)
        if isinstance(exc, StoreUnavailable):
            raise exc
        log.error("job_crashed", job_id=self.job.id, exc_info=exc)
        return await self._fail(_error("internal_error", f"{type(exc).__name__}: {exc}", None))

    async def _watch_cancel(self) -> None:
        """Poll the cancel flag: it lives in the store, written by another process."""
        while True:
            if await self.store.cancel_requested(self.job.id):
                return
            await asyncio.sleep(self.deps.config.cancel_poll_s)

    def _timeout_message(self) -> str:
        return f"job did not finish within its deadline of {self.request.timeout_ms} ms"

    def _active_step(self) -> str | None:
        if not self.running:
            return None
        return min(self.running, key=lambda name: self.running[name])

    async def _load_checkpoints(self) -> None:
        stored = {a.name: a for a in await self.store.list_artifacts(self.job.id)}
        for step in STEPS:
            artifact = stored.get(step.artifact)
            if artifact is not None and verify_artifact(artifact):
                self.done[step.name] = artifact
                if self.steps[step.name] not in (STEP_COMPLETED, STEP_CACHED):
                    self.steps[step.name] = STEP_COMPLETED
            else:
                self.steps[step.name] = PENDING

    # -- scheduling -------------------------------------------------------

    def ready(self, seen: set[str]) -> list[Step]:
        """Steps not yet seen whose inputs all exist, in graph order."""
        return [
            s
            for s in STEPS
            if s.name not in seen and all(d in self.done for d in s.depends_on)
        ]

    async def schedule(self) -> Artifact:
        """Sliding window: refill free LLM slots whenever any step ends, highest
        remaining-chain priority first. Code steps and cache hits take no slot."""
        tasks: dict[asyncio.Task[Artifact], Step] = {}
        waiting: list[tuple[float, int, str]] = []
        seen: set[str] = set(self.done)
        llm_running = 0
        try:
            while FINAL_STEP not in self.done:
                for step in await self.start_free_steps(seen, tasks):
                    rank = (-self.priority[step.name], STEP_ORDER[step.name], step.name)
                    heapq.heappush(waiting, rank)
                while waiting and llm_running < self.limit:
                    step = STEP_BY_NAME[heapq.heappop(waiting)[2]]
                    tasks[asyncio.create_task(self.run_step(step))] = step
                    llm_running += 1
                if not tasks:
                    raise RuntimeError("scheduler stalled: no step ready")
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if tasks.pop(task).uses_llm:
                        llm_running -= 1
                    task.result()
            return self.done[FINAL_STEP]
        finally:
            await _stop(*tasks)

    async def start_free_steps(
        self, seen: set[str], tasks: dict[asyncio.Task[Artifact], Step]
    ) -> list[Step]:
        """Mark newly ready steps seen: start code steps, serve cache hits at once
        (which may make more steps ready), and return the LLM steps that need a slot."""
        need_slot: list[Step] = []
        progressed = True
        while progressed:
            progressed = False
            for step in self.ready(seen):
                seen.add(step.name)
                if not step.uses_llm:
                    tasks[asyncio.create_task(self.run_step(step))] = step
                    continue
                hit = await self._cache_lookup(step)
                if hit is None:
                    need_slot.append(step)
                else:
                    await self._finish(step, hit, cached=True)
                    progressed = True
        return need_slot

    # -- steps ------------------------------------------------------------

    def inputs(self, step: Step) -> dict[str, Any]:
        """Artifact name -> data of exactly the steps ``step`` depends on."""
        return {self.done[d].name: self.done[d].data for d in step.depends_on}

    def cache_key(self, step: Step) -> str:
        language = self.request.language
        return cache_key(
            step.name,
            prompt_version(step.name, language),
            self.deps.config.model_for(step.name),
            language,
            {self.done[d].name: self.done[d].hash for d in step.depends_on},
        )

    async def run_step(self, step: Step) -> Artifact:
        """Produce, store and announce the artifact of one step."""
        await self._mark_started(step)
        if step.uses_llm:
            call = StepCall(self.job.id, step.name, self.request.language, self.inputs(step),
                            self.deadline)
            started = time.monotonic()
            try:
                data = await call_llm_step(self.deps, call)
            except LLMError as exc:
                raise StepFailed(exc.code, exc.message, step.name) from exc
            model = self.deps.config.model_for(step.name)
            self.deps.latency.observe(step.name, model, time.monotonic() - started)
        else:
            try:
                data = self._compute(step)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                raise StepFailed("internal_error", message, step.name) from exc
        artifact = make_artifact(step.artifact, step.artifact_type, data)
        await self._finish(step, artifact, cached=False)
        return artifact

    def _compute(self, step: Step) -> Any:
        if step.name == "input":
            return build_pitch(self.request)
        if step.name == "validate":
            return validate_sections({n: self.done[n].data for n in SECTION_STEPS})
        if step.name == "assemble":
            return assemble_dossier(
                {a.name: a.data for a in self.done.values()},
                provider=self.deps.llm.name,
                models={s: self.deps.config.model_for(s) for s in LLM_STEPS},
            )
        raise ValueError(f"no code for step {step.name}")

    async def _cache_lookup(self, step: Step) -> Artifact | None:
        if self.request.skip_cache:
            return None
        hit = await self.store.cache_get(self.cache_key(step))
        if hit is None or hit.name != step.artifact or not verify_artifact(hit):
            return None
        return make_artifact(step.artifact, step.artifact_type, hit.data)

    # -- bookkeeping ------------------------------------------------------

    def _next_progress(self, started: Step | None) -> JSON:
        finished = len(self.done)
        previous = self.progress
        if self.running:
            display = STEP_BY_NAME[max(self.running, key=lambda n: self.running[n])].display
        elif started is not None:
            display = started.display
        else:
            display = str(previous.get("step", STEPS[0].display))
        percentage = round(finished * 100 / TOTAL_STEPS)
        current = min(finished + 1, TOTAL_STEPS)
        return {
            "step": display,
            "percentage": max(percentage, int(previous.get("percentage", 0))),
            "currentStep": max(current, int(previous.get("currentStep", 1))),
            "totalSteps": TOTAL_STEPS,
        }

    async def _write(self, *events: tuple[str, JSON]) -> Job:
        """Store steps and progress (only while the job is running), then append
        ``events`` and a ``status`` event. Caller holds no lock; this takes it so
        job writes and the event log keep one order."""
        async with self._write_lock:
            job = await self.store.update(
                self.job.id, expect={RUNNING}, steps=dict(self.steps), progress=dict(self.progress)
            )
            if job is None:
                raise _Stopped
            for kind, data in events:
                await self.store.append_event(self.job.id, kind, data)
            await self.store.append_event(self.job.id, EV_STATUS, status_event(job))
            return job

    async def _mark_started(self, step: Step) -> None:
        self.steps[step.name] = STEP_RUNNING
        self.running[step.name] = time.monotonic()
        self.progress = self._next_progress(step)
        await self._write()
        log.info("step_started", job_id=self.job.id, step=step.name, display=step.display)

    async def _finish(self, step: Step, artifact: Artifact, *, cached: bool) -> None:
        await self.store.put_artifact(self.job.id, artifact)
        if cached:
            await record_cache_hit(self.deps, self.job.id, step.name)
        elif step.uses_llm:
            await self.store.cache_put(self.cache_key(step), artifact)
        self.done[step.name] = artifact
        self.running.pop(step.name, None)
        self.steps[step.name] = STEP_CACHED if cached else STEP_COMPLETED
        self.progress = self._next_progress(step if cached else None)
        await self._write((EV_ARTIFACT, artifact.meta()))
        log.info(
            "step_finished",
            job_id=self.job.id,
            step=step.name,
            artifact=artifact.name,
            hash=artifact.hash,
            size=artifact.size,
            cached=cached,
            progress=self.progress["percentage"],
        )

    async def _complete(self, dossier: Artifact) -> Job | None:
        now = time.time()
        trace = await self.store.get_trace(self.job.id)
        meta = {
            "duration_ms": round((now - self.started_at) * 1000),
            "cache_hits": sum(1 for r in trace if r.get("cache_hit")),
            "llm_calls": sum(1 for r in trace if not r.get("cache_hit")),
            "provider": self.deps.llm.name,
            "offline": self.deps.llm.name == "offline",
        }
        result = {"success": True, "data": dossier.data, "meta": meta}
        progress = {"step": STEP_BY_NAME[FINAL_STEP].display, "percentage": 100,
                    "currentStep": TOTAL_STEPS, "totalSteps": TOTAL_STEPS}
        job = await self.store.update(
            self.job.id,
            expect={RUNNING},
            status=COMPLETED,
            completed_at=now,
            result=result,
            progress=progress,
            steps=dict(self.steps),
        )
        if job is None:
            return await self.store.get(self.job.id)
        await self.store.append_event(self.job.id, EV_STATUS, status_event(job))
        await self.store.append_event(self.job.id, EV_RESULT, result)
        await self.store.append_event(self.job.id, EV_DONE, {"status": COMPLETED})
        log.info("job_completed", job_id=self.job.id, **meta)
        return job

    async def _fail(self, error: JSON, status: str = FAILED) -> Job | None:
        # Steps cut off by the deadline failed; steps aborted because another one
        # failed, or by a cancel, simply never finished.
        aborted = STEP_FAILED if error["code"] == "timeout" else PENDING
        for name, state in self.steps.items():
            if state == STEP_RUNNING:
                self.steps[name] = aborted
        if status == FAILED and error.get("step"):
            self.steps[str(error["step"])] = STEP_FAILED
        return await _end(
            self.deps, self.job.id, status, error, frozenset({RUNNING}), steps=dict(self.steps)
        )


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


async def run_job(job_id: str, deps: Deps, *, run_cls: type[JobRun] = JobRun) -> Job | None:
    """Run one delivery of ``job_id``; returns the job as left, ``None`` if unknown.

    Cancelling this coroutine (worker shutdown) leaves the job ``running`` and
    re-raises, so the queue's redelivery resumes it from its checkpoints.
    """
    async with _exclusive(job_id):
        return await _deliver(job_id, deps, run_cls)


async def _deliver(job_id: str, deps: Deps, run_cls: type[JobRun]) -> Job | None:
    store = deps.store
    job = await store.get(job_id)
    if job is None:
        log.warning("job_unknown", job_id=job_id)
        return None
    if job.status in TERMINAL_STATUSES:
        return job
    if await store.cancel_requested(job_id):
        return await _end(
            deps, job_id, CANCELLED, _error("cancelled", "cancelled before it started"),
            ACTIVE_STATUSES,
        )
    attempts = job.attempts + 1
    if attempts > deps.config.job_max_attempts:
        running = [n for n, s in job.steps.items() if s == STEP_RUNNING]
        message = f"the worker was lost {job.attempts} times; giving up"
        return await _end(
            deps, job_id, FAILED, _error("worker_lost", message, running[0] if running else None),
            ACTIVE_STATUSES, attempts=attempts,
        )
    started = job.started_at if job.started_at is not None else time.time()
    job = await store.update(
        job_id, expect=ACTIVE_STATUSES, status=RUNNING, attempts=attempts, started_at=started
    )
    if job is None:
        return await store.get(job_id)
    try:
        run = run_cls(job, deps)
    except RequestInvalid as exc:
        message = f"stored request no longer valid: {exc}"
        return await _end(
            deps, job_id, FAILED, _error("invalid_request", message), frozenset({RUNNING})
        )
    return await run.execute()
