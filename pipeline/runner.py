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
import functools
import heapq
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
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
from adapters.ports import JSON, Artifact, Job, JobStore, LLMError, StoreUnavailable
from pipeline.deps import Deps
from pipeline.graph import (
    DEPENDS_ON,
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
from pipeline.llm_call import StepCall, cache_hit_record, call_llm_step
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


START_MARK_DELAY_S = 0.5
"""How long a step's "running" mark (its ``status`` event and steps state) may wait
in the write buffer for the write that ends the step. Steps faster than this cost
one store round trip instead of two; a slower one shows as running after this."""
INTERRUPTED_FLUSH_S = 2.0
"""On worker shutdown, the longest a delivery tries to store what it buffered."""


class StepFailed(Exception):
    """A step could not produce its artifact; the job fails with this error."""

    def __init__(self, code: str, message: str, step: str | None) -> None:
        super().__init__(message)
        self.error: JSON = {"code": code, "message": message, "step": step}


class _Stopped(Exception):
    """A conditional job write found another status, or another delivery's attempt:
    someone else owns the job now."""


async def _outcome(task: asyncio.Future[Any]) -> Any:
    """``task``'s result; cancelling the caller does not cancel ``task``. What
    ``asyncio.shield`` does, with one future and one callback instead of two each
    (it runs once per commit; shield was ~3 % of samples in a py-spy profile of 200
    jobs in process)."""
    if not task.done():
        waiter = asyncio.get_running_loop().create_future()
        wake = functools.partial(_wake, waiter)
        task.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError:
            task.remove_done_callback(wake)
            raise
    return task.result()


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _error(code: str, message: str, step: str | None = None) -> JSON:
    return {"code": code, "message": message, "step": step}


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have unwound (in-flight calls aborted)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _end(
    deps: Deps, job: Job, status: str, error: JSON, expect: frozenset[str], **changes: Any
) -> Job | None:
    """Move ``job`` (as last read or written) to ``failed``/``cancelled`` and publish
    ``status``, ``error``, ``done`` with the same store write."""
    now = time.time()
    ended = replace(job, status=status, error=error, completed_at=now, **changes)
    events = [
        (EV_STATUS, status_event(ended)),
        (EV_ERROR, error),
        (EV_DONE, {"status": status}),
    ]
    stored = await deps.store.update(
        job.id, expect=expect, events=events, status=status, error=error, completed_at=now,
        **changes,
    )
    if stored is None:
        return await deps.store.get(job.id)
    event = "job_cancelled" if status == CANCELLED else "job_failed"
    log.info(event, job_id=job.id, code=error["code"], step=error["step"], message=error["message"])
    return stored


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
    return await _end(deps, job, FAILED, error, ACTIVE_STATUSES, steps=steps)


class JobRun:
    """The state of one delivery. ``schedule`` is the policy; the bench subclasses it
    to compare with the old batch scheduler on the same step code.

    Store writes go through a small write-behind buffer (``_buffer`` / ``_flush``):
    events, artifacts, cache entries and trace records wait there and go out with
    the next :meth:`JobStore.commit`, which also stores the job's ``steps`` and
    ``progress`` as they are then, in one round trip. A step's end is flushed at
    once, behind the run (nothing waits for it; see ``_finish``); a step's
    "running" mark waits up to
    ``START_MARK_DELAY_S`` for such a write to ride along with. Events keep the
    order they were buffered in.
    """

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
        """Finished steps -> artifact, from the moment the artifact is made."""
        self.fresh: set[str] = set()
        """LLM steps whose artifact a call of this delivery made (not the cache)."""
        self.steps: dict[str, str] = {**initial_steps(), **job.steps}
        self.progress: JSON = dict(job.progress) or initial_progress()
        self.running: dict[str, float] = {}
        """Steps in progress -> monotonic start time."""
        routes = ((s, deps.config.model_for(s)) for s in LLM_STEPS)
        self.priority = remaining_chain(deps.latency.weights(routes))
        """Longest remaining chain per step, weighted by the durations seen so far."""
        self._write_lock = asyncio.Lock()
        self._events: list[tuple[str, JSON]] = []
        self._artifacts: list[Artifact] = []
        self._cache: list[tuple[str, Artifact]] = []
        self._traces: list[JSON] = []
        self._buffered = 0
        """Generation of the last write buffered; ``_written`` of the last one stored."""
        self._written = 0
        self._unwritten_since: float | None = None
        self._timer: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None
        """The last commit if its flush did not see it end (cut off, or written behind)."""
        self._stopped = False
        self._lost: BaseException | None = None
        """Why a commit that carried artifacts failed: no later commit may land."""
        self._writes: set[asyncio.Task[None]] = set()
        self._write_failed: asyncio.Future[None] | None = None
        self._cache_keys: dict[str, str] = {}
        self._status_of: Job | None = None
        self._status_base: JSON = {}
        self._all_pending = initial_steps()
        self._trace_records = 0
        self._cache_hits = 0
        """Trace records this delivery made: (all, cache hits)."""

    # -- delivery ---------------------------------------------------------

    async def execute(self, checkpoints: list[Artifact]) -> Job | None:
        """Run the delivery from ``checkpoints``, the job's stored artifacts.

        The write that marks the job running goes out without being waited for:
        every later commit of the run waits for it first and takes in its outcome
        (:meth:`_settle_cut_off_commit`), so the first steps start at once, and a
        job that is no longer active stops the run at its first commit.

        That write counts this delivery's attempt on condition that no other
        delivery counted one since the job was read, and every later write is on
        condition that the count is still this delivery's: a delivery taken over
        by another (its worker stalled past the heartbeat) writes nothing more."""
        self._load_checkpoints(checkpoints)
        log.info(
            "job_started",
            job_id=self.job.id,
            attempt=self.job.attempts,
            resumed_steps=len(self.done),
            parallel_limit=self.limit,
            provider=self.deps.llm.name,
        )
        self._inflight = asyncio.ensure_future(
            self.store.update(
                self.job.id,
                expect=ACTIVE_STATUSES,
                expect_attempts=self.job.attempts - 1,
                events=[self._status()],
                status=RUNNING,
                attempts=self.job.attempts,
                started_at=self.started_at,
                steps=dict(self.steps),
                progress=dict(self.progress),
            )
        )
        try:
            return await self._run()
        finally:
            # Each final write (completion, failure, shutdown flush) went after these
            # under the write lock; what is left of them has nothing more to write.
            await _stop(*self._writes, *([self._timer] if self._timer else []))

    async def _run(self) -> Job | None:
        if time.time() >= self.deadline:
            return await self._fail(_error("timeout", self._timeout_message(), None))
        schedule = asyncio.create_task(self.schedule(), name=f"job:{self.job.id}:schedule")
        watch = _cancel_watch(self.store)
        cancelled = watch.add(self.job.id, self.deps.config.cancel_poll_s)
        try:
            waited: set[asyncio.Future[Any]] = {schedule, cancelled}
            await asyncio.wait(
                waited,
                timeout=max(0.0, self.deadline - time.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            await _stop(schedule)
            await self._flush_interrupted()
            log.info("job_interrupted", job_id=self.job.id, finished_steps=len(self.done))
            raise
        finally:
            watch.remove(self.job.id)
        if schedule.done():
            return await self._settle(schedule)
        step = self._active_step()
        await _stop(schedule)
        if cancelled.done():
            return await self._fail(_error("cancelled", "cancelled on request", step), CANCELLED)
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

    def _timeout_message(self) -> str:
        return f"job did not finish within its deadline of {self.request.timeout_ms} ms"

    def _active_step(self) -> str | None:
        if not self.running:
            return None
        return min(self.running, key=lambda name: self.running[name])

    def _load_checkpoints(self, checkpoints: list[Artifact]) -> None:
        stored = {a.name: a for a in checkpoints}
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
        """Steps not yet seen whose inputs are all made, in graph order."""
        done = self.done.keys()
        return [s for s in STEPS if s.name not in seen and done >= DEPENDS_ON[s.name]]

    async def schedule(self) -> Artifact:
        """Sliding window: ``parallel_limit`` slots, each running one LLM step after
        another, the ready step with the longest remaining chain first. Code steps
        and cache hits take no slot: whoever makes them ready runs them.

        A slot goes from a step's end to its next step's call without giving up the
        event loop (unless the cache must be asked). With many jobs per process the
        step ends arrive in bursts, and every turn given up puts a job behind the
        whole burst; one turn keeps the jobs' calls as spread out as they ended."""
        ready: _ReadySteps = _ReadySteps(self.priority)
        seen: set[str] = set(self.done)
        ready.add(await self.start_free_steps(seen))
        if FINAL_STEP in self.done:
            return self.done[FINAL_STEP]
        write_failed = self._write_failed = asyncio.get_running_loop().create_future()
        slots = {
            asyncio.create_task(self._slot(seen, ready), name=f"job:{self.job.id}:slot")
            for _ in range(self.limit)
        }
        try:
            while FINAL_STEP not in self.done:
                if not slots:
                    raise RuntimeError("scheduler stalled: no step ready")
                waited: list[asyncio.Future[Any]] = [*slots, write_failed]
                finished, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()
                slots.difference_update(finished)
            return self.done[FINAL_STEP]
        finally:
            self._write_failed = None
            write_failed.cancel()
            await _stop(*slots)

    async def _slot(self, seen: set[str], ready: _ReadySteps) -> None:
        """One LLM slot: run ready steps until the job's last step is done."""
        while FINAL_STEP not in self.done:
            step = ready.pop()
            if step is None:
                if not ready.running:
                    break  # nothing ready and nothing that could make a step ready
                await ready.more()
                continue
            ready.running += 1
            try:
                await self.run_step(step)
                ready.add(await self.start_free_steps(seen))
            finally:
                ready.running -= 1
        ready.wake_all()  # the job is done (or stalled): idle slots end too

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
            for step in self.ready(seen):
                seen.add(step.name)
                if step.uses_llm:
                    llm_ready.append(step)
                else:
                    self.run_code_step(step)
                    progressed = True
            hits: list[tuple[Step, Artifact]] = []
            for step, hit in zip(llm_ready, await self._cache_lookup(llm_ready), strict=True):
                if hit is None:
                    need_slot.append(step)
                else:
                    hits.append((step, hit))
            for step, hit in hits:
                self._finish(step, hit, cached=True)
                progressed = True
        return need_slot

    # -- steps ------------------------------------------------------------

    def inputs(self, step: Step) -> dict[str, Any]:
        """Artifact name -> data of exactly the steps ``step`` depends on."""
        return {self.done[d].name: self.done[d].data for d in step.depends_on}

    def cache_key(self, step: Step) -> str:
        key = self._cache_keys.get(step.name)
        if key is None:
            language = self.request.language
            key = self._cache_keys[step.name] = cache_key(
                step.name,
                prompt_version(step.name, language),
                self.deps.config.model_for(step.name),
                language,
                {self.done[d].name: self.done[d].hash for d in step.depends_on},
            )
        return key

    async def run_step(self, step: Step) -> Artifact:
        """Produce, store and announce the artifact of one step."""
        if not step.uses_llm:
            return self.run_code_step(step)
        self._mark_started(step)
        call = StepCall(
            self.job.id,
            step.name,
            self.request.language,
            self.inputs(step),
            self.deadline,
            {self.done[d].name: self.done[d].hash for d in step.depends_on},
            trace=self._trace,
        )
        started = time.monotonic()
        try:
            data = await call_llm_step(self.deps, call)
        except LLMError as exc:
            raise StepFailed(exc.code, exc.message, step.name) from exc
        model = self.deps.config.model_for(step.name)
        self.deps.latency.observe(step.name, model, time.monotonic() - started)
        self.fresh.add(step.name)
        artifact = make_artifact(step.artifact, step.artifact_type, data)
        self._finish(step, artifact, cached=False)
        return artifact

    def run_code_step(self, step: Step) -> Artifact:
        """``run_step`` of a step computed here (no LLM): it does not wait for anything."""
        self._mark_started(step)
        try:
            data = self._compute(step)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            raise StepFailed("internal_error", message, step.name) from exc
        artifact = make_artifact(step.artifact, step.artifact_type, data)
        self._finish(step, artifact, cached=False)
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

    async def _cache_lookup(self, steps: list[Step]) -> list[Artifact | None]:
        """Cached artifacts of ``steps`` (``None`` where there is no valid one).

        A step with an input that an LLM call of this delivery just wrote is not
        looked up: its key holds the hash of that new answer, which an earlier job
        can only have stored if a different prompt drew the very same answer. Not
        asking saves a store round trip between a step's end and its dependents'
        calls, which under load is what a job waits for most."""
        asked = [s for s in steps if not self.fresh.intersection(s.depends_on)]
        if self.request.skip_cache or not asked:
            return [None] * len(steps)
        found = dict(
            zip(asked, await self.store.cache_get_many([self.cache_key(s) for s in asked]),
                strict=True)
        )
        return [
            make_artifact(step.artifact, step.artifact_type, hit.data)
            if (hit := found.get(step)) is not None
            and hit.name == step.artifact
            and verify_artifact(hit)
            else None
            for step in steps
        ]

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

    def _current(self) -> Job:
        """The job as the next commit leaves it (steps and progress as they are now)."""
        return replace(self.job, steps=dict(self.steps), progress=dict(self.progress))

    def _status(self) -> tuple[str, JSON]:
        """A ``status`` event of the job as it is now. Only steps and progress change
        during a run: the rest of the view is built once per ``self.job``."""
        if self._status_of is not self.job:
            self._status_of = self.job
            self._status_base = status_event(self.job)
        view = dict(self._status_base)
        view["progress"] = dict(self.progress)
        view["steps"] = {**self._all_pending, **self.steps}
        return EV_STATUS, view

    def _buffer(
        self,
        events: Iterable[tuple[str, JSON]] = (),
        artifacts: Iterable[Artifact] = (),
        cache: Iterable[tuple[str, Artifact]] = (),
        traces: Iterable[JSON] = (),
    ) -> int:
        """Queue writes for the next commit; returns their generation for ``_flush``."""
        self._events.extend(events)
        self._artifacts.extend(artifacts)
        self._cache.extend(cache)
        self._traces.extend(traces)
        self._buffered += 1
        if self._unwritten_since is None:
            self._unwritten_since = time.monotonic()
        return self._buffered

    async def _flush(
        self,
        upto: int | None = None,
        *,
        changes: JSON | None = None,
        events: list[tuple[str, JSON]] | None = None,
        behind: bool = False,
    ) -> None:
        """Commit everything buffered, unless a commit since generation ``upto`` was
        buffered already carried it. ``changes`` and ``events`` (the job's last
        write) go with it, after what was buffered. Raises :class:`_Stopped` when
        the job is no longer ``running`` (cancelled, failed or finished by someone
        else).

        ``behind``: the caller is a write-behind task, which is cancelled only once
        the delivery has nothing more to write, so its commit needs no task of its
        own to outlive it (one task less per step)."""
        target = self._buffered if upto is None else upto
        async with self._write_lock:
            await self._settle_cut_off_commit()
            if self._stopped:
                raise _Stopped
            if self._written >= target and changes is None:
                return
            if self._lost is not None:
                raise self._lost
            generation = self._buffered
            buffered, self._events = self._events, []
            artifacts, self._artifacts = self._artifacts, []
            cache, self._cache = self._cache, []
            traces, self._traces = self._traces, []
            self._unwritten_since = None
            fields = {"steps": dict(self.steps), "progress": dict(self.progress), **(changes or {})}
            writing = self.store.commit(
                self.job.id,
                expect={RUNNING},
                expect_attempts=self.job.attempts,
                changes=fields,
                events=self._materialized(_last_status_only([*buffered, *(events or ())])),
                artifacts=artifacts,
                cache=cache,
                traces=traces,
            )
            try:
                if behind:
                    held: object = await writing
                else:
                    # A flush cancelled mid-write (deadline, cancel, shutdown) leaves its
                    # commit to finish whole; the next flush waits for it (event order).
                    commit = self._inflight = asyncio.ensure_future(writing)
                    held = await _outcome(commit)
            except Exception as exc:  # not CancelledError: a cut-off commit is settled later
                self._inflight = None
                self._commit_failed(exc, bool(artifacts))
                raise
            self._inflight = None
            if not held:
                self._stopped = True
                raise _Stopped
            self._written = generation

    def _materialized(self, events: list[tuple[str, JSON]]) -> list[tuple[str, JSON]]:
        """``events`` with the status placeholder made into the job's status now."""
        return [self._status() if event is _STATUS_AT_COMMIT else event for event in events]

    async def _settle_cut_off_commit(self) -> None:
        """Wait for a commit no flush saw end, and take in its outcome."""
        commit, self._inflight = self._inflight, None
        if commit is None:
            return
        await asyncio.wait({commit})
        if commit.cancelled():
            return
        exc = commit.exception()
        if exc is not None:
            log.warning("job_commit_failed", job_id=self.job.id, error=str(exc))
            # What it carried is not known here (a step's end, or the "running" mark
            # the run began with): treat it as a checkpoint.
            self._commit_failed(exc, carried_artifacts=True)
        elif not commit.result():
            self._stopped = True

    def _commit_failed(self, exc: BaseException, carried_artifacts: bool) -> None:
        """A lost commit that carried artifacts ends the delivery's writes: a later
        step's checkpoint must never land without the ones before it. (A lost commit
        of start marks and traces only loses status snapshots the next commit
        repeats.) The next delivery resumes from what did land."""
        if carried_artifacts and self._lost is None:
            self._lost = exc

    def _flush_soon(self) -> None:
        """Make sure what is buffered is written within ``START_MARK_DELAY_S``."""
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(
                self._flush_when_due(), name=f"job:{self.job.id}:flush"
            )

    async def _flush_when_due(self) -> None:
        while self._unwritten_since is not None:
            due = self._unwritten_since + START_MARK_DELAY_S - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)
                continue
            try:
                await self._flush()
            except _Stopped:
                return  # the next step's write raises it in the step
            except Exception as exc:  # logged; the next write of the job retries
                log.warning("job_flush_failed", job_id=self.job.id, error=str(exc))
                return

    async def _flush_interrupted(self) -> None:
        """Store what is buffered (start marks, traces of finished calls) and, on the
        process's shutdown, count the hand-back, if that is quick; the next delivery
        resumes either way. An interruption that is not a shutdown (an abort by the
        sweep, a queue timeout), or a hand-back not stored, counts as a lost worker."""
        changes = {"handoffs": self.job.handoffs + 1} if self.deps.stopping() else None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(INTERRUPTED_FLUSH_S):
                await self._flush(changes=changes)

    def _trace(self, record: JSON) -> None:
        """Trace sink of this job's LLM calls: a successful call's record goes out with
        its step's artifact; others (errors, invalid answers) within the delay."""
        self._trace_records += 1
        self._buffer(traces=[record])
        if record.get("outcome") != "ok":
            self._flush_soon()

    def _mark_started(self, step: Step) -> None:
        if self._stopped:
            raise _Stopped
        self.steps[step.name] = STEP_RUNNING
        self.running[step.name] = time.monotonic()
        self.progress = self._next_progress(step)
        self._buffer(events=[_STATUS_AT_COMMIT])
        self._flush_soon()
        log.info("step_started", job_id=self.job.id, step=step.name, display=step.display)

    def _finish(self, step: Step, artifact: Artifact, *, cached: bool) -> None:
        """Checkpoint: the artifact (and cache entry, trace) is stored by the same
        commit that marks the step done, and before the job's state changes. The
        final step's commit is the job's completion (``_complete``).

        The commit is written behind: steps that depend on this one start at once,
        without waiting for the store. Commits of a job go out one at a time in
        order, so a later step's checkpoint never lands before this one; a failed
        commit fails the schedule (:meth:`_write_behind`). Steps ending in the same
        event-loop turn share one commit."""
        generation = self._record_finish(step, artifact, cached=cached)
        if step.name != FINAL_STEP:
            task = asyncio.create_task(self._write_behind(generation))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        self._log_finished(step, artifact, cached=cached)

    async def _write_behind(self, generation: int) -> None:
        try:
            await self._flush(generation, behind=True)
        except Exception as exc:  # handed to the schedule, which ends with it
            failed = self._write_failed
            if failed is not None and not failed.done():
                failed.set_exception(exc)

    def _record_finish(self, step: Step, artifact: Artifact, *, cached: bool) -> int:
        self.done[step.name] = artifact
        self.running.pop(step.name, None)
        self.steps[step.name] = STEP_CACHED if cached else STEP_COMPLETED
        self.progress = self._next_progress(step if cached else None)
        traces: list[JSON] = []
        if cached:
            traces.append(cache_hit_record(self.deps, step.name))
            self._trace_records += 1
            self._cache_hits += 1
        return self._buffer(
            events=[(EV_ARTIFACT, artifact.meta()), _STATUS_AT_COMMIT],
            artifacts=[artifact],
            cache=[(self.cache_key(step), artifact)] if step.uses_llm and not cached else [],
            traces=traces,
        )

    def _log_finished(self, step: Step, artifact: Artifact, *, cached: bool) -> None:
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

    async def _trace_counts(self) -> tuple[int, int]:
        """(cache hits, LLM calls) in the job's whole trace. A first delivery made
        every record itself; a later one reads the trace for the earlier ones."""
        if self.job.attempts <= 1:
            return self._cache_hits, self._trace_records - self._cache_hits
        trace = await self.store.get_trace(self.job.id)
        hits = sum(1 for r in trace if r.get("cache_hit"))
        pending = sum(1 for r in self._traces if r.get("cache_hit"))
        return hits + pending, len(trace) + len(self._traces) - hits - pending

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
            "status": COMPLETED,
            "completed_at": now,
            "result": result,
            "progress": progress,
            "steps": dict(self.steps),
            "updated_at": now,
        }
        completed = replace(self.job, **changes)
        events = [
            (EV_STATUS, status_event(completed)),
            (EV_RESULT, result),
            (EV_DONE, {"status": COMPLETED}),
        ]
        try:
            await self._flush(changes=changes, events=events)
        except _Stopped:
            return await self.store.get(self.job.id)
        log.info("job_completed", job_id=self.job.id, **meta)
        return completed

    async def _fail(self, error: JSON, status: str = FAILED) -> Job | None:
        with contextlib.suppress(_Stopped):
            await self._flush()  # buffered traces and marks first, in order
        # Steps cut off by the deadline failed; steps aborted because another one
        # failed, or by a cancel, simply never finished.
        aborted = STEP_FAILED if error["code"] == "timeout" else PENDING
        for name, state in self.steps.items():
            if state == STEP_RUNNING:
                self.steps[name] = aborted
        if status == FAILED and error.get("step"):
            self.steps[str(error["step"])] = STEP_FAILED
        return await _end(
            self.deps, self._current(), status, error, frozenset({RUNNING}),
            steps=dict(self.steps),
        )


_STATUS_AT_COMMIT: tuple[str, JSON] = (EV_STATUS, {})
"""A buffered ``status`` event, made when its commit goes out: a commit keeps only its
last status (:func:`_last_status_only`), and the state then is the state the last one
was buffered for, since every change of steps or progress buffers one."""


class _ReadySteps:
    """LLM steps waiting for a slot, highest priority first, and the idle slots."""

    def __init__(self, priority: dict[str, float]) -> None:
        self.priority = priority
        self.heap: list[tuple[float, int, str]] = []
        self.idle: list[asyncio.Future[None]] = []
        self.running = 0
        """Slots in a step (its call, or finding what its end made ready)."""

    def add(self, steps: Iterable[Step]) -> None:
        for step in steps:
            heapq.heappush(self.heap, (-self.priority[step.name], STEP_ORDER[step.name], step.name))
        for _ in range(min(len(self.heap), len(self.idle))):
            self._wake_one()

    def pop(self) -> Step | None:
        return STEP_BY_NAME[heapq.heappop(self.heap)[2]] if self.heap else None

    async def more(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self.idle:
                self.idle.remove(waiter)

    def _wake_one(self) -> None:
        waiter = self.idle.pop(0)
        if not waiter.done():
            waiter.set_result(None)

    def wake_all(self) -> None:
        while self.idle:
            self._wake_one()


def _last_status_only(events: list[tuple[str, JSON]]) -> list[tuple[str, JSON]]:
    """A commit's events without its ``status`` events but the last. Each status is a
    full snapshot of the job and a commit's events reach every reader together, so the
    last says all that the earlier ones did (a step started and the artifact of another
    in one commit: one status with both)."""
    kept: list[tuple[str, JSON]] = []
    seen_status = False
    for event in reversed(events):
        if event[0] == EV_STATUS:
            if seen_status:
                continue
            seen_status = True
        kept.append(event)
    kept.reverse()
    return kept


class _CancelWatch:
    """One poller of cancel flags per store and event loop, for every job this process
    runs: one ``cancel_requested_many`` round trip per period instead of one per job.
    ``add`` returns a future that is resolved when the job's flag is seen."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.jobs: dict[str, tuple[asyncio.Future[None], float]] = {}
        self.task: asyncio.Task[None] | None = None
        self.sleeping = False

    def add(self, job_id: str, interval_s: float) -> asyncio.Future[None]:
        flagged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.jobs[job_id] = (flagged, interval_s)
        if self.task is None:
            self.task = asyncio.create_task(self._poll(), name="jobq:cancel-watch")
        return flagged

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        if not self.jobs and self.task is not None and self.sleeping:
            self.task.cancel()  # idle: no reason to outlive the last job

    async def _poll(self) -> None:
        try:
            while self.jobs:
                try:
                    flagged = await self.store.cancel_requested_many(list(self.jobs))
                except Exception as exc:  # a store hiccup: poll again next period
                    log.warning("cancel_poll_failed", error=str(exc), jobs=len(self.jobs))
                    flagged = set()
                for job_id in flagged:
                    entry = self.jobs.get(job_id)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(None)
                if not self.jobs:
                    break
                self.sleeping = True
                try:
                    await asyncio.sleep(min(interval for _, interval in self.jobs.values()))
                finally:
                    self.sleeping = False
        finally:
            self.task = None


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[JobStore, _CancelWatch]] = (
    weakref.WeakKeyDictionary()
)


def _cancel_watch(store: JobStore) -> _CancelWatch:
    watches = _watches.setdefault(asyncio.get_running_loop(), {})
    watch = watches.get(store)
    if watch is None:
        watch = watches[store] = _CancelWatch(store)
    return watch


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
    # One round trip: the checkpoints are read along, as a job to run is the rule.
    job, cancel_requested, checkpoints = await asyncio.gather(
        store.get(job_id), store.cancel_requested(job_id), store.list_artifacts(job_id)
    )
    if job is None:
        log.warning("job_unknown", job_id=job_id)
        return None
    if job.status in TERMINAL_STATUSES:
        return job
    if cancel_requested:
        return await _end(
            deps, job, CANCELLED, _error("cancelled", "cancelled before it started"),
            ACTIVE_STATUSES,
        )
    attempts = job.attempts + 1
    lost = job.attempts - job.handoffs
    if lost >= deps.config.job_max_attempts:
        running = [n for n, s in job.steps.items() if s == STEP_RUNNING]
        message = f"the worker was lost {lost} times; giving up"
        return await _end(
            deps, job, FAILED, _error("worker_lost", message, running[0] if running else None),
            ACTIVE_STATUSES, attempts=attempts,
        )
    started = job.started_at if job.started_at is not None else time.time()
    # The run writes this (status running, attempts, started_at) with its first commit.
    job = replace(job, status=RUNNING, attempts=attempts, started_at=started)
    try:
        run = run_cls(job, deps)
    except RequestInvalid as exc:
        message = f"stored request no longer valid: {exc}"
        return await _end(
            deps, job, FAILED, _error("invalid_request", message), ACTIVE_STATUSES,
            attempts=attempts, started_at=started,
        )
    return await run.execute(checkpoints)
