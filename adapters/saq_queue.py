"""The redis backend's queue: SAQ on Redis. The SAQ job key is the job id.

Crash safety comes from SAQ's sweep: a delivery whose worker stopped sending
heartbeats for ``heartbeat_s`` is aborted and retried by the next sweep of any
live worker. With the defaults (heartbeat 20 s, sweep every 10 s, 5 s abort
wait) a SIGKILLed worker's job is running again within about 35 s.

SAQ's ``retries`` counts deliveries, hand-backs on shutdown included. The
pipeline is the authority on giving up (it fails a job with ``worker_lost`` once
``JOB_MAX_ATTEMPTS`` deliveries were lost, hand-backs not counted), so a sweep
always re-queues, and SAQ's limit, well above that, only ends a job whose
deliveries keep raising (the worker then fails it in the job store too). An
extra delivery of a finished job returns at once.

Knobs read from the environment (the same in web and worker processes, since
the web process enqueues with them): ``SAQ_HEARTBEAT_S`` (20),
``SAQ_SWEEP_ABORT_WAIT_S`` (5), ``SAQ_TIMEOUT_MARGIN_S`` (60), ``JOB_MAX_ATTEMPTS`` (3).
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from saq.job import Job as SaqJob
from saq.job import Status
from saq.queue.redis import RedisQueue

from adapters.constants import KEY_PREFIX, SAQ_QUEUE_NAME
from adapters.redis_store import (
    OP_TIMEOUT_S,
    AutoPipeline,
    ping_client,
    ping_within_budget,
    redis_client,
)
from pipeline.model import JSON, StoreUnavailable
from pipeline.ports import Queue

log = structlog.get_logger("jobq.queue")

MAX_QUEUE_CONNECTIONS = 20_000
"""At least the worker's concurrency plus SAQ's own operations."""
RUN_JOB_FUNCTION = "run_job"
"""The SAQ function name the worker registers (``handlers.saq_worker.run_job``)."""
FINISHED_JOB_TTL_S = 3600
"""How long SAQ keeps a finished delivery's record (the job itself lives in the store)."""


def queue_name(prefix: str) -> str:
    """Deployments sharing a Redis keep apart by key prefix, and so do their queues."""
    return SAQ_QUEUE_NAME if prefix == KEY_PREFIX else f"{SAQ_QUEUE_NAME}-{prefix}"


