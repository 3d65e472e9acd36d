"""The redis backend's connections: built once per process and shared.

:class:`RedisClients` holds two connection pools to one Redis:

- ``commands``: every short command of the job store, the SAQ queue and the rate
  limiter. A refused connection is retried briefly (a Redis restart), a timeout is
  not (a hung Redis should fail the request, not stall it).
- ``blocking``: commands that park a connection inside Redis, SAQ's BLMOVE (one per
  idle worker slot), plus the health check. (SSE streams park none: they wait on the
  process's event feed, whose one reader has a connection of its own, see
  ``adapters.redis_feed``.)
  One retry: a connection that a Redis restart closed fails at once and is replaced.

The composition root (``handlers.bootstrap``) makes one per Redis URL and hands it
to each adapter; ``from_url`` on an adapter makes its own (tests, benchmarks).
Closing is a disconnect: a pool whose connections were closed reconnects on its
next use, so every adapter sharing the clients may close them when it closes.

Also here: the bounds every Redis operation gets (``OP_TIMEOUT_S``, the health
check's ``PING_BUDGET_S``), the mapping of connection trouble to
:class:`StoreUnavailable`, and the loading of the Lua scripts in ``adapters/lua``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.redis_packing import with_hiredis_packing
from pipeline.model import StoreUnavailable

PING_BUDGET_S = 0.8
"""``ping`` gives up after this long, so /api/jobs/health answers within 1 s."""
OP_TIMEOUT_S = 5.0
"""Longest a store operation may take, retries of a refused connection included."""
MAX_CONNECTIONS = 128
"""Per process, for commands; callers beyond it wait for a free connection. Managed
Redis plans cap connections (Render Key Value starter: a few hundred for all services)."""
MAX_BLOCKING_CONNECTIONS = 20_000
"""Per process, for blocking reads: at least the worker's slots."""

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


class RedisClients:
    """The two pools of one process to the Redis at ``url`` (see the module docstring)."""

    def __init__(self, url: str, commands: aioredis.Redis, blocking: aioredis.Redis) -> None:
        self.url = url
        self.commands = commands
        self.blocking = blocking
        self._pinging: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = MAX_CONNECTIONS) -> RedisClients:
        return cls(
            url=url,
            commands=redis_client(url, max_connections=max_connections),
            blocking=redis_client(url, max_connections=MAX_BLOCKING_CONNECTIONS, retries=1),
        )

    async def ping(self, what: str) -> None:
        """PING answered within ``PING_BUDGET_S``, else :class:`StoreUnavailable`; health
        checks stay fast when Redis is down or hangs, and recover by themselves.

        Callers at the same time share one PING (the store and the queue on the same
        clients, concurrent health checks): one connection, not one per caller. It goes
        over the blocking pool: one retry, for a connection that a Redis restart closed
        (it fails at once and is replaced), and no wait behind busy commands."""
        pinging = self._pinging
        if pinging is None or pinging.done() or pinging.get_loop() is not asyncio.get_running_loop():
            pinging = self._pinging = asyncio.create_task(self._ping_once())
            # Read even when every caller gave up (cancelled) before it ended.
            pinging.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            await asyncio.shield(pinging)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"{what} did not answer: {exc or 'timeout'}") from exc

    async def _ping_once(self) -> None:
        try:
            async with asyncio.timeout(PING_BUDGET_S):
                await self.blocking.ping()
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError):
            # A timed-out command leaves its connection mid-reply: drop the idle ones
            # (the ping's own among them); those in use fail or finish on their own.
            with contextlib.suppress(Exception):
                await self.blocking.connection_pool.disconnect(inuse_connections=False)
            raise

    async def aclose(self) -> None:
        for client in (self.commands, self.blocking):
            with contextlib.suppress(Exception):
                await client.aclose()


class RedisRefused(Exception):
    """Redis answered and refused the connection (password, user, database index):
    unlike a Redis that is down, waiting will not mend it."""


async def check_credentials(url: str) -> None:
    """Raise :class:`RedisRefused` when Redis at ``url`` refuses us; a Redis that does not
    answer passes (it may come up later: health reports it, and the clients reconnect)."""
    client = redis_client(url, max_connections=1, retries=1, connect_timeout_s=PING_BUDGET_S / 2)
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


class UnavailableOnFailure:
    """Connection trouble and a Redis that did not answer in time (``TimeoutError``)
    raised inside become :class:`StoreUnavailable` (HTTP 503). One instance serves any
    number of ``with`` blocks, so a hot path keeps one rather than making a context
    manager (and its generator) per use."""

    __slots__ = ("timeout_s", "what")

    def __init__(self, what: str, timeout_s: float = OP_TIMEOUT_S) -> None:
        self.what = what
        self.timeout_s = timeout_s

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, TimeoutError):
            raise StoreUnavailable(f"{self.what} did not answer within {self.timeout_s:g}s") from exc
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
            raise StoreUnavailable(f"{self.what}: {exc}") from exc


REDIS_UNAVAILABLE = UnavailableOnFailure("redis")
"""Redis failures within ``OP_TIMEOUT_S`` as ``StoreUnavailable``, for every hot path."""


@contextlib.asynccontextmanager
async def bounded(what: str, timeout_s: float = OP_TIMEOUT_S) -> AsyncIterator[None]:
    """Bound an operation in time; errors as in :class:`UnavailableOnFailure`."""
    with UnavailableOnFailure(what, timeout_s):
        async with asyncio.timeout(timeout_s):
            yield


def lua_script(*names: str) -> str:
    """The Lua source of ``adapters/lua/<name>.lua`` for each name, joined in order (a
    script that calls a shared function names that function's file first)."""
    folder = files("adapters") / "lua"
    return "\n".join((folder / f"{name}.lua").read_text(encoding="utf-8") for name in names)
