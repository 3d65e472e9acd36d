"""The job event stream (SPEC §4, §7.2): the store's event log replayed and followed.

Every event carries the store's per-job id, so a reconnect with ``Last-Event-ID``
continues exactly after it. The log holds a finished job's events too, so a late
subscriber sees the final ``status``, ``result``/``error`` and ``done``.

A stream the server ends before ``done`` is logged at warning level with the job id
and the reason (``sse_stream_ended``): the store failing mid-stream ends it cleanly
(the client reconnects with ``Last-Event-ID``), and so does a client that does not
read. Memory per stream is bounded without a queue of our own: a stream holds at
most one read of events (``READ_COUNT`` on redis) and the server's write buffer,
above whose high-water mark (64 KiB) uvicorn stops pulling events until the client
takes bytes; a client that takes none for ``SLOW_CLIENT_BEATS`` heartbeat intervals
is cut off.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import msgspec
import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from pipeline.model import Event, Job
from pipeline.ports import JobStore
from pipeline.vocabulary import TERMINAL_STATUSES, EventType

RETRY_MS = 2000
MAX_EVENT_ID = 2**53
"""Above any id a job's log issues (and the largest integer JavaScript keeps exact)."""
SLOW_CLIENT_BEATS = 2.0
"""A client that accepts no bytes for this many heartbeat intervals is not reading."""
log = structlog.get_logger("jobq.sse")
_encoder = msgspec.json.Encoder()


def last_event_id(header: str | None, query: str | None) -> int:
    """The id to resume after: the header wins, then ``?lastEventId=``. Junk, which
    includes other scripts' digits and ids no log issues, means 0: replay from the start."""
    for raw in (header, query):
        text = (raw or "").strip()
        if text.isascii() and text.isdecimal() and len(text) <= 16 and int(text) <= MAX_EVENT_ID:
            return int(text)
    return 0


class JobEventStream:
    """The encoded chunks of one job's stream (each holds every event of one read of
    :func:`job_events`), with what the response needs to guard it: the job id for logs
    and how long a send may wait for the client."""

    def __init__(self, messages: AsyncIterator[bytes], job_id: str, heartbeat_s: float) -> None:
        self.messages = messages
        self.job_id = job_id
        self.stall_s = heartbeat_s * SLOW_CLIENT_BEATS

    async def aclose(self) -> None:
        closing = getattr(self.messages, "aclose", None)
        if closing is not None:
            await closing()


