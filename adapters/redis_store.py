"""The redis backend's store: jobs, artifacts, step cache, event streams and trace.

Key layout (``P`` is the prefix, e.g. ``jobq``)::

    P:job:<id>            hash, one field per Job field (JSON; ``status`` and ``tenant`` raw)
    P:idem:<sha256>       job id for (tenant, Idempotency-Key), 24 h, SET NX semantics
    P:artifacts:<id>      hash name -> "<seq> <artifact JSON>", field ``#seq`` the counter
    P:cache:<key>         artifact JSON
    P:events:<id>         stream, entry id ``<n>-0`` for event n; P:evseq:<id> the counter
    P:trace:<id>          list of LLM call records
    P:cancel:<id>         the cancel flag
    P:cancel-mark         counter raised with every cancel flag (pollers read flags when it moves)
    P:spend:<counter>     integer micro-USD of a spend counter (cost caps), own TTL
    P:index:all / P:index:status:<s> / P:index:tenant:<t> / P:index:tstatus:<s>:<t>
                          sorted sets id -> created_at, for listing and counting
    P:index:owner         hash id -> tenant, so expired jobs can be pruned from the indexes

Why a hash and not one JSON string per job: ``update`` is a compare-and-set on the
status plus a shallow merge of the changed fields. With one field per Job field
the Lua script does both atomically in one round trip without decoding JSON in
Lua (whose cjson turns ``[]`` into ``{}``), and concurrent updates of different
fields never lose each other's writes.

Every key of a job expires ``ttl_s`` after its last write; the status update
refreshes all of them. Sorted-set members do not expire on their own: entries
older than ``ttl_s`` whose job is gone are pruned before counting and listing.

The pieces: key names, values and script arguments in :mod:`adapters.redis_codec`,
the Lua scripts in ``adapters/lua/store_*.lua``, listing and counting in
:mod:`adapters.redis_index`, the event streams in :mod:`adapters.redis_events`, the
connections (shared with the queue and the rate limiter) in
:mod:`adapters.redis_clients`.

The Lua scripts build index key names from the prefix, which is fine on a single
Redis (Render Key Value) but not on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, cast

import structlog
from redis.commands.core import AsyncScript

from adapters.constants import (
    ARTIFACT_KEY,
    CACHE_KEY,
    CANCEL_KEY,
    KEY_PREFIX,
    SPEND_KEY,
    TRACE_KEY,
)
from adapters.redis_autopipeline import AutoPipeline
from adapters.redis_clients import (
    MAX_CONNECTIONS,
    REDIS_UNAVAILABLE,
    RedisClients,
    bounded,
    lua_script,
)
from adapters.redis_clients import RedisRefused as RedisRefused  # re-exported for handlers.cli
from adapters.redis_clients import check_credentials as check_credentials  # likewise
from adapters.redis_codec import (
    RedisKeys,
    commit_args,
    create_args,
    decode_job,
    loads,
    text,
    unindexing_script,
)
from adapters.redis_events import RedisEventLog
from adapters.redis_index import RedisJobIndex
from pipeline.model import JSON, Artifact, Commit, Event, Expect, Job, StoreUnavailable
from pipeline.ports import JobStore

log = structlog.get_logger("jobq.store")


class RedisStore(JobStore):
    """``JobStore`` on ``redis.asyncio``; a job's keys expire ``ttl_s`` after its last write.

    ``clients`` are the process's Redis connections (see :mod:`adapters.redis_clients`),
    shared with the queue and the rate limiter; :meth:`from_url` makes its own."""

    def __init__(self, clients: RedisClients, prefix: str = KEY_PREFIX, ttl_s: int = 604800) -> None:
        self.clients = clients
        self.url = clients.url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._redis = clients.commands
        self._keys = RedisKeys(prefix)
        self._index = RedisJobIndex(clients, self._keys, ttl_s)
        self._auto = AutoPipeline(self._redis)
        self._events = RedisEventLog(clients, self._keys, ttl_s, self._auto)
        register = self._redis.register_script
        self._create_script = register(lua_script("store_create"))
        self._commit_script = register(lua_script("store_commit"))
        self._delete_script = register(unindexing_script("store_delete"))
        self._put_artifact_script = register(lua_script("store_put_artifact"))
        self._add_spend_script = register(lua_script("store_add_spend"))

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = KEY_PREFIX,
        ttl_s: int = 604800,
        max_connections: int = MAX_CONNECTIONS,
    ) -> RedisStore:
        """A store with connections of its own to the Redis at ``url``."""
        return cls(RedisClients.from_url(url, max_connections=max_connections), prefix, ttl_s)

    def _key(self, kind: str, name: str) -> str:
        return self._keys.key(kind, name)

    async def _call(self, *args: Any) -> Any:
        """One command through the auto-pipeline, which bounds it in time already (a
        batch ahead of it, then its own batch: ``OP_TIMEOUT_S`` each), so it needs no
        timeout scope of its own (the hot path: reads and commits of running jobs)."""
        with REDIS_UNAVAILABLE:
            return await self._auto.submit(*args)

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``script`` through the auto-pipeline, errors as in :meth:`_call`."""
        with REDIS_UNAVAILABLE:
            return await self._auto.eval(script, keys, args)

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        """Connections are made lazily; a Redis that is down now is reported by
        ``ping`` (503 on /health) and picked up when it returns."""
        try:
            await self.ping()
        except StoreUnavailable as exc:
            log.warning("redis_unavailable_at_start", error=str(exc))

    async def close(self) -> None:
        await self._events.aclose()
        await self.clients.aclose()

    async def ping(self) -> None:
        await self.clients.ping("redis")

    # -- jobs ---------------------------------------------------------------

    async def _create(self, job: Job) -> tuple[Job, bool]:
        return await self._create_with_events(job, ())

    async def _create_with_events(
        self, job: Job, events: tuple[tuple[str, JSON], ...]
    ) -> tuple[Job, bool]:
        keys, args = create_args(self._keys, job, events, self.ttl_s)
        existing = await self._eval(self._create_script, keys, args)
        if existing:
            found = await self._get(text(existing))
            if found is not None:
                return found, False
            # The first job vanished between the script and this read: create anew.
            return await self._create_with_events(job, events)
        return job, True

    async def _get(self, job_id: str) -> Job | None:
        raw = await self._call("HGETALL", self._keys.job(job_id))
        return decode_job(cast(dict[bytes, bytes], raw))

    async def _tenant_of(self, job_id: str) -> str | None:
        tenant = await self._call("HGET", self._keys.job(job_id), "tenant")
        return None if tenant is None else text(tenant)

    async def _update(self, job_id: str, expect: Expect, changes: JSON) -> Job | None:
        return await self._update_with_events(job_id, expect, changes, ())

    async def _update_with_events(
        self,
        job_id: str,
        expect: Expect,
        changes: JSON,
        events: tuple[tuple[str, JSON], ...],
    ) -> Job | None:
        raw = await self._run_commit(job_id, Commit(expect, changes, events), want_job=True)
        return decode_job(cast(list[Any], raw)) if raw else None

    async def _commit(self, job_id: str, batch: Commit) -> bool:
        return bool(await self._run_commit(job_id, batch, want_job=False))

    async def _run_commit(self, job_id: str, batch: Commit, *, want_job: bool) -> Any:
        """One EVALSHA: artifacts, cache entries and trace records, then the
        compare-and-set update with its events (see ``lua/store_commit.lua``)."""
        keys, args = commit_args(self._keys, job_id, batch, self.ttl_s, want_job=want_job)
        return await self._eval(self._commit_script, keys, args)

    async def _delete(self, job_id: str) -> None:
        job = await self._get(job_id)
        idem_key = (
            self._keys.idempotency(job.tenant, job.idempotency_key)
            if job is not None and job.idempotency_key
            else ""
        )
        keys = [*self._keys.job_keys(job_id), idem_key]
        async with bounded("redis"):
            await self._delete_script(keys=keys, args=[self.prefix, job_id])

    async def _list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        return await self._index.list_jobs(tenant, status, limit, cursor)

    async def _count_by_status(self) -> dict[str, int]:
        return await self._index.count_by_status()

    async def _unfinished_job_ids(self) -> list[str]:
        return await self._index.unfinished_job_ids()

    # -- artifacts and cache ------------------------------------------------

    async def _put_artifact(self, job_id: str, artifact: Artifact) -> None:
        async with bounded("redis"):
            await self._put_artifact_script(
                keys=[self._key(ARTIFACT_KEY, job_id)],
                args=[artifact.name, json.dumps(artifact.to_dict()), self.ttl_s],
            )

    async def _get_artifact(self, job_id: str, name: str) -> Artifact | None:
        async with bounded("redis"):
            raw = await self._redis.hget(self._key(ARTIFACT_KEY, job_id), name)
        if raw is None:
            return None
        _, _, doc = text(raw).partition(" ")
        return Artifact.from_dict(json.loads(doc))

    async def _list_artifacts(self, job_id: str) -> list[Artifact]:
        raw = await self._call("HGETALL", self._key(ARTIFACT_KEY, job_id))
        entries: list[tuple[int, Artifact]] = []
        for name, value in cast(dict[bytes, bytes], raw).items():
            if name == b"#seq":
                continue
            seq, _, doc = value.decode().partition(" ")
            entries.append((int(seq), Artifact.from_dict(json.loads(doc))))
        return [artifact for _, artifact in sorted(entries, key=lambda e: e[0])]

    async def _cache_get(self, key: str) -> Artifact | None:
        async with bounded("redis"):
            raw = await self._redis.getex(self._key(CACHE_KEY, key), ex=self.ttl_s)
        return Artifact.from_dict(json.loads(raw)) if raw else None

    async def _cache_get_many(self, keys: list[str]) -> list[Artifact | None]:
        raws = await asyncio.gather(
            *(self._call("GETEX", self._key(CACHE_KEY, key), "EX", self.ttl_s) for key in keys)
        )
        return [Artifact.from_dict(loads(raw)) if raw else None for raw in raws]

    async def _cache_put(self, key: str, artifact: Artifact) -> None:
        async with bounded("redis"):
            await self._redis.set(self._key(CACHE_KEY, key), json.dumps(artifact.to_dict()), ex=self.ttl_s)

    # -- events and trace ---------------------------------------------------

    async def _append_event(self, job_id: str, type: str, data: JSON) -> Event:
        return await self._events.append(job_id, type, data)

    def _read_events(self, job_id: str, after: int, wait_s: float) -> Coroutine[Any, Any, list[Event]]:
        return self._events.read(job_id, after, wait_s)

    async def _add_trace(self, job_id: str, record: JSON) -> None:
        key = self._key(TRACE_KEY, job_id)
        async with bounded("redis"), self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(record))
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def _get_trace(self, job_id: str) -> list[JSON]:
        async with bounded("redis"):
            rows = await self._redis.lrange(self._key(TRACE_KEY, job_id), 0, -1)
        return [cast(JSON, json.loads(row)) for row in rows]

    # -- cancellation -------------------------------------------------------

    async def _request_cancel(self, job_id: str) -> None:
        mark = self._keys.cancel_mark()
        async with bounded("redis"), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(CANCEL_KEY, job_id), b"1", ex=self.ttl_s)
            pipe.incr(mark)
            pipe.expire(mark, self.ttl_s)  # gone is "0": a move too
            await pipe.execute()

    async def _cancel_mark(self) -> str | None:
        mark = await self._call("GET", self._keys.cancel_mark())
        return "0" if mark is None else text(mark)

    async def _cancel_requested(self, job_id: str) -> bool:
        return bool(await self._call("EXISTS", self._key(CANCEL_KEY, job_id)))

    async def _cancel_requested_many(self, job_ids: list[str]) -> set[str]:
        async with bounded("redis"):
            flags = await self._redis.mget([self._key(CANCEL_KEY, job_id) for job_id in job_ids])
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}

    # -- spend counters -----------------------------------------------------

    async def _add_spend(self, counter: str, micro_usd: int, cap: int | None, ttl_s: int) -> int | None:
        """Check and INCRBY in one script (``lua/store_add_spend.lua``): integers, so
        totals are exact, and atomic across every worker on this Redis."""
        total = await self._eval(
            self._add_spend_script,
            [self._key(SPEND_KEY, counter)],
            [micro_usd, "" if cap is None else cap, ttl_s],
        )
        return None if total is None else int(total)

    async def _spent(self, counter: str) -> int:
        raw = await self._call("GET", self._key(SPEND_KEY, counter))
        return int(raw) if raw else 0
