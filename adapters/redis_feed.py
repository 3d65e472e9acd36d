"""One subscriber per process for every job stream being waited on (SPEC §7.2).

Every script that appends to a job's event stream also PUBLISHes the event on a
channel named after the stream's key (``<n> <type> <data JSON>``). A waiting
``read_events`` does not park a connection of its own inside Redis: it registers
the job's stream with the process's :class:`RedisEventFeed`, whose single
subscriber connection is SUBSCRIBEd to every watched stream's channel and hands
each event to every reader of that job (a job watched by many clients is received
once). The connections the web process holds are therefore the command pool's few
(auto-pipelined) plus this subscriber's one, whatever the number of open streams,
and an event costs Redis one PUBLISH, not a re-armed read over every watched key.

- **Watch**: per stream key, the last event id received (the cursor) and a short
  ring of the latest events. A reader at the head of the ring waits on the watch;
  one further behind than the ring reads the log itself (a non-blocking XREAD
  through the auto-pipeline), so a slow reader costs no memory here.
- **No gap**: events written between a reader's last read and Redis confirming the
  subscription would be missed by the channel, so each confirmation is followed by
  a read of the log after the watch's cursor, and the watch counts as covered
  (``armed``) only once that read is in. A new watch therefore starts without a read
  of its own, and a wait that ends before its watch is covered reads the log. A
  waiting read that times out on a job with no event for ``QUIET_READ_S`` reads the
  log once more, so even a writer that does not publish (an older worker during a
  rolling deploy) is followed, at heartbeat pace.
- **Pruning**: watches nobody has waited on for ``LINGER_S`` are unsubscribed and
  dropped (checked every ``PRUNE_S``), and ring entries older than ``RING_AGE_S``.
- **Redis restart or a silent connection** (no answer to PING for ``DEAD_S``): the
  subscriber keeps every cursor, reconnects with back-off, subscribes again and
  reads each log after its cursor; ids are per-job integers carried by the entries,
  so each watch resumes exactly after its cursor (no gap, no duplicate). Waiters
  keep waiting meanwhile.
- **Cluster (later)**: a cluster broadcasts PUBLISH to every node; its sharded
  form (SPUBLISH/SSUBSCRIBE, Redis 7) keeps a channel on the node of its slot, and
  the channel here is the stream's own key, so it shares the stream's slot.
  ``_Subscriber`` owns a key set and one connection; the feed asks
  ``_reader_for(key)`` which subscriber a key belongs to. Today that is always the
  one; on a cluster it would be one per node (keys grouped by their slot's node,
  re-grouped on MOVED).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import hiredis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.event_watch import EventWatch, ReadNow
from adapters.redis_clients import redis_client
from adapters.redis_codec import loads_event_data
from pipeline.model import Event

log = structlog.get_logger("jobq.redis_feed")

READ_COUNT = 256
"""Entries per XREAD of one log (a reader with more to catch up reads again)."""
LINGER_S = 5.0
"""A watch nobody waited on for this long is dropped (an SSE stream comes back to wait
within the time it takes to send what it just got)."""
PRUNE_S = 0.5
"""How often the subscriber drops stale watches and old ring entries."""
PRUNE_SLICE = 200
"""Watches pruned per turn of the event loop."""
PING_S = 5.0
"""A quiet subscriber PINGs Redis this often."""
DEAD_S = 15.0
"""A subscriber that heard nothing (not even a PONG) for this long reconnects."""
SUBSCRIBE_BATCH = 1000
"""Channels per SUBSCRIBE when a reconnect subscribes every watch again."""
RETRY_MAX_S = 2.0
QUIET_READ_S = 5.0
"""A wait that times out on a job with no event for this long reads the job's log."""


