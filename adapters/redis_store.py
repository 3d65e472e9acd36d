"""The redis backend's store: jobs, artifacts, step cache, event streams and trace.

Key layout (``P`` is the prefix, e.g. ``jobq``)::

    P:job:<id>            hash, one field per Job field (JSON; ``status`` and ``tenant`` raw)
    P:idem:<sha256>       job id for (tenant, Idempotency-Key), 24 h, SET NX semantics
    P:artifacts:<id>      hash name -> "<seq> <artifact JSON>", field ``#seq`` the counter
    P:cache:<key>         artifact JSON
    P:events:<id>         stream, entry id ``<n>-0`` for event n; P:evseq:<id> the counter
    P:trace:<id>          list of LLM call records
    P:cancel:<id>         the cancel flag
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

The Lua scripts build index key names from the prefix, which is fine on a single
Redis (Render Key Value) but not on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.constants import (
    ARTIFACT_KEY,
    CACHE_KEY,
    CANCEL_KEY,
    EVENTS_KEY,
    IDEMPOTENCY_KEY,
    INDEX_KEY,
    JOB_KEY,
    KEY_PREFIX,
    TRACE_KEY,
)
from adapters.redis_packing import with_hiredis_packing
from pipeline.model import (
    JSON,
    Artifact,
    Commit,
    Event,
    Expect,
    Job,
    StoreUnavailable,
    list_cursor,
    parse_list_cursor,
)
from pipeline.ports import JobStore
from pipeline.vocabulary import ACTIVE_STATUSES, IDEMPOTENCY_TTL_S, STATUSES

log = structlog.get_logger("jobq.store")

PING_BUDGET_S = 0.8
"""``ping`` gives up after this long, so /api/jobs/health answers within 1 s."""
OP_TIMEOUT_S = 5.0
"""Longest a store operation may take, retries of a refused connection included."""
PRUNE_BATCH = 200
MAX_CONNECTIONS = 128
"""Per process and pool; callers beyond it wait for a free connection. Managed Redis
plans cap connections (Render Key Value starter: a few hundred for all services)."""
AUTO_PIPELINES_IN_FLIGHT = 2
"""Auto-pipelines out at once per client (see ``AutoPipeline``)."""
MAX_BLOCKING_CONNECTIONS = 4096

_RAW_FIELDS = frozenset({"status", "tenant"})
_STATUS_LIST = "{" + ",".join(f"'{s}'" for s in STATUSES) + "}"

_CREATE = """
-- KEYS: job, idempotency key (or ''), event counter, event stream
-- ARGV: prefix, id, tenant, status, created, ttl, idem_ttl, n_events,
--       (type, data)..., then the job's (field, value) pairs
local job_key, idem_key, seq_key, ev_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, id, tenant, status, created = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, idem_ttl, n_events = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local fields_at = 9 + 2 * n_events
if idem_key ~= '' then
  local existing = redis.call('GET', idem_key)
  if existing and redis.call('EXISTS', prefix .. ':job:' .. existing) == 1 then
    return existing
  end
  redis.call('SET', idem_key, id, 'EX', idem_ttl)
end
if redis.call('EXISTS', job_key) == 1 then
  return redis.error_reply('job ' .. id .. ' exists')
end
redis.call('HSET', job_key, unpack(ARGV, fields_at))
redis.call('EXPIRE', job_key, ttl)
for j = 9, fields_at - 1, 2 do
  local n = redis.call('INCR', seq_key)
  redis.call('XADD', ev_key, n .. '-0', 'type', ARGV[j], 'data', ARGV[j + 1])
end
if n_events > 0 then
  redis.call('EXPIRE', seq_key, ttl)
  redis.call('EXPIRE', ev_key, ttl)
