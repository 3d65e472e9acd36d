"""One reader per process for every job stream being waited on (SPEC §7.2).

A waiting ``read_events`` does not park a connection of its own inside Redis. It
registers the job's stream with the process's :class:`RedisEventFeed`, whose single
reader task blocks in one ``XREAD BLOCK`` over all watched streams at once and hands
what it reads to every reader of that job (a job watched by many clients is read
once). The connections the web process holds are therefore the command pool's few
(auto-pipelined) plus this reader's one, whatever the number of open streams.

- **Watch**: per stream key, the reader's cursor (the last event id it read) and a
  short ring of the latest events. A reader at the head of the ring waits on the
  watch; one further behind than the ring reads the log itself (a non-blocking
  XREAD through the auto-pipeline), so a slow reader costs no memory here.
- **Re-arming**: a new watch must join the ``XREAD`` that is already blocked. The
  feed appends to a private wake-up stream (``<prefix>:feed:<uuid>``, one entry,
  expires) that the reader always reads too, so Redis answers at once and the
  reader re-arms with the new key set; wake-ups are coalesced (one per re-arm).
  Watches nobody has waited on for ``LINGER_S`` are dropped at a re-arm (checked once
  a second), and ring entries older than ``RING_AGE_S``.
- **Redis restart**: the reader keeps every cursor, reconnects with back-off and
  re-arms; ids are per-job integers carried by the entries, so each watch resumes
  exactly after its cursor (no gap, no duplicate). Waiters keep waiting meanwhile.
- **Cluster (later)**: a cluster refuses one XREAD over keys in different slots.
  ``_Reader`` owns a key set and one connection; the feed asks ``_reader_for(key)``
  which reader a key belongs to. Today that is always the one reader; on a cluster
  it would be one reader per node (keys grouped by their slot's node, re-grouped
  on MOVED), each with a wake-up key hash-tagged to a slot of its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.event_watch import EventWatch, ReadNow
from adapters.redis_clients import OP_TIMEOUT_S
from adapters.redis_codec import parse_stream, text
from pipeline.model import Event

log = structlog.get_logger("jobq.redis_feed")

BLOCK_MS = 10_000
"""Longest one XREAD of the reader blocks; it re-arms sooner when the key set changes."""
READ_COUNT = 256
"""Entries per stream per XREAD (a job with more waiting gets them on the next read)."""
LINGER_S = 5.0
"""A watch nobody waited on for this long is dropped (an SSE stream comes back to wait
within the time it takes to send what it just got)."""
COALESCE_S = 0.005
"""Pause after a reply before re-arming, so that a busy process reads many events per
XREAD instead of paying one XREAD over every watched key per event."""
PRUNE_S = 1.0
"""How often the reader drops stale watches and old ring entries (at a re-arm)."""
WAKE_TTL_S = 3600
RETRY_MAX_S = 2.0


class _Reader:
    """One connection and one task: XREAD BLOCK over a set of watched keys."""

    def __init__(self, client: aioredis.Redis, wake_key: str, watches: dict[str, EventWatch]) -> None:
        self.client = client
        self.wake_key = wake_key
        self.wake_cursor = b"0-0"
        self.watches = watches
        self.wake_pending = False
        self.task: asyncio.Task[None] | None = None
        self.reads = 0
        self.pruned = 0.0

    async def run(self) -> None:
        delay = 0.05
        down_since: float | None = None
        while True:
            self.wake_pending = False
            self._prune()
            keys = list(self.watches)
            args: list[Any] = ["XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS"]
            args += [self.wake_key, *keys, self.wake_cursor]
            args += [f"{self.watches[key].cursor}-0" for key in keys]
            for key in keys:
                self.watches[key].armed = True
            try:
                async with asyncio.timeout(BLOCK_MS / 1000 + OP_TIMEOUT_S):
                    # redis-py leaves execute_command untyped
                    reply = await self.client.execute_command(*args)  # type: ignore[no-untyped-call]
            except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
                for watch in self.watches.values():
                    watch.armed = False
                if down_since is None:
                    down_since = time.monotonic()
                    error = str(exc) or type(exc).__name__
                    log.warning("redis_feed_reconnecting", error=error, watched=len(keys))
                with contextlib.suppress(Exception):
                    await self.client.connection_pool.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if down_since is not None:
                down_s = round(time.monotonic() - down_since, 2)
                log.warning("redis_feed_reconnected", down_s=down_s, watched=len(keys))
                down_since = None
            delay = 0.05
            self.reads += 1
            self._deliver(reply)
            if reply and not self.wake_pending:
                await asyncio.sleep(COALESCE_S)

    def _deliver(self, reply: Any) -> None:
        for raw_key, entries in _pairs(reply):
            key = text(raw_key)
            if key == self.wake_key:
                if entries:
                    self.wake_cursor = entries[-1][0]
                continue
            watch = self.watches.get(key)
            if watch is not None and entries:
                watch.add(parse_stream([(raw_key, entries)]))

    def ended(self, task: asyncio.Task[None]) -> None:
        """The task ended (closed, or a bug): no watch is covered until it runs again."""
        for watch in self.watches.values():
            watch.armed = False
        if not task.cancelled() and task.exception() is not None:
            log.error("redis_feed_reader_failed", error=repr(task.exception()))

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self.pruned < PRUNE_S:
            return
        self.pruned = now
        stale = now - LINGER_S
        for key in [k for k, w in self.watches.items() if w.idle_since(stale)]:
            del self.watches[key]
        for watch in self.watches.values():
            watch.trim(now)


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """XREAD's reply as (key, entries) pairs: RESP2 gives a list, RESP3 a map."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(pair[0], pair[1]) for pair in reply]