_SWEEP_LIST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('SETEX', KEYS[1], ARGV[1], 1)
local id_jobs = {}
for i, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    id_jobs[i] = {v, redis.call('GET', v)}
end
return id_jobs
"""
"""SAQ's own sweep listing: every job in the active list, once per lock period; nil
while another sweep holds the lock."""

_MARK_ABORTING = """
-- KEYS: queued, job, abort flag; ARGV: job, abort flag ttl, error
redis.call('LREM', KEYS[1], 0, KEYS[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SETEX', KEYS[3], ARGV[2], ARGV[3])
redis.call('PUBLISH', KEYS[2], 'aborting')
"""
"""SAQ's ``abort`` for a swept job, which stays in the active list until the retry
moves it (SAQ's took it out of every list at once)."""


_OWNED = """
local function owned(key, attempts)
  -- false once a later delivery (a higher attempt count) wrote the SAQ job
  local stored = redis.call('GET', key)
  if not stored then return true end
  local ok, job = pcall(cjson.decode, stored)
  return not ok or (tonumber(job['attempts']) or 0) <= attempts
end
"""
"""A delivery's writes to its SAQ job are refused once a later delivery took the job
(see ``JobqRedisQueue``): attempts only grow, one per dequeue."""

_UPDATE = _OWNED + """
if not owned(KEYS[1], tonumber(ARGV[2])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

_RETRY = _OWNED + """
-- KEYS: active, queued, incomplete, job; ARGV: job, attempts, score, push now (1/0)
if not owned(KEYS[4], tonumber(ARGV[2])) then return 0 end
redis.call('LREM', KEYS[1], 1, KEYS[4])
redis.call('LREM', KEYS[2], 1, KEYS[4])
redis.call('ZADD', KEYS[3], ARGV[3], KEYS[4])
if ARGV[4] == '1' then redis.call('RPUSH', KEYS[2], KEYS[4]) end
redis.call('SET', KEYS[4], ARGV[1])
return 1
"""
"""SAQ's ``_retry`` transaction as one script, refused for a superseded delivery."""

_FINISH = _OWNED + """
if not owned(KEYS[3], tonumber(ARGV[3])) then return 0 end
redis.call('LREM', KEYS[1], 1, KEYS[3])
redis.call('ZREM', KEYS[2], KEYS[3])
local ttl = tonumber(ARGV[1])
if ttl > 0 then
    redis.call('SETEX', KEYS[3], ttl, ARGV[2])
elseif ttl == 0 then
    redis.call('SET', KEYS[3], ARGV[2])
else
    redis.call('DEL', KEYS[3])
end
return 1
"""
"""SAQ's ``_finish`` transaction (MULTI/EXEC) as one script, so it can share a batch,
refused for a superseded delivery."""

HANDOFF_ALLOWANCE = 20
"""Deliveries SAQ allows beyond ``JOB_MAX_ATTEMPTS + 3``: hand-backs on shutdown count
there too (its limit applies to a delivery that raised; the worker then fails the job)."""
ABORT_FLAG_TTL_S = 5
"""How long a swept job's abort flag waits for a live worker to see it (SAQ's value)."""
SWEEP_LOCK_MARGIN_S = 5.0
"""A sweep's lock outlasts its longest run (settle, then one abort wait) by this much."""

_RELEASED = "_jobq_released"
"""Attribute set on a delivery (an in-memory ``SaqJob``) that another delivery superseded."""

_UNHEARD = frozenset({Status.ACTIVE, Status.COMPLETE})
"""SAQ statuses whose pub/sub notification nobody here listens for."""


class JobqRedisQueue(RedisQueue):
    """SAQ's Redis queue with these changes: a clean shutdown, no double runs, and
    fewer round trips.

    - ``should_stop``: once it returns true (the worker got SIGTERM), a job that a
      blocked ``dequeue`` still receives is pushed back to the head of the queue
      untouched, so a stopping worker takes no new work.
    - ``sweep``: SAQ re-queues every job in the active list whose status is not
      ``active``. But a job that ``BLMOVE`` just moved there stays ``queued`` for a
      moment until its worker marks it active; a sweep in that instant re-queues a
      job that is about to run, and it then runs twice at once. Here such a job is
      looked at again after ``settle_s`` and swept only if it is still not active.
    - ``sweep_abort_wait_s``: how long a sweep waits for a stuck job's worker to
      acknowledge the abort before re-queueing it (SAQ's fixed 5 s otherwise).
    - ``notify``: no pub/sub message when a job starts or completes (nobody listens).
    - ``version``: one ``INFO`` per worker, not one per idle slot at start.
    - A delivery's beats, finish and retry are refused once a later delivery of
      the job counted more attempts: a worker that stalled past its heartbeat and
      comes back cannot mark the new delivery's SAQ job done or drop it from the
      active list (the sweep would then no longer recover it if the new worker died).
    - A job's reads and writes as it starts, beats and finishes go through an
      :class:`AutoPipeline`: the jobs of a busy worker share round trips and
      connection checkouts (checkouts from redis-py's blocking pool took ~6 % of a
      busy worker's CPU in a py-spy profile).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        sweep_abort_wait_s: float = 5.0,
        settle_s: float = 1.0,
    ) -> None:
        super().__init__(redis, name=name)
        self.sweep_abort_wait_s = sweep_abort_wait_s
        self.settle_s = settle_s
        self.should_stop: Callable[[], bool] = lambda: False
        self._sweep_list = redis.register_script(_SWEEP_LIST)
        self._mark_aborting = redis.register_script(_MARK_ABORTING)
        self._finish_script = redis.register_script(_FINISH)
        self._retry_script = redis.register_script(_RETRY)
        self._update_script = redis.register_script(_UPDATE)
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
        keys = [self._active, self._incomplete, job.id]
        args = [job.ttl, self.serialize(job), job.attempts]
        if await self._auto.eval(self._finish_script, keys, args):
            await self.notify(job)
        else:
            log.warning("saq_finish_superseded", job_id=job.key, attempts=job.attempts)

    async def _retry(self, job: SaqJob, error: str | None) -> None:
        delay = job.next_retry_delay()
        score = time.time() + delay if delay else job.scheduled
        keys = [self._active, self._queued, self._incomplete, job.id]
        args = [self.serialize(job), job.attempts, score, "0" if delay else "1"]
        if await self._auto.eval(self._retry_script, keys, args):
            await self.notify(job)
        else:
            log.warning("saq_retry_superseded", job_id=job.key, attempts=job.attempts)

    async def version(self) -> tuple[int, ...]:
        """SAQ asks for the server version before every dequeue and caches it; with no
        lock, every idle slot of a fresh worker sent its own ``INFO`` at once."""
        if self._version is None:
            async with self._version_lock:
                return await super().version()
        return self._version

    async def notify(self, job: SaqJob) -> None:
        """SAQ publishes every status change for listeners (``Job.refresh``). Here the
        only listener is a sweep waiting for an aborted job to end, so the publishes as
        a job starts or completes (two round trips per job) are skipped; a sweep that
        raced a completion waits out ``sweep_abort_wait_s`` instead."""
        if job.status not in _UNHEARD:
            await super().notify(job)

    async def dequeue(
        self,
        timeout: float = 0.0,  # noqa: ASYNC109 - SAQ's signature, which this overrides
        poll_interval: float = 0.0,
    ) -> SaqJob | None:
        if self.should_stop():
            return None
        job = await super().dequeue(timeout, poll_interval)
        if job is not None and self.should_stop():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lrem(self._active, 1, job.id)
                pipe.lpush(self._queued, job.id)
                await pipe.execute()
            return None
        return job

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        # SAQ holds the sweep lock for the sweep period (``lock``) only. A sweep that
        # outlasted it (one abort wait per job, one after another) let another worker
        # sweep the jobs this one had listed but not yet aborted: both re-queued them
        # and two workers ran each. The aborts now go out at once (below); the lock
        # still covers a sweep's longest run, for a slow Redis.
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
        for raw_id, job_bytes in listed:
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
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lrem(self._active, 0, job_id)
                pipe.zrem(self._incomplete, job_id)
                await pipe.execute()
            log.info("saq_swept_missing_job", saq_id=job_id)
        # All at once: each waits up to ``sweep_abort_wait_s`` for a worker that, when
        # it died, will never answer (one after another, 20 jobs of a killed worker
        # took two minutes to come back).
        outcomes = await asyncio.gather(*(self._sweep_one(job) for job in stale), return_exceptions=True)
        for job, outcome in zip(stale, outcomes, strict=True):
            if isinstance(outcome, Exception):  # still in the active list: the next sweep
                log.warning("saq_sweep_failed", job_id=job.key, error=repr(outcome))
        return [job.id for job in stale] + missing

    async def _sweep_one(self, job: SaqJob) -> None:
        """SAQ's handling of a stuck job: abort it, give its worker a moment, retry."""
        log.info("saq_sweeping_job", job_id=job.key, status=job.status.value, attempts=job.attempts)
        # Unlike SAQ's ``abort``, the job stays in the active list until the retry: a
        # sweep cut off in between (a deploy's SIGTERM, Redis gone) leaves it where the
        # next sweep finds it, not in no list at all.
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


class SaqQueue(Queue):
    """``Queue`` on SAQ. ``saq`` is the underlying SAQ queue the worker consumes."""

    name = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = KEY_PREFIX,
        *,
        heartbeat_s: float = 20,
        max_attempts: int = 3,
        timeout_margin_s: float = 60,
        sweep_abort_wait_s: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.heartbeat_s = max(1, int(heartbeat_s))
        self.retries = max_attempts + 3 + HANDOFF_ALLOWANCE
        self.timeout_margin_s = timeout_margin_s
        # Each idle worker slot blocks one connection in BLMOVE (up to a second).
        client = redis_client(url, max_connections=MAX_QUEUE_CONNECTIONS)
        self.saq = JobqRedisQueue(
            client,
            name=queue_name(prefix),
            sweep_abort_wait_s=sweep_abort_wait_s,
        )
        self._ping_client = ping_client(url)
        self._opened = False

    def stopping(self) -> bool:
        return self.saq.should_stop()

    async def open(self) -> None:
        if not self._opened:
            await self.saq.connect()
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            with contextlib.suppress(Exception):
                await self.saq.disconnect()
        with contextlib.suppress(Exception):
            await self._ping_client.aclose()

    async def ping(self) -> None:
        await ping_within_budget(self._ping_client, "redis queue")

    async def stats(self) -> JSON:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                info: Any = await self.saq.info()
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis queue did not answer within {OP_TIMEOUT_S:g}s") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis queue: {exc}") from exc
        return {
            "workers": len(info["workers"]),
            "queued": int(info["queued"]),
            "active": int(info["active"]),
            "queue": self.saq.name,
        }

    async def _enqueue(self, job_id: str, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                await self.saq.enqueue(
                    RUN_JOB_FUNCTION,
                    key=job_id,
                    job_id=job_id,
                    timeout=int(timeout_s + self.timeout_margin_s),
                    heartbeat=self.heartbeat_s,
                    retries=self.retries,
                    ttl=FINISHED_JOB_TTL_S,
                )
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis queue did not answer within {OP_TIMEOUT_S:g}s") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis queue: {exc}") from exc