end
local idx = prefix .. ':index:'
redis.call('ZADD', idx .. 'all', created, id)
redis.call('ZADD', idx .. 'status:' .. status, created, id)
redis.call('ZADD', idx .. 'tenant:' .. tenant, created, id)
redis.call('ZADD', idx .. 'tstatus:' .. status .. ':' .. tenant, created, id)
redis.call('HSET', idx .. 'owner', id, tenant)
return false
"""

_COMMIT = """
-- KEYS: the job's keys (see _job_keys), then one key per step cache entry.
-- ARGV: prefix, id, ttl, want_job, attempts (-1: any), n_expect (-1: any), expected...,
--       n_changes, (field, value)..., n_events, (type, data)..., n_artifacts,
--       (name, doc)..., n_cache, doc..., n_traces, record...
local job_key, art_key, ev_key, seq_key, trace_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, id, ttl, want_job = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local want_attempts = tonumber(ARGV[5])
if want_attempts >= 0 then
  -- a later delivery counted its attempt: this one writes nothing more
  local held = redis.call('HGET', job_key, 'attempts')
  if not held or tonumber(held) ~= want_attempts then return false end
end
local i = 6
local n_expect = tonumber(ARGV[i]); i = i + 1
local expected = {}
if n_expect > 0 then
  for j = i, i + n_expect - 1 do expected[ARGV[j]] = true end
  i = i + n_expect
end
local n_changes = tonumber(ARGV[i]); i = i + 1
local changes_at = i; i = i + 2 * n_changes
local n_events = tonumber(ARGV[i]); i = i + 1
local events_at = i; i = i + 2 * n_events
local n_artifacts = tonumber(ARGV[i]); i = i + 1
for j = i, i + 2 * n_artifacts - 1, 2 do
  local seq = redis.call('HINCRBY', art_key, '#seq', 1)
  redis.call('HSET', art_key, ARGV[j], seq .. ' ' .. ARGV[j + 1])
end
if n_artifacts > 0 then redis.call('EXPIRE', art_key, ttl) end
i = i + 2 * n_artifacts
local n_cache = tonumber(ARGV[i]); i = i + 1
for j = 1, n_cache do
  redis.call('SET', KEYS[6 + j], ARGV[i + j - 1], 'EX', ttl)
end
i = i + n_cache
local n_traces = tonumber(ARGV[i]); i = i + 1
if n_traces > 0 then
  redis.call('RPUSH', trace_key, unpack(ARGV, i, i + n_traces - 1))
  redis.call('EXPIRE', trace_key, ttl)