class RedisEventFeed:
    """Waiting reads of job streams for one process, over one shared reader (see the
    module docstring). ``read_now`` reads a stream without blocking (the store's
    auto-pipelined XREAD); ``wake`` appends an entry to a stream (the same pipeline)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        read_now: ReadNow,
        wake: Callable[[str, int], Awaitable[Any]],
        client: aioredis.Redis | None = None,
    ) -> None:
        from adapters.redis_clients import redis_client

        self._read_now = read_now
        self._wake = wake
        self._watches: dict[str, EventWatch] = {}
        self._client = client or redis_client(url, max_connections=1, retries=0)
        self._reader = _Reader(self._client, f"{prefix}:feed:{uuid.uuid4().hex}", self._watches)

    @property
    def watched(self) -> int:
        return len(self._watches)

    @property
    def reads(self) -> int:
        """XREADs the reader has completed (tests and benchmarks)."""
        return self._reader.reads

    def _reader_for(self, key: str) -> _Reader:
        """The reader that watches ``key`` (one per process on a single Redis)."""
        return self._reader

    async def read(self, key: str, after: int, wait_s: float) -> list[Event]:
        """Events of ``key`` after ``after``; when none, wait up to ``wait_s`` for the next."""
        watch = self._watches.get(key)
        if watch is not None:
            watch.used = time.monotonic()
            ring = watch.since(after)
            if ring:
                return ring
            if ring is not None and watch.armed and wait_s > 0:
                return await watch.wait(key, after, wait_s, self._read_now)
        events = await self._read_now(key, after)
        if events or wait_s <= 0:
            return events
        reader = self._reader_for(key)
        watch = self._watches.get(key)
        if watch is None:
            # The log ends at ``after`` now: the reader starts there.
            watch = self._watches[key] = EventWatch(after)
            self._rearm(reader)
        elif reader.task is None or reader.task.done():
            self._rearm(reader)
        return await watch.wait(key, after, wait_s, self._read_now)

    def _rearm(self, reader: _Reader) -> None:
        if reader.task is None or reader.task.done():
            reader.task = asyncio.create_task(reader.run(), name="redis-feed-reader")
            reader.task.add_done_callback(reader.ended)
            return
        if not reader.wake_pending:
            reader.wake_pending = True
            waking = asyncio.ensure_future(self._wake(reader.wake_key, WAKE_TTL_S))
            # A failed wake-up only delays the new watch until the reader's next XREAD.
            waking.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def aclose(self) -> None:
        task = self._reader.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._reader.task = None
        with contextlib.suppress(Exception):
            await self._client.aclose()


