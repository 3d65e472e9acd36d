"""Every change this project makes to SAQ's own behaviour, in one place.

Written against SAQ 0.26 (``saq[hiredis]>=0.26.4,<0.27`` in pyproject.toml): the
overrides below replace or wrap methods of ``saq.queue.redis.RedisQueue`` and
``saq.worker.Worker``, several of them private (``_update``, ``_finish``, ``_retry``,
``_get_job_by_id``) or reading private state (the worker's ``_stopped``,
``_shutdown_grace_period_s``, ``_cancellation_hard_deadline_s``). A new SAQ release
may rename or reorder what they rely on, so the pin's upper bound is the minor version;
re-read ``saq/queue/redis.py`` and ``saq/worker.py`` before raising it. What SAQ lets
one set from outside is used as such, not overridden: the job function, the
``startup``/``shutdown`` hooks (they open and close the container), the timers, the
dequeue timeout, the shutdown grace period and the retry limit per job.

:class:`JobqRedisQueue` (on ``RedisQueue``):

- Fair scheduling across tenants (``_enqueue``, ``dequeue``, ``count``, and the
  ``_finish``/``_retry``/sweep scripts). Upstream has one FIFO list (``queued``) that
  BLMOVE pops into the active list, so a tenant's backlog of 200 jobs delays every
  other tenant's job behind all of them. Here ``_enqueue`` (a job marked with
  :func:`schedule_for`) queues the job id in its tenant's list and pushes a wake-up token to
  upstream's ``queued`` list; ``dequeue`` picks with ``adapters/lua/saq_fair_pick.lua``:
  the next tenant in turn (round robin over tenants with queued jobs) whose running
  jobs are under ``tenant_max_running`` gives its oldest job, which moves to the
  active list in the same script, exactly where upstream's BLMOVE puts it (so the
  sweep, the heartbeat and the hand-back work as before). A slot that finds nothing
  blocks on upstream's BLMOVE of ``queued`` (a token, moved to the active list and
  dropped there by the pick, so a worker dying in between leaves only a token that
  the sweep removes as a missing job; idle slots pick again after every dequeue
  timeout, so a lost token delays a job by at most that long). Jobs without a
  tenant (enqueued with ``FAIR_SCHEDULING=0`` or by an older release) stay in
  upstream's layout and are delivered as upstream does. Running counts per tenant
  change only in scripts that move a job into or out of the active list (pick;
  ``_finish``, ``_retry``, the hand-back and the sweep's removal of a missing job), so
  they match the active list; a job leaving it moves a token parked at a cap back to
  ``queued``. The key layout is in ``adapters/lua/saq_fair.lua`` (keys named inside
  scripts: a single Redis, not Redis Cluster; Redis >= 6.2 for LMOVE). ``count``
  ("queued") counts jobs, not tokens. No upstream equivalent (SAQ's ``priority`` and
  ``group_key`` are Postgres only).
- ``dequeue``: (1) once ``should_stop`` returns true (the worker got SIGTERM) it
  returns nothing, and a job that a blocked BLMOVE still receives goes back to the
  head of the queue untouched: a stopping worker takes no new work. Upstream starts
  no new dequeue once stopping, but one already blocked still takes a job and starts
  it during the grace period (to hand it back if it outlives it). (2) BLMOVE goes over
  the process's blocking pool (``adapters.redis_clients``), the queue's other commands
  over the command pool shared with the job store. Upstream sends everything through
  the one client it was given, so on a shared pool each idle slot would hold one of
  the store's connections for its whole dequeue timeout.
- ``sweep``: upstream re-queues every job in the active list whose status is not
  ``active``. A job that BLMOVE just moved there stays ``queued`` until its worker
  marks it active; a sweep in that instant re-queued a job about to run, which then
  ran twice (upstream issues tobymao/saq#124, closed, and #277, open: "The task was
  swept during execution"). Here such a job is looked at again after ``settle_s`` and
  swept only if it is still not active. Further, against upstream's sweep: the aborts
  of all stuck jobs go out at once and are waited for together (upstream waits up to
  the abort wait per job, one after another: 20 jobs of a killed worker took two
  minutes); the sweep lock covers the sweep's longest run, then goes back to the
  sweep period (upstream holds it for the period only, and an overlapping sweep of
  another worker re-queued the same jobs: two runs at once); a swept job stays in the
  active list until its retry moves it (upstream's ``abort`` takes it out of every
  list first, so a sweep cut off in between stranded it); a swept job is always
  re-queued (upstream finishes one that used up its retries as aborted; here the
  pipeline decides when a job is lost too often); the abort wait is
  ``sweep_abort_wait_s`` (upstream: a fixed 5 s, the worker passes no value); and the
  active list's records are decoded ``SWEEP_SLICE`` per turn of the event loop
  (upstream decodes all of them in one, a stall of every running job).
- ``_update``, ``_finish``, ``_retry`` (private): refused once a later delivery of the
  job counted more attempts, and ``_finish`` also for a delivery marked with
  :meth:`JobqRedisQueue.release`. A worker that stalled past its heartbeat and comes
  back cannot mark the new delivery's SAQ job done or drop it from the active list
  (where the sweep would no longer find it if the new worker died). Upstream writes
  unconditionally. No upstream issue found.
- ``_get_job_by_id``, ``_update``, ``_finish``, ``_retry``: through an
  :class:`AutoPipeline`, so the jobs of a busy worker share round trips and connection
  checkouts (checkouts from redis-py's blocking pool took ~6 % of a busy worker's CPU
  in a py-spy profile); ``_finish`` and ``_retry`` are one Lua script each instead of a
  MULTI/EXEC, so they can share a batch. ``_get_job_by_id`` also skips upstream's
  ``max_concurrent_ops`` semaphore (the pipeline batches instead).
- ``notify`` (public): no pub/sub message when a job starts or completes. Upstream
  publishes every status change for ``Job.refresh`` listeners; the only listener here
  is a sweep waiting for an aborted job to end, so those are two round trips per job
  for nobody (a sweep that raced a completion waits out its abort wait instead).
- ``version`` (public): one ``INFO`` per worker. Upstream asks before every dequeue
  and caches the answer, so every idle slot of a fresh worker sent its own at once.

:class:`JobqWorker` (on ``Worker``):

- ``stop``: the shutdown is done here. Upkeep loops stop at once (upstream waits for
  them with the jobs, up to a sweep period), running jobs get the grace period, and
  each one still running after it is cancelled exactly once. Upstream's ``stop``
  cancels a late job twice (``wait_for`` cancels the gather of all tasks, then
  ``cancel_tasks`` cancels them again), and the second cancel can land while the
  first is still putting the job back on the queue; the job was then only recovered
  by a sweep after its heartbeat ran out. No upstream issue found for the double
  cancel; the grace period itself came with tobymao/saq#269, and upstream's design
  (a stopped worker's jobs are recovered by others) is tobymao/saq#75.
- ``abort`` (the upkeep timer, every second): upstream loads and decodes every running
  job to see whether one is being aborted, so a worker running thousands of jobs
  spent tens of milliseconds of every second on it, holding up all of them. Here one
  ``EXISTS`` over the running jobs' abort flags comes first, and upstream's pass runs
  only when one is up. Every abort sets that flag (upstream's ``abort`` and the
  sweep's ``saq_mark_aborting.lua``, for ``ABORT_FLAG_TTL_S``, beyond the one-second
  timer).
- ``process``: an error escaping upstream's ``process`` (its retry of a crashed
  delivery failing while Redis is away) is logged as one line and the slot starts
  over after ``SLOT_RESTART_S``. Upstream's slot task then ended with the error unread
  ("Task exception was never retrieved", a long traceback per slot) and the slot
  restarted at once, in a tight loop while Redis stayed away. The job stays in the
  active list, where the sweep finds it once Redis is back.

Not overrides, but SAQ behaviour changed elsewhere: ``handlers.logging`` turns SAQ's
log records about an unreachable Redis into one line each (a logging filter).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from saq import Worker
from saq.job import Job as SaqJob
from saq.job import Status
from saq.queue.redis import RedisQueue
from saq.types import CountKind

from adapters.redis_autopipeline import AutoPipeline
from adapters.redis_clients import lua_script

log = structlog.get_logger("jobq.queue")
worker_log = structlog.get_logger("jobq.worker")

ABORT_FLAG_TTL_S = 5
"""How long a swept job's abort flag waits for a live worker to see it (SAQ's value)."""
SWEEP_LOCK_MARGIN_S = 5.0
"""A sweep's lock outlasts its longest run (settle, then one abort wait) by this much."""
SWEEP_SLICE = 200
"""Jobs of the active list a sweep decodes per turn of the event loop (a worker running
thousands of jobs would otherwise stall all of them while it decodes every one)."""
SLOT_RESTART_S = 1.0
"""A worker slot whose SAQ bookkeeping failed (Redis away) starts over after this long."""