class _Takeover(asyncio.Protocol):
    """The subscriber connection's protocol once redis-py has connected it (the
    handshake done): every reply a read of the socket brings is parsed by hiredis and
    handled in the transport's own read callback. A task woken to read (redis-py's
    ``read_response``, or a read of its stream) would handle an event one turn of the
    event loop later, and under load a turn is long. redis-py's protocol still gets
    the connection's end and its flow control, so its sends and its ``disconnect``
    work as before."""

    def __init__(
        self, transport: asyncio.Transport, previous: asyncio.BaseProtocol, subscriber: _Subscriber
    ) -> None:
        self.transport = transport
        self.previous = previous
        self.subscriber = subscriber
        self.parser = hiredis.Reader(notEnoughData=_NOT_ENOUGH_DATA)
        self.ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        """Set, to the error the subscriber raises, when the connection is done with."""

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        self.subscriber.heard = time.monotonic()
        handle = self.subscriber.handle
        try:
            self.parser.feed(data)
            while (reply := self.parser.gets()) is not _NOT_ENOUGH_DATA:
                handle(reply)
        except hiredis.ProtocolError as exc:
            self._end(RedisConnectionError(f"the subscriber's connection sent what is not RESP: {exc}"))
        except Exception as exc:  # a bug: the subscriber's task raises it and ends (logged)
            self._end(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes, and connection_lost ends the subscriber's wait

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError("the subscriber's connection was closed"))
        self.previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self.previous.pause_writing()

    def resume_writing(self) -> None:
        self.previous.resume_writing()

    def _end(self, error: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(error)
            self.transport.close()


_NOT_ENOUGH_DATA = object()


def _take_over(conn: AbstractConnection, subscriber: _Subscriber) -> _Takeover | None:
    """Put a :class:`_Takeover` under ``conn``'s transport, fresh from ``connect()`` (no
    reply is pending: nothing was sent yet but the handshake). ``None`` where redis-py
    does not keep an asyncio stream writer (a private part, checked here): the
    subscriber then reads through ``read_response``."""
    writer = getattr(conn, "_writer", None)
    if not isinstance(writer, asyncio.StreamWriter):
        return None
    # Not isinstance(asyncio.Transport): uvloop's transports are not its subclasses.
    transport: Any = writer.transport
    if not callable(getattr(transport, "set_protocol", None)):
        return None
    takeover = _Takeover(transport, transport.get_protocol(), subscriber)
    transport.set_protocol(takeover)
    return takeover


def published_event(data: bytes) -> Event:
    """An event as the store's scripts publish it: ``<n> <type> <data JSON>``."""
    number, type, payload = data.split(b" ", 2)
    return Event(int(number), type.decode(), loads_event_data(payload))


class _Subscriber:
    """One connection in subscribe mode and one task reading it."""

    def __init__(self, client: aioredis.Redis, watches: dict[str, EventWatch], read_now: ReadNow) -> None:
        self.client = client
        self.watches = watches
        self.read_now = read_now
        self.conn: AbstractConnection | None = None
        self.takeover: _Takeover | None = None
        self.live = False
        """Connected and subscribed: a new watch may SUBSCRIBE on its own."""
        self.pending: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        self.reads = 0
        self.connects = 0
        """Connections made, reconnects included (tests and benchmarks)."""
        self.heard = 0.0
        self.pinged = 0.0
        self.silent = False
        """Set when housekeeping closed the connection for silence."""
        self._catching_up: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        delay = 0.05
        down_since: float | None = None
        while True:
            housekeeping: asyncio.Task[None] | None = None
            try:
                await self._connect()
                if down_since is not None:
                    down_s = round(time.monotonic() - down_since, 2)
                    log.warning("redis_feed_reconnected", down_s=down_s, watched=len(self.watches))
                    down_since = None
                delay = 0.05
                housekeeping = asyncio.create_task(self._housekeep(), name="redis-feed-housekeeping")
                await self._listen()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if housekeeping is not None:
                    housekeeping.cancel()  # before it touches the closed connection
                silent, self.silent = self.silent, False
                self.live = False
                for watch in self.watches.values():
                    watch.armed = False
                if down_since is None:
                    down_since = time.monotonic()
                    error = f"no reply for {DEAD_S:.0f} s" if silent else str(exc) or type(exc).__name__
                    log.warning("redis_feed_reconnecting", error=error, watched=len(self.watches))
                if self.conn is not None:
                    with contextlib.suppress(Exception):
                        await self.conn.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            finally:
                if housekeeping is not None:
                    housekeeping.cancel()

    async def _connect(self) -> None:
        if self.conn is None:
            self.conn = await self.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        await self.conn.connect()
        self.takeover = _take_over(self.conn, self)
        self.connects += 1
        self.heard = self.pinged = time.monotonic()
        # Live before the key set is taken: a watch added while the SUBSCRIBEs below are
        # sent subscribes on its own, so none falls between the two.
        self.live = True
        self.pending.clear()
        keys = list(self.watches)
        for start in range(0, len(keys), SUBSCRIBE_BATCH):
            await self._send("SUBSCRIBE", *keys[start : start + SUBSCRIBE_BATCH])

    async def _send(self, *args: str) -> None:
        assert self.conn is not None
        await self.conn.send_command(*args, check_health=False)

    async def _listen(self) -> None:
        """Handle what the subscription receives until the connection ends. No timeout
        per read (a timer per event adds up at thousands a second): :meth:`_housekeep`
        pings a quiet connection and closes a silent one, which ends this wait.

        Where the connection was taken over (:func:`_take_over`), replies are handled
        in the transport's read callback and this only waits for the end; otherwise it
        reads through redis-py's ``read_response``, a chain of coroutines per message."""
        assert self.conn is not None
        if self.takeover is not None:
            raise await self.takeover.ended
        while True:
            # push_request: over RESP3, what a subscription receives comes as pushes.
            reply = await self.conn.read_response(
                timeout=math.inf, disconnect_on_error=False, push_request=True
            )
            self.heard = time.monotonic()
            self.handle(reply)

    async def _housekeep(self) -> None:
        """Every ``PRUNE_S``: drop stale watches and old ring entries, PING a quiet
        connection, close one silent for ``DEAD_S`` (the reader then reconnects)."""
        assert self.conn is not None
        while True:
            await asyncio.sleep(PRUNE_S)
            now = time.monotonic()
            if now - self.heard >= DEAD_S:
                self.silent = True
                await self.conn.disconnect(nowait=True)
                return
            try:
                if now - self.heard >= PING_S and now - self.pinged >= PING_S:
                    self.pinged = now
                    await self._send("PING")
                await self._prune(now)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                return  # the connection broke: the reader sees it too, and reconnects

    def handle(self, reply: Any) -> None:
        """One reply the subscription received: an event, or a subscription confirmed
        (followed by a read of the log, see "No gap")."""
        if isinstance(reply, Exception):
            log.warning("redis_feed_error_reply", error=str(reply))
            return
        kind, channel = reply[0], reply[1]
        if kind == b"message":
            watch = self.watches.get(channel.decode())
            if watch is not None:
                self.reads += 1
                watch.add([published_event(reply[2])])
        elif kind == b"subscribe":
            key = channel.decode()
            watch = self.watches.get(key)
            if watch is not None and not watch.armed:
                catching_up = asyncio.ensure_future(self._catch_up(key, watch))
                self._catching_up.add(catching_up)
                catching_up.add_done_callback(self._catching_up.discard)

    async def _catch_up(self, key: str, watch: EventWatch) -> None:
        """Whatever the log got before the subscription took effect; the watch is armed
        once that is read, and only if the connection that confirmed the subscription
        is still the one up."""
        connection = self.connects
        try:
            events = await self.read_now(key, watch.cursor)
        except Exception as exc:  # a waiter's timed-out read covers what this misses
            log.warning("redis_feed_catch_up_failed", key=key, error=repr(exc))
            return
        if events:
            watch.add(events)
        if self.live and self.connects == connection and self.watches.get(key) is watch:
            watch.armed = True

    def subscribe(self, key: str) -> None:
        """SUBSCRIBE ``key`` soon (one command for every key added in this turn)."""
        if not self.live:
            return  # the reconnect subscribes every watch
        if not self.pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self.pending.add(key)

    def _flush(self) -> None:
        keys = [key for key in self.pending if key in self.watches]
        self.pending.clear()
        if keys and self.live:
            sending = asyncio.ensure_future(self._send("SUBSCRIBE", *keys))
            # A failed send breaks the connection; the reconnect subscribes every watch.
            sending.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _prune(self, now: float) -> None:
        """Drop stale watches and old ring entries, ``PRUNE_SLICE`` watches per turn of
        the loop: one pass over thousands of watches would hold up every stream's next
        event for as long. A slice's stale keys are unsubscribed before the loop turns,
        so a watch made again for one of them subscribes after it."""
        stale_before = now - LINGER_S
        watches = list(self.watches.items())
        for start in range(0, len(watches), PRUNE_SLICE):
            if start:
                await asyncio.sleep(0)
            now = time.monotonic()
            stale = []
            for key, watch in watches[start : start + PRUNE_SLICE]:
                if watch.idle_since(stale_before):
                    if self.watches.get(key) is watch:
                        del self.watches[key]
                        stale.append(key)
                elif watch.ring:
                    watch.trim(now)
            if stale:
                await self._send("UNSUBSCRIBE", *stale)

    def ended(self, task: asyncio.Task[None]) -> None:
        """The task ended (closed, or a bug): no watch is covered until it runs again."""
        self.live = False
        for watch in self.watches.values():
            watch.armed = False
        if not task.cancelled() and task.exception() is not None:
            log.error("redis_feed_reader_failed", error=repr(task.exception()))


class RedisEventFeed:
    """Waiting reads of job streams for one process, over one shared subscriber (see
    the module docstring). ``read_now`` reads a stream without blocking (the store's
    auto-pipelined XREAD)."""

    def __init__(self, url: str, read_now: ReadNow, client: aioredis.Redis | None = None) -> None:
        self._read_now = read_now
        self._watches: dict[str, EventWatch] = {}
        self._client = client or redis_client(url, max_connections=1, retries=0)
        self._reader = _Subscriber(self._client, self._watches, read_now)

    @property
    def watched(self) -> int:
        return len(self._watches)

    @property
    def reads(self) -> int:
        """Events the subscriber has received (tests and benchmarks)."""
        return self._reader.reads

    def _reader_for(self, key: str) -> _Subscriber:
        """The subscriber that watches ``key`` (one per process on a single Redis)."""
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
                return await watch.wait(key, after, wait_s, self._read_now, QUIET_READ_S)
        if wait_s <= 0:
            return await self._read_now(key, after)
        reader = self._reader_for(key)
        if watch is None:
            # No read of the log first: the read that follows the SUBSCRIBE's confirmation
            # (see "No gap") brings whatever the log holds after ``after`` by then. A
            # stream opens with a read that does not wait, so one more here would be
            # the same read twice.
            watch = self._watches[key] = EventWatch(after)
            reader.subscribe(key)
        else:
            events = await self._read_now(key, after)
            if events:
                return events
        if reader.task is None or reader.task.done():
            reader.task = asyncio.create_task(reader.run(), name="redis-feed-subscriber")
            reader.task.add_done_callback(reader.ended)
        return await watch.wait(key, after, wait_s, self._read_now, QUIET_READ_S)

    async def aclose(self) -> None:
        task = self._reader.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._reader.task = None
        with contextlib.suppress(Exception):
            await self._client.aclose()