end
local current = redis.call('HGET', job_key, 'status')
if not current then return false end
if n_expect >= 0 and not expected[current] then return false end
local changes, new_status = {}, nil
for j = changes_at, changes_at + 2 * n_changes - 1, 2 do
  changes[#changes + 1] = ARGV[j]
  changes[#changes + 1] = ARGV[j + 1]
  if ARGV[j] == 'status' then new_status = ARGV[j + 1] end
end
if #changes > 0 then redis.call('HSET', job_key, unpack(changes)) end
if new_status and new_status ~= current then
  local tenant = redis.call('HGET', job_key, 'tenant')
  local created = redis.call('HGET', job_key, 'created_at')
  local idx = prefix .. ':index:'
  redis.call('ZREM', idx .. 'status:' .. current, id)
  redis.call('ZADD', idx .. 'status:' .. new_status, created, id)
  redis.call('ZREM', idx .. 'tstatus:' .. current .. ':' .. tenant, id)
  redis.call('ZADD', idx .. 'tstatus:' .. new_status .. ':' .. tenant, created, id)
end
for j = events_at, events_at + 2 * n_events - 1, 2 do
  local n = redis.call('INCR', seq_key)
  redis.call('XADD', ev_key, n .. '-0', 'type', ARGV[j], 'data', ARGV[j + 1])
end
for j = 1, 6 do redis.call('EXPIRE', KEYS[j], ttl) end
if want_job == '1' then return redis.call('HGETALL', job_key) end
return 1
"""

_UNINDEX = """
local function unindex(idx, id, tenant)
  redis.call('ZREM', idx .. 'all', id)
  redis.call('HDEL', idx .. 'owner', id)
  for _, s in ipairs(__STATUSES__) do
    redis.call('ZREM', idx .. 'status:' .. s, id)
    if tenant then redis.call('ZREM', idx .. 'tstatus:' .. s .. ':' .. tenant, id) end
  end
  if tenant then redis.call('ZREM', idx .. 'tenant:' .. tenant, id) end
end
""".replace("__STATUSES__", _STATUS_LIST)
"""Removes a job id from every listing and count index (delete, and pruning of expired jobs)."""

_DELETE = _UNINDEX + """
local prefix, id = ARGV[1], ARGV[2]
local tenant = redis.call('HGET', KEYS[1], 'tenant')
  or redis.call('HGET', prefix .. ':index:owner', id)
local idem_key = KEYS[#KEYS]
if idem_key ~= '' and redis.call('GET', idem_key) == id then redis.call('DEL', idem_key) end
for i = 1, #KEYS - 1 do redis.call('DEL', KEYS[i]) end
unindex(prefix .. ':index:', id, tenant)
return 1
"""

_PRUNE = _UNINDEX + """
local prefix, cutoff, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local idx = prefix .. ':index:'
local removed = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', idx .. 'all', '-inf', cutoff, 'LIMIT', 0, batch)) do
  if redis.call('EXISTS', prefix .. ':job:' .. id) == 0 then
    unindex(idx, id, redis.call('HGET', idx .. 'owner', id))
    removed = removed + 1
  end
end
return removed
"""

_PUT_ARTIFACT = """
local seq = redis.call('HINCRBY', KEYS[1], '#seq', 1)
redis.call('HSET', KEYS[1], ARGV[1], seq .. ' ' .. ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return seq
"""

_APPEND_EVENT = """
local n = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], n .. '-0', 'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return n
"""


async def ping_within_budget(client: aioredis.Redis, what: str) -> None:
    """PING answered within ``PING_BUDGET_S``, else :class:`StoreUnavailable`; health
    checks stay fast when Redis is down or hangs, and recover by themselves."""
    try:
        async with asyncio.timeout(PING_BUDGET_S):
            await client.ping()
    except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
        # A timed-out command leaves its connection mid-reply: drop them all.
        with contextlib.suppress(Exception):
            await client.connection_pool.disconnect()
        raise StoreUnavailable(f"{what} did not answer: {exc or 'timeout'}") from exc


class RedisRefused(Exception):
    """Redis answered and refused the connection (password, user, database index):
    unlike a Redis that is down, waiting will not mend it."""


async def check_credentials(url: str) -> None:
    """Raise :class:`RedisRefused` when Redis at ``url`` refuses us; a Redis that does not
    answer passes (it may come up later: health reports it, and the clients reconnect)."""
    client = ping_client(url)
    try:
        async with asyncio.timeout(PING_BUDGET_S * 2):
            await client.ping()
    except (AuthenticationError, ResponseError) as exc:
        raise RedisRefused(str(exc)) from None
    except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def ping_client(url: str) -> aioredis.Redis:
    """A client for health checks: short timeouts and one retry, for a connection that a
    Redis restart closed (it fails at once and is replaced). A down or hung Redis is
    reported within ``PING_BUDGET_S``, a restarted one is not, and a later ping
    reconnects by itself."""
    return redis_client(url, max_connections=4, retries=1, connect_timeout_s=PING_BUDGET_S / 2)


_DRIVER_INFO = DriverInfo()


def redis_client(
    url: str,
    *,
    max_connections: int,
    retries: int = 6,
    pool_timeout_s: float = 10.0,
    connect_timeout_s: float = 2.0,
) -> aioredis.Redis:
    """A redis-py client fit for cancellation-heavy asyncio code.

    - No ``socket_timeout``: with one set, redis-py sends each command through
      ``asyncio.wait_for``, which on Python 3.11 swallows a ``cancel()`` that lands
      as the send completes (CPython gh-86296). A cancelled task then keeps running,
      e.g. the pipeline's cancel watcher, and whoever awaits it hangs for good.
      Callers bound each operation with ``asyncio.timeout`` instead (safe on 3.11).
    - The pool *waits* for a free connection when all are busy (redis-py's default
      pool raises "Too many connections" at 100, which a worker running 50 jobs
      with parallel steps reaches).
    - Retries cover refused connections only (a Redis restart), not timeouts.
    - Commands are packed by hiredis (``adapters.redis_packing``), not in Python.
    - Every connection shares one ``DriverInfo``: without it, each new connection reads
      redis-py's version from its package metadata (an e-mail header parse, ~0.9 ms
      measured), and a worker opens dozens at once when a burst of jobs starts.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        driver_info=_DRIVER_INFO,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        socket_timeout=None,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=15,
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=1.0) if retries else NoBackoff(),
            retries,
            supported_errors=(RedisConnectionError,),
        ),
    )
    pool.connection_class = with_hiredis_packing(pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def _dumps(value: Any) -> bytes:
    """JSON for Redis values: msgspec encodes several times faster than ``json.dumps``
    and writes what ``json.loads`` reads back the same."""
    return msgspec.json.encode(value)


def _encode_job(job: Job) -> dict[str, str | bytes]:
    return {
        name: value if name in _RAW_FIELDS else _dumps(value) for name, value in job.to_dict().items()
    }


def _decode_job(raw: dict[bytes, bytes] | dict[str, str] | list[Any]) -> Job | None:
    if isinstance(raw, list):  # HGETALL from Lua: a flat [field, value, ...] list
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    if not raw:
        return None
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        text = value.decode() if isinstance(value, bytes) else value
        data[name] = text if name in _RAW_FIELDS else _loads(text)
    return Job.from_dict(data)


_loads = msgspec.json.Decoder().decode


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _members(rows: Any) -> list[tuple[str, float]]:
    """``ZRANGE ... WITHSCORES`` rows as (member, score)."""
    return [(_text(member), float(score)) for member, score in rows]


class AutoPipeline:
    """Commands issued in the same event-loop turn, by any task, go to Redis as one
    pipeline (one connection checkout, one write, one read of all replies), so a
    worker running many jobs pays the client's per-command overhead once per turn
    instead of once per command. Each command keeps its own reply or error; none is
    atomic with another (each commit is one atomic script already).

    At most ``max_in_flight`` pipelines are out at once: commands issued meanwhile
    wait for one to return and go together, so under load the batches grow instead of
    the number of connection checkouts and round trips."""

    def __init__(self, client: aioredis.Redis, max_in_flight: int = AUTO_PIPELINES_IN_FLIGHT) -> None:
        self.client = client
        self.max_in_flight = max_in_flight
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.sending: set[asyncio.Task[None]] = set()
        self.scheduled = False

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self.pending.append((args, reply))
        if not self.scheduled and len(self.sending) < self.max_in_flight:
            self.scheduled = True
            loop.call_soon(self._send_pending)
        return reply

    def _send_pending(self) -> None:
        self.scheduled = False
        batch = [(args, reply) for args, reply in self.pending if not reply.done()]
        self.pending = []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self.sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.sending.discard(task)
        if self.pending and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._send_pending)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                async with self.client.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # every caller sees it (as StoreUnavailable via _op)
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, reply), value in zip(batch, replies, strict=True):
            if reply.done():
                continue  # its caller gave up (cancelled); the command ran anyway
            if isinstance(value, Exception):
                reply.set_exception(value)
            else:
                reply.set_result(value)

    async def eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``script`` by EVALSHA in a batch; loaded again if Redis forgot it (a restart)."""
        try:
            return await self.submit("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            async with asyncio.timeout(OP_TIMEOUT_S):
                return await script(keys=keys, args=args)


class RedisStore(JobStore):
    """``JobStore`` on ``redis.asyncio``; a job's keys expire ``ttl_s`` after its last write."""

    def __init__(
        self,
        url: str,
        prefix: str = KEY_PREFIX,
        ttl_s: int = 604800,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        # Normal commands: a refused connection is retried briefly (a Redis restart),
        # a timeout is not (a hung Redis should fail the request, not stall it).
        self._redis = redis_client(url, max_connections=max_connections)
        # XREAD BLOCK holds a connection for up to ``wait_s`` (one per SSE client): its
        # own pool, no socket timeout; ``asyncio.timeout`` bounds each read instead.
        # One retry: a connection that a Redis restart closed fails at once and is
        # replaced, where no retry failed one stream per pooled connection.
        self._blocking = redis_client(url, max_connections=MAX_BLOCKING_CONNECTIONS, retries=1)
        self._ping_client = ping_client(url)
        self._create_script = self._redis.register_script(_CREATE)
        self._commit_script = self._redis.register_script(_COMMIT)
        self._auto = AutoPipeline(self._redis)
        self._delete_script = self._redis.register_script(_DELETE)
        self._prune_script = self._redis.register_script(_PRUNE)
        self._put_artifact_script = self._redis.register_script(_PUT_ARTIFACT)
        self._append_script = self._redis.register_script(_APPEND_EVENT)

    # -- keys ---------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def _job_keys(self, job_id: str) -> list[str]:
        """The job hash first, then every key the job owns (for expiry and delete)."""
        return [
            self._key(JOB_KEY, job_id),
            self._key(ARTIFACT_KEY, job_id),
            self._key(EVENTS_KEY, job_id),
            self._key("evseq", job_id),
            self._key(TRACE_KEY, job_id),
            self._key(CANCEL_KEY, job_id),
        ]

    def _idem_key(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()
        return self._key(IDEMPOTENCY_KEY, digest)

    def _index(self, tenant: str | None, status: str | None) -> str:
        base = f"{self.prefix}:{INDEX_KEY}:"
        if tenant is None:
            return base + (f"status:{status}" if status else "all")
        return base + (f"tstatus:{status}:{tenant}" if status else f"tenant:{tenant}")

    async def _call(self, *args: Any) -> Any:
        """One command through the auto-pipeline, which bounds it in time already (a
        batch ahead of it, then its own batch: ``OP_TIMEOUT_S`` each), so it needs no
        timeout scope of its own (the hot path: reads and commits of running jobs)."""
        try:
            return await self._auto.submit(*args)
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis did not answer within {OP_TIMEOUT_S:g}s") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``script`` through the auto-pipeline, errors as in :meth:`_call`."""
        try:
            return await self._auto.eval(script, keys, args)
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis did not answer within {OP_TIMEOUT_S:g}s") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _op(self, timeout_s: float = OP_TIMEOUT_S) -> AsyncIterator[None]:
        """Bound a store operation in time; connection trouble and a Redis that does
        not answer become :class:`StoreUnavailable` (HTTP 503)."""
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis did not answer within {timeout_s:g}s") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        """Connections are made lazily; a Redis that is down now is reported by
        ``ping`` (503 on /health) and picked up when it returns."""
        try:
            await self.ping()
        except StoreUnavailable as exc:
            log.warning("redis_unavailable_at_start", error=str(exc))

    async def close(self) -> None:
        for client in (self._redis, self._blocking, self._ping_client):
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> None:
        await ping_within_budget(self._ping_client, "redis")

    # -- jobs ---------------------------------------------------------------

    async def _create(self, job: Job) -> tuple[Job, bool]:
        return await self._create_with_events(job, ())

    async def _create_with_events(
        self, job: Job, events: tuple[tuple[str, JSON], ...]
    ) -> tuple[Job, bool]:
        fields = _encode_job(job)
        idem_key = self._idem_key(job.tenant, job.idempotency_key) if job.idempotency_key else ""
        args: list[str | float | int | bytes] = [
            self.prefix,
            job.id,
            job.tenant,
            job.status,
            repr(job.created_at),
            self.ttl_s,
            IDEMPOTENCY_TTL_S,
            len(events),
        ]
        for type, data in events:
            args += [type, _dumps(data)]
        for name, value in fields.items():
            args += [name, value]
        keys = [
            self._key(JOB_KEY, job.id),
            idem_key,
            self._key("evseq", job.id),
            self._key(EVENTS_KEY, job.id),
        ]
        existing = await self._eval(self._create_script, keys, args)
        if existing:
            found = await self._get(_text(existing))
            if found is not None:
                return found, False
            # The first job vanished between the script and this read: create anew.
            return await self._create_with_events(job, events)
        return job, True

    async def _get(self, job_id: str) -> Job | None:
        raw = await self._call("HGETALL", self._key(JOB_KEY, job_id))
        return _decode_job(cast(dict[bytes, bytes], raw))

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
        return _decode_job(cast(list[Any], raw)) if raw else None

    async def _commit(self, job_id: str, batch: Commit) -> bool:
        return bool(await self._run_commit(job_id, batch, want_job=False))

    async def _run_commit(self, job_id: str, batch: Commit, *, want_job: bool) -> Any:
        """One EVALSHA: artifacts, cache entries and trace records, then the
        compare-and-set update with its events (see ``_COMMIT``)."""
        expect = batch.expect
        args: list[str | int | bytes] = [
            self.prefix,
            job_id,
            self.ttl_s,
            "1" if want_job else "0",
            -1 if expect.attempts is None else expect.attempts,
        ]
        if expect.statuses is None:
            args.append(-1)
        else:
            args += [len(expect.statuses), *sorted(expect.statuses)]
        args.append(len(batch.changes))
        for name, value in batch.changes.items():
            args += [name, value if name in _RAW_FIELDS else _dumps(value)]
        args.append(len(batch.events))
        for type, data in batch.events:
            args += [type, _dumps(data)]
        docs: dict[int, bytes] = {}  # an artifact also cached is encoded once

        def doc(artifact: Artifact) -> bytes:
            found = docs.get(id(artifact))
            if found is None:
                found = docs[id(artifact)] = _dumps(artifact.to_dict())
            return found

        args.append(len(batch.artifacts))
        for artifact in batch.artifacts:
            args += [artifact.name, doc(artifact)]
        args.append(len(batch.cache))
        args += [doc(artifact) for _, artifact in batch.cache]
        args.append(len(batch.traces))
        args += [_dumps(record) for record in batch.traces]
        keys = [*self._job_keys(job_id), *(self._key(CACHE_KEY, key) for key, _ in batch.cache)]
        return await self._eval(self._commit_script, keys, args)

    async def _delete(self, job_id: str) -> None:
        job = await self._get(job_id)
        idem_key = (
            self._idem_key(job.tenant, job.idempotency_key) if job is not None and job.idempotency_key else ""
        )
        async with self._op():
            await self._delete_script(keys=[*self._job_keys(job_id), idem_key], args=[self.prefix, job_id])

    async def _prune(self) -> None:
        """Drop index entries of jobs that expired (only entries older than the TTL can)."""
        cutoff = repr(time.time() - self.ttl_s)
        async with self._op():
            await self._prune_script(keys=[], args=[self.prefix, cutoff, PRUNE_BATCH])

    async def _list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        await self._prune()
        index = self._index(tenant, status)
        after: tuple[float, str] | None = None
        if cursor:
            after = parse_list_cursor(cursor)
        jobs: list[Job] = []
        offset = 0
        batch = limit + 1
        while len(jobs) <= limit:
            top: float | str = after[0] if after else "+inf"
            async with self._op():
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
                for job_id, score in _members(rows)
                if after is None or score < after[0] or job_id < after[1]
            ]
            for job_id, job in zip(ids, await self._get_many(ids), strict=True):
                if job is None:
                    async with self._op():
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

    async def _get_many(self, job_ids: list[str]) -> list[Job | None]:
        if not job_ids:
            return []
        async with self._op(), self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self._key(JOB_KEY, job_id))
            raws = await pipe.execute()
        return [_decode_job(raw) for raw in raws]

    async def _count_by_status(self) -> dict[str, int]:
        await self._prune()
        async with self._op(), self._redis.pipeline(transaction=False) as pipe:
            for status in STATUSES:
                pipe.zcard(self._index(None, status))
            counts = await pipe.execute()
        return {status: int(n) for status, n in zip(STATUSES, counts, strict=True)}

    async def _unfinished_job_ids(self) -> list[str]:
        rows: list[tuple[float, str]] = []
        async with self._op():
            for status in sorted(ACTIVE_STATUSES):
                members = await self._redis.zrange(self._index(None, status), 0, -1, withscores=True)
                rows += [(score, job_id) for job_id, score in _members(members)]
        return [job_id for _, job_id in sorted(rows)]

    # -- artifacts and cache ------------------------------------------------

    async def _put_artifact(self, job_id: str, artifact: Artifact) -> None:
        async with self._op():
            await self._put_artifact_script(
                keys=[self._key(ARTIFACT_KEY, job_id)],
                args=[artifact.name, json.dumps(artifact.to_dict()), self.ttl_s],
            )

    async def _get_artifact(self, job_id: str, name: str) -> Artifact | None:
        async with self._op():
            raw = await self._redis.hget(self._key(ARTIFACT_KEY, job_id), name)
        if raw is None:
            return None
        _, _, doc = _text(raw).partition(" ")
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
        async with self._op():
            raw = await self._redis.getex(self._key(CACHE_KEY, key), ex=self.ttl_s)
        return Artifact.from_dict(json.loads(raw)) if raw else None

    async def _cache_get_many(self, keys: list[str]) -> list[Artifact | None]:
        raws = await asyncio.gather(
            *(self._call("GETEX", self._key(CACHE_KEY, key), "EX", self.ttl_s) for key in keys)
        )
        return [Artifact.from_dict(_loads(raw)) if raw else None for raw in raws]

    async def _cache_put(self, key: str, artifact: Artifact) -> None:
        async with self._op():
            await self._redis.set(self._key(CACHE_KEY, key), json.dumps(artifact.to_dict()), ex=self.ttl_s)

    # -- events and trace ---------------------------------------------------

    async def _append_event(self, job_id: str, type: str, data: JSON) -> Event:
        async with self._op():
            event_id = await self._append_script(
                keys=[self._key("evseq", job_id), self._key(EVENTS_KEY, job_id)],
                args=[type, json.dumps(data), self.ttl_s],
            )
        return Event(int(event_id), type, data)

    @staticmethod
    def _parse_stream(reply: Any) -> list[Event]:
        events: list[Event] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                number = int(_text(entry_id).split("-", 1)[0])
                events.append(Event(number, fields[b"type"].decode(), json.loads(fields[b"data"])))
        return events

    async def _read_events(self, job_id: str, after: int, wait_s: float) -> list[Event]:
        stream: dict[Any, Any] = {self._key(EVENTS_KEY, job_id): f"{after}-0"}
        async with self._op():
            events = self._parse_stream(await self._redis.xread(stream))
        if events or wait_s <= 0:
            return events
        # XREAD BLOCK: Redis answers when an event is appended or after ``wait_s``.
        async with self._op(wait_s + OP_TIMEOUT_S):
            reply = await self._blocking.xread(stream, block=max(1, int(wait_s * 1000)))
        return self._parse_stream(reply)

    async def _add_trace(self, job_id: str, record: JSON) -> None:
        key = self._key(TRACE_KEY, job_id)
        async with self._op(), self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(record))
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def _get_trace(self, job_id: str) -> list[JSON]:
        async with self._op():
            rows = await self._redis.lrange(self._key(TRACE_KEY, job_id), 0, -1)
        return [cast(JSON, json.loads(row)) for row in rows]

    # -- cancellation -------------------------------------------------------

    async def _request_cancel(self, job_id: str) -> None:
        async with self._op():
            await self._redis.set(self._key(CANCEL_KEY, job_id), b"1", ex=self.ttl_s)

    async def _cancel_requested(self, job_id: str) -> bool:
        return bool(await self._call("EXISTS", self._key(CANCEL_KEY, job_id)))

    async def _cancel_requested_many(self, job_ids: list[str]) -> set[str]:
        async with self._op():
            flags = await self._redis.mget([self._key(CANCEL_KEY, job_id) for job_id in job_ids])
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}