_RELEASED = "_jobq_released"
"""Attribute set on a delivery (an in-memory ``SaqJob``) that another delivery superseded."""

_TENANT = "_jobq_tenant"
"""Attribute set on a job to enqueue (an in-memory ``SaqJob``): its tenant."""

_UNHEARD = frozenset({Status.ACTIVE, Status.COMPLETE})
"""SAQ statuses whose pub/sub notification nobody here listens for."""


def schedule_for(job: SaqJob, tenant: str) -> SaqJob:
    """Mark a job about to be enqueued as ``tenant``'s: :class:`JobqRedisQueue` queues it
    for fair scheduling (the SAQ job record itself does not change)."""
    setattr(job, _TENANT, tenant)
    return job


class JobqRedisQueue(RedisQueue):
    """SAQ's Redis queue with a clean shutdown, no double runs and fewer round trips
    (each change is described in the module docstring).

    ``redis`` carries every command but BLMOVE, which goes over ``blocking`` (default:
    ``redis``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        *,
        blocking: aioredis.Redis | None = None,
        sweep_abort_wait_s: float = 5.0,
        settle_s: float = 1.0,
        fair: bool = True,
        tenant_max_running: int = 0,
    ) -> None:
        super().__init__(redis, name=name)
        self.blocking = blocking if blocking is not None else redis
        self.sweep_abort_wait_s = sweep_abort_wait_s
        self.settle_s = settle_s
        self.fair = fair
        self.tenant_max_running = tenant_max_running
        self.should_stop: Callable[[], bool] = lambda: False
        self._fair_prefix = self.namespace("fair") + ":"
        self._token = self._fair_prefix + "wake"
        self._sweep_list = redis.register_script(lua_script("saq_sweep_list"))
        self._mark_aborting = redis.register_script(lua_script("saq_mark_aborting"))
        self._finish_script = redis.register_script(lua_script("saq_owned", "saq_fair", "saq_finish"))
        self._retry_script = redis.register_script(lua_script("saq_owned", "saq_fair", "saq_retry"))
        self._update_script = redis.register_script(lua_script("saq_owned", "saq_update"))
        self._fair_enqueue = redis.register_script(lua_script("saq_fair", "saq_fair_enqueue"))
        self._fair_pick = redis.register_script(lua_script("saq_fair", "saq_fair_pick"))
        self._fair_unpick = redis.register_script(lua_script("saq_fair", "saq_fair_unpick"))
        self._fair_drop = redis.register_script(lua_script("saq_fair", "saq_fair_drop"))
        self._fair_count = redis.register_script(lua_script("saq_fair_count"))
        self._version_lock = asyncio.Lock()
        self._auto = AutoPipeline(redis)

    def release(self, delivery: SaqJob) -> None:
        """``delivery`` found the job run by another delivery (the job store refused its
        writes): its finish leaves SAQ's record to that one. Two deliveries can count
        the same attempts (a job re-queued twice), so the attempts guard alone let the
        loser mark the job complete and drop it from the active list, where the sweep
        would no longer find it if the winner then died."""
        setattr(delivery, _RELEASED, True)

    async def _get_job_by_id(self, job_id: bytes | str) -> SaqJob | None:
        return self.deserialize(await self._auto.submit("GET", job_id))

    async def _update(self, job: SaqJob, status: Status | None = None, **kwargs: Any) -> None:
        if not status:
            stored = await self.job(job.key)
            status = stored.status if stored else None
        job.status = status or job.status
        if await self._auto.eval(self._update_script, [job.id], [self.serialize(job), job.attempts]):
            await self.notify(job)

    async def _finish(
        self,
        job: SaqJob,
        status: Status,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        if getattr(job, _RELEASED, False):
            log.info("saq_finish_left_to_other_delivery", job_id=job.key, attempts=job.attempts)
            return
        keys = [self._active, self._incomplete, job.id, self._queued]
        args = [job.ttl, self.serialize(job), job.attempts, self._fair_prefix]
        if await self._auto.eval(self._finish_script, keys, args):
            await self.notify(job)
        else:
            log.warning("saq_finish_superseded", job_id=job.key, attempts=job.attempts)

    async def _retry(self, job: SaqJob, error: str | None) -> None:
        delay = job.next_retry_delay()
        score = time.time() + delay if delay else job.scheduled
        keys = [self._active, self._queued, self._incomplete, job.id]
        args = [self.serialize(job), job.attempts, score, "0" if delay else "1"]
        args += [self._fair_prefix, self._token]
        if await self._auto.eval(self._retry_script, keys, args):
            await self.notify(job)
        else:
            log.warning("saq_retry_superseded", job_id=job.key, attempts=job.attempts)

    async def version(self) -> tuple[int, ...]:
        if self._version is None:
            async with self._version_lock:
                return await super().version()
        return self._version

    async def notify(self, job: SaqJob) -> None:
        if job.status not in _UNHEARD:
            await super().notify(job)

    async def _enqueue(self, job: SaqJob) -> SaqJob | None:
        tenant = getattr(job, _TENANT, "")
        if not tenant:
            return await super()._enqueue(job)
        keys = [self._incomplete, job.id, self._queued, job.abort_id]
        args = [self.serialize(job), job.scheduled, self._fair_prefix, tenant, self._token]
        if not await self._auto.eval(self._fair_enqueue, keys, args):
            return None
        log.debug("saq_enqueued", job_id=job.key, tenant=tenant)
        return job

    async def count(self, kind: CountKind) -> int:
        if kind == "queued":
            return int(await self._fair_count(keys=[self._queued], args=[self._fair_prefix, self._token]))
        return await super().count(kind)

    async def _pick(self, woken: bytes | str) -> tuple[str, str] | None:
        """The next job in the tenants' turn (``saq_fair_pick.lua``) as ``(id, tenant)``,
        moved to the active list; ``woken`` is what this slot's BLMOVE moved there."""
        keys = [self._queued, self._active]
        args = [self._fair_prefix, woken, self.tenant_max_running, self._token]
        picked = await self._auto.eval(self._fair_pick, keys, args)
        if not picked:
            return None
        job_id, tenant = (part.decode() if isinstance(part, bytes) else part for part in picked)
        return job_id, tenant

    async def dequeue(
        self,
        timeout: float = 0.0,  # noqa: ASYNC109 - SAQ's signature, which this overrides
        poll_interval: float = 0.0,
    ) -> SaqJob | None:
        if self.should_stop():
            return None
        # A slot that just finished a job picks at once; one that finds nothing blocks
        # on a wake-up token (or, for a job queued in upstream's layout, the job id).
        picked = await self._pick("") if self.fair else None
        if picked is None:
            # SAQ passes ``timeout`` as a float too; redis-py's hints say int.
            if await self.version() < (6, 2, 0):
                woken = await self.blocking.brpoplpush(self._queued, self._active, timeout)
            else:
                woken = await self.blocking.blmove(self._queued, self._active, timeout, "LEFT", "RIGHT")  # type: ignore[arg-type]
            if woken is None:
                return None
            picked = await self._pick(woken)
            if picked is None:
                return None
        job_id, tenant = picked
        if self.should_stop():  # a stopping worker takes no new job: back to the head
            await self._unpick(job_id, tenant)
            return None
        return await self._get_job_by_id(job_id)

    async def _unpick(self, job_id: str, tenant: str) -> None:
        if tenant:
            await self._fair_unpick(
                keys=[self._queued, self._active, job_id], args=[self._fair_prefix, tenant, self._token]
            )
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(self._active, 1, job_id)
            pipe.lpush(self._queued, job_id)
            await pipe.execute()

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        held = max(lock, math.ceil(self.settle_s + self.sweep_abort_wait_s + SWEEP_LOCK_MARGIN_S))
        listed = await self._sweep_list(keys=[self._sweep, self._active], args=[held])
        if listed is None:
            return []
        started = time.monotonic()
        try:
            return await self._sweep_listed(listed)
        finally:
            # Back to the sweep period, counted from the start: a longer lock would
            # also hold off this worker's own next sweep.
            left_ms = int((lock - (time.monotonic() - started)) * 1000)
            with contextlib.suppress(Exception):
                if left_ms > 0:
                    await self.redis.pexpire(self._sweep, left_ms)
                else:
                    await self.redis.delete(self._sweep)

    async def _sweep_listed(self, listed: list[Any]) -> list[str]:
        stale: list[SaqJob] = []
        unsettled: list[str] = []
        missing: list[str] = []
        for n, (raw_id, job_bytes) in enumerate(listed):
            if n and not n % SWEEP_SLICE:
                await asyncio.sleep(0)  # one slice per loop turn: the jobs run meanwhile
            job_id = raw_id.decode()
            job = self.deserialize(job_bytes)
            if job is None:
                missing.append(job_id)
            elif job.stuck:
                stale.append(job)
            elif job.status != Status.ACTIVE:
                unsettled.append(job_id)
        if unsettled:
            await asyncio.sleep(self.settle_s)
            for job_id in unsettled:
                job = await self._get_job_by_id(job_id)
                in_active = await self.redis.lpos(self._active, job_id) is not None
                if job is None:
                    missing.append(job_id)
                elif in_active and (job.status != Status.ACTIVE or job.stuck):
                    stale.append(job)
        for job_id in missing:
            await self._fair_drop(
                keys=[self._queued, self._active, self._incomplete, job_id], args=[self._fair_prefix]
            )
            log.info("saq_swept_missing_job", saq_id=job_id)
        # All at once: each waits up to ``sweep_abort_wait_s`` for a worker that, when
        # it died, will never answer.
        outcomes = await asyncio.gather(*(self._sweep_one(job) for job in stale), return_exceptions=True)
        for job, outcome in zip(stale, outcomes, strict=True):
            if isinstance(outcome, Exception):  # still in the active list: the next sweep
                log.warning("saq_sweep_failed", job_id=job.key, error=repr(outcome))
        return [job.id for job in stale] + missing

    async def _sweep_one(self, job: SaqJob) -> None:
        """SAQ's handling of a stuck job: abort it, give its worker a moment, retry."""
        log.info("saq_sweeping_job", job_id=job.key, status=job.status.value, attempts=job.attempts)
        job.status, job.error = Status.ABORTING, self.swept_error_message
        await self._mark_aborting(
            keys=[self._queued, job.id, job.abort_id],
            args=[self.serialize(job), ABORT_FLAG_TTL_S, self.swept_error_message],
        )
        with contextlib.suppress(TimeoutError):
            await job.refresh(self.sweep_abort_wait_s)
        # Always back to the queue: the next delivery fails the job with worker_lost
        # if it was lost too often (SAQ aborting it here would leave it "running").
        await self.retry(job, error=self.swept_error_message)


