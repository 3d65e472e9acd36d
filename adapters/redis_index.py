"""The redis store's listing and counting: sorted sets of job ids by creation time.

``P:index:all``, ``P:index:status:<s>``, ``P:index:tenant:<t>`` and
``P:index:tstatus:<s>:<t>`` map id -> created_at; ``P:index:owner`` maps id -> tenant,
so the entries of a job that expired can be found and removed. Sorted-set members do
not expire on their own: entries older than the TTL whose job is gone are pruned
before counting and listing.
"""

from __future__ import annotations

import time

from adapters.redis_clients import RedisClients, bounded
from adapters.redis_codec import RedisKeys, decode_job, members, unindexing_script
from pipeline.model import Job, list_cursor, parse_list_cursor
from pipeline.vocabulary import ACTIVE_STATUSES, STATUSES

PRUNE_BATCH = 200


class RedisJobIndex:
    """Pages, counts and unfinished ids from the index sorted sets of one prefix."""

    def __init__(self, clients: RedisClients, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = clients.commands
        self._keys = keys
        self.ttl_s = ttl_s
        self._prune_script = self._redis.register_script(unindexing_script("store_prune"))

    async def prune(self) -> None:
        """Drop index entries of jobs that expired (only entries older than the TTL can)."""
        cutoff = repr(time.time() - self.ttl_s)
        async with bounded("redis"):
            await self._prune_script(keys=[], args=[self._keys.prefix, cutoff, PRUNE_BATCH])

    async def list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        await self.prune()
        index = self._keys.index(tenant, status)
        after: tuple[float, str] | None = None
        if cursor:
            after = parse_list_cursor(cursor)
        jobs: list[Job] = []
        offset = 0
        batch = limit + 1
        while len(jobs) <= limit:
            top: float | str = after[0] if after else "+inf"
            async with bounded("redis"):
                rows = await self._redis.zrange(
                    index,
                    top,
                    "-inf",
                    desc=True,
                    byscore=True,
                    offset=offset,
                    num=batch,
                    withscores=True,
                )
            if not rows:
                break
            offset += len(rows)
            ids = [
                job_id
                for job_id, score in members(rows)
                if after is None or score < after[0] or job_id < after[1]
            ]
            for job_id, job in zip(ids, await self.get_many(ids), strict=True):
                if job is None:
                    async with bounded("redis"):
                        await self._redis.zrem(index, job_id)
                    offset -= 1
                elif len(jobs) <= limit:
                    jobs.append(job)
            if len(rows) < batch:
                break
        next_cursor = None
        if len(jobs) > limit:
            jobs = jobs[:limit]
            last = jobs[-1]
            next_cursor = list_cursor(last)
        return jobs, next_cursor

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        if not job_ids:
            return []
        async with bounded("redis"), self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self._keys.job(job_id))
            raws = await pipe.execute()
        return [decode_job(raw) for raw in raws]

    async def count_by_status(self) -> dict[str, int]:
        await self.prune()
        async with bounded("redis"), self._redis.pipeline(transaction=False) as pipe:
            for status in STATUSES:
                pipe.zcard(self._keys.index(None, status))
            counts = await pipe.execute()
        return {status: int(n) for status, n in zip(STATUSES, counts, strict=True)}

    async def unfinished_job_ids(self) -> list[str]:
        rows: list[tuple[float, str]] = []
        async with bounded("redis"):
            for status in sorted(ACTIVE_STATUSES):
                found = await self._redis.zrange(self._keys.index(None, status), 0, -1, withscores=True)
                rows += [(score, job_id) for job_id, score in members(found)]
        return [job_id for _, job_id in sorted(rows)]