async def job_events(
    store: JobStore,
    job_id: str,
    after: int,
    *,
    heartbeat_s: float,
    window_s: float = 0.0,
    deltas: bool = True,
    load_job: Callable[[], Awaitable[Job | None]],
) -> AsyncIterator[bytes]:
    """``retry:`` first, then events after ``after`` until ``done``; ``deltas=False``
    leaves out the ``delta`` events (their ids still count, so a resume stays exact).

    Waits in slices no longer than the heartbeat interval; with ``window_s > 0``
    (platforms that buffer the response) the stream ends after that long and the
    client reconnects with ``Last-Event-ID``. The first heartbeat comes at a random
    point of the second half of the interval, so that streams opened together (a
    reconnect storm, a page of jobs) do not all beat in the same instant; only a
    stream that got no event since its last heartbeat looks at the job's status.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + window_s if window_s > 0 else None
    next_beat = started + heartbeat_s * random.uniform(0.5, 1.0)
    beat_after = after
    yield ServerSentEventMessage(data=None, retry=RETRY_MS).encode()
    load_status = partial(_status_of, load_job)
    first = True
    ended_seen = False
    while True:
        now = loop.time()
        if deadline is not None and now >= deadline:
            return
        # The first read does not wait: a reconnect after ``done`` has nothing to wait for.
        wait = 0.0 if first else max(0.0, min(next_beat, deadline or next_beat) - now)
        events = await store.read_events(job_id, after, wait_s=wait)
        got_events = bool(events)
        body, after, done = _encode_read(events, after, deltas)
        # No name holds the read while the stream waits for the next one: a stream's
        # replay, parsed, would otherwise stay in memory for as long as it is open.
        del events
        if body:
            yield body
            del body
            if done:
                return
        if first and not got_events and await _finished_without_done(store, job_id, after, load_status):
            # A client that saw ``done`` and reconnected anyway: tell it again, at once.
            yield (await _done_without_id(load_status)).encode()
            return
        first = False
        if loop.time() >= next_beat:
            next_beat = loop.time() + heartbeat_s
            quiet, beat_after = after == beat_after, after
            # The job's status at a heartbeat is loaded once for all its streams here.
            shared = _shared_loads.loader(job_id, load_job, heartbeat_s / 2)
            finished = quiet and await _finished_without_done(store, job_id, after, shared)
            del shared  # a closure per beat, not held (with its cells) while the stream waits
            if finished:
                if ended_seen:
                    # The log lost its tail (expired or never written): close rather
                    # than leave the client waiting forever. (Two heartbeats in a row: a
                    # busy worker may write the terminal events a while after the status.)
                    log.warning("sse_stream_ended", job_id=job_id, reason="log_without_done", after=after)
                    yield (await _done_without_id(load_status)).encode()
                    return
                ended_seen = True
            else:
                ended_seen = False
            yield ServerSentEventMessage(data=None, comment="keep-alive").encode()


def _encode_read(events: list[Event], after: int, deltas: bool) -> tuple[bytes, int, bool]:
    """The SSE text of one read's events after ``after``, all in one chunk (one write to
    the socket, not one each); the id to read after next; whether ``done`` was sent."""
    chunk: list[bytes] = []
    for event in events:
        if event.id <= after:
            continue
        after = event.id
        if not deltas and event.type == EventType.DELTA:
            continue
        chunk.append(_event_bytes(event))
        if event.type == EventType.DONE:
            return b"".join(chunk), after, True
    return b"".join(chunk), after, False


def _event_bytes(event: Event) -> bytes:
    """An event as SSE text. Compact JSON as msgspec writes it has no raw line break,
    so the data is one ``data:`` line."""
    return b"id: %d\r\nevent: %s\r\ndata: %s\r\n\r\n" % (
        event.id,
        event.type.encode(),
        _encoder.encode(event.data),
    )


class _SharedLoads:
    """A job's status at heartbeats, loaded once for every stream of the job in this
    process for ``max_age_s`` (on S3 each load is a request; a job watched by many
    clients costs one per interval, not one per stream). Only the status is kept, not
    the loaded job: one cached job per watched job would cost each stream kilobytes.
    Failures are not kept."""

    def __init__(self) -> None:
        self._loads: dict[str, tuple[float, asyncio.Future[str | None]]] = {}

    def loader(
        self, job_id: str, load_job: Callable[[], Awaitable[Job | None]], max_age_s: float
    ) -> Callable[[], Awaitable[str | None]]:
        async def load() -> str | None:
            now = time.monotonic()
            hit = self._loads.get(job_id)
            if hit is None or now - hit[0] > max_age_s or hit[1].get_loop() is not asyncio.get_running_loop():
                if len(self._loads) > SHARED_LOADS_MAX:
                    self._loads = {k: v for k, v in self._loads.items() if now - v[0] <= max_age_s}
                future = asyncio.ensure_future(_status_of(load_job))
                future.add_done_callback(lambda f: self._forget_failed(job_id, f))
                hit = self._loads[job_id] = (now, future)
            return await asyncio.shield(hit[1])

        return load

    def _forget_failed(self, job_id: str, future: asyncio.Future[str | None]) -> None:
        if future.cancelled() or future.exception() is not None:
            current = self._loads.get(job_id)
            if current is not None and current[1] is future:
                del self._loads[job_id]


SHARED_LOADS_MAX = 10_000
_shared_loads = _SharedLoads()


async def _status_of(load_job: Callable[[], Awaitable[Job | None]]) -> str | None:
    job = await load_job()
    return job.status if job is not None else None


async def _done_without_id(load_status: Callable[[], Awaitable[str | None]]) -> ServerSentEventMessage:
    """A closing ``done`` with no id: the client's last id stays the one to resume after."""
    status = await load_status()
    return ServerSentEventMessage(
        event=EventType.DONE, data=_encoder.encode({"status": status or "unknown"}).decode()
    )


async def _finished_without_done(
    store: JobStore, job_id: str, after: int, load_status: Callable[[], Awaitable[str | None]]
) -> bool:
    status = await load_status()
    if status not in TERMINAL_STATUSES:
        return False
    # The terminal events are written right after the status; give them one more look.
    return not await store.read_events(job_id, after, wait_s=0.5)