class JobqWorker(Worker[Any]):
    """SAQ's worker with its own shutdown and a slot that survives a failed bookkeeping
    write (see the module docstring)."""

    _draining = False

    async def abort(self, abort_threshold: float) -> None:
        """Upstream's pass over the running jobs, only once one of them has its abort
        flag up (see the module docstring)."""
        flags = [job.abort_id for job in self.job_task_contexts]
        if flags and await self.queue.redis.exists(*flags):  # type: ignore[attr-defined]
            await super().abort(abort_threshold)

    async def process(self) -> bool:
        try:
            return await super().process()
        except Exception as exc:
            worker_log.warning("worker_slot_failed", worker=self.id, error=repr(exc))
            await asyncio.sleep(SLOT_RESTART_S)
            return False

    async def stop(self) -> None:
        if not self._stopped and not self._draining:
            self._draining = True
            self.event.set()
            await self._drain()
        await super().stop()

    async def _drain(self) -> None:
        grace = self._shutdown_grace_period_s or 0
        running = [job.key for job in self.job_task_contexts]
        worker_log.info("worker_stopping", worker=self.id, running=running, grace_s=grace)
        for task in list(self.tasks):
            if task.get_name() != "process":
                task.cancel()
        processes = [task for task in self.tasks if task.get_name() == "process"]
        if not processes:
            return
        _done, pending = await asyncio.wait(processes, timeout=grace)
        if pending:
            late = [job.key for job in self.job_task_contexts]
            if late:
                worker_log.warning("worker_grace_over", worker=self.id, handing_back=late)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=self._cancellation_hard_deadline_s + 5)