def sse_response(messages: AsyncIterator[bytes], job_id: str, heartbeat_s: float) -> ServerSentEvent:
    """The response that sends ``messages`` (from :func:`job_events`) as job ``job_id``'s stream."""
    stream = JobEventStream(messages, job_id, heartbeat_s)
    return _JobEventResponse(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _JobEventResponse(ServerSentEvent):
    """Litestar's SSE response (its head, and its place in the schema); the body is sent
    by :class:`_GuardedStreamingResponse`."""

    def __init__(self, stream: JobEventStream, headers: dict[str, str]) -> None:
        super().__init__(stream.messages, headers=headers)
        self.stream = stream

    def to_asgi_response(self, app: Any, request: Any, **kwargs: Any) -> _GuardedStreamingResponse:
        base = super().to_asgi_response(app, request, **kwargs)
        assert isinstance(base, ASGIStreamingResponse)
        return _GuardedStreamingResponse(base, self.stream)


class _GuardedStreamingResponse(ASGIStreamingResponse):
    """Sends the stream's encoded chunks itself, not through Litestar's SSE generator
    (which starts every stream with a hop to a thread, encodes one message per write,
    and holds the last message while it waits for the next), each under a time
    limit kept by :class:`_StallWatch`: a client that takes no bytes for the stream's
    ``stall_s`` (uvicorn waits in ``send`` while its write buffer is above the
    high-water mark) ends the stream, logged with the job id. The connection is then
    closed after what is already buffered, so the client sees whole events and
    resumes after the last one it got.

    The request's task sends the stream; one more task waits for the client to leave
    and then cancels it. Plain asyncio rather than Litestar's anyio task group, whose
    cancel scope formats a task's repr at every stream's end."""

    __slots__ = ("cut", "finished", "sending_since", "stalled", "stream", "task")

    def __init__(self, base: ASGIStreamingResponse, stream: JobEventStream) -> None:
        for name in _slots(type(base)):
            if hasattr(base, name):
                object.__setattr__(self, name, getattr(base, name))
        self.stream = stream
        self.sending_since: float | None = None
        """When the send under way began (loop time); None between sends."""
        self.stalled = False
        self.cut = False
        """Set when this response cancelled its own task (client gone, or not reading)."""
        self.finished = False
        self.task: asyncio.Task[Any] | None = None

    async def send_body(self, send: Send, receive: Receive) -> None:
        self.task = task = asyncio.current_task()
        assert task is not None
        listener = asyncio.get_running_loop().create_task(self._cancel_when_gone(receive))
        watch = _StallWatch.of_running_loop()
        watch.add(self)
        try:
            await self._send_all(send)
        except asyncio.CancelledError:
            if not self.cut or task.uncancel() > 0:
                raise  # cancelled from outside (the server shutting down)
        finally:
            self.finished = True
            watch.discard(self)
            listener.cancel()
        if self.stalled:
            stall_s = self.stream.stall_s
            log.warning(
                "sse_stream_ended", job_id=self.stream.job_id, reason="client_not_reading", stall_s=stall_s
            )
            await self.stream.aclose()

    def cut_off(self) -> None:
        """End the stream now: its task stops where it waits, and the body stays open-ended
        (uvicorn closes the connection)."""
        if not self.finished and not self.cut and self.task is not None:
            self.cut = True
            self.task.cancel()

    async def _cancel_when_gone(self, receive: Receive) -> None:
        """Wait for the client to leave (uvicorn reports ``http.disconnect``, which it also
        reports once the body is complete) and cut the stream off if it is still going."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cut_off()

    async def _send_all(self, send: Send) -> None:
        """Every chunk, then the end of the body. A failure of the stream (not of a send)
        ends it cleanly: the client resumes with ``Last-Event-ID``. The generator is
        iterated here, not through a wrapper, which would be one more coroutine per
        event held by every waiting stream."""
        loop = asyncio.get_running_loop()
        try:
            async for body in self.stream.messages:
                self.sending_since = loop.time()
                await send({"type": "http.response.body", "body": body, "more_body": True})
                self.sending_since = None
                del body  # not held while the next events are awaited
        except Exception as exc:
            if self.sending_since is not None:
                raise  # the send failed: the connection is gone
            log.warning("sse_stream_ended", job_id=self.stream.job_id, reason="error", error=repr(exc))
        self.sending_since = loop.time()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.sending_since = None


class _StallWatch:
    """One task per event loop that cuts off the streams whose send under way has waited
    for the client longer than their ``stall_s`` (uvicorn's ``send`` waits while its
    write buffer is above the high-water mark): one check of every stream per
    ``CHECK_S`` instead of a timer per send."""

    CHECK_S = 0.5
    SLICE = 500
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _StallWatch] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.responses: set[_GuardedStreamingResponse] = set()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def of_running_loop(cls) -> _StallWatch:
        loop = asyncio.get_running_loop()
        watch = cls._by_loop.get(loop)
        if watch is None:
            watch = cls._by_loop[loop] = cls()
        return watch

    def add(self, response: _GuardedStreamingResponse) -> None:
        self.responses.add(response)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="sse-stall-watch")

    def discard(self, response: _GuardedStreamingResponse) -> None:
        self.responses.discard(response)

    async def _run(self) -> None:
        """Checks ``SLICE`` streams per turn of the loop: one pass over thousands would
        hold up every stream's next event for as long."""
        loop = asyncio.get_running_loop()
        while self.responses:
            await asyncio.sleep(self.CHECK_S)
            responses = list(self.responses)
            for start in range(0, len(responses), self.SLICE):
                if start:
                    await asyncio.sleep(0)
                now = loop.time()
                for response in responses[start : start + self.SLICE]:
                    since = response.sending_since
                    if since is not None and now - since > response.stream.stall_s:
                        response.stalled = True
                        response.cut_off()  # ends the response: the connection is closed
                        self.responses.discard(response)


def _slots(cls: type) -> Iterable[str]:
    for klass in cls.__mro__:
        yield from getattr(klass, "__slots__", ())
