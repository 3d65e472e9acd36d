"""What a process knows of one job's event log while readers wait on it: shared by the
redis feed (one reader for all jobs) and the S3 feed (one poller per job)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable

from pipeline.model import Event

RING = 32
"""Most events kept per watched job; readers further behind read the log themselves."""
RING_AGE_S = 0.5
"""Events older than this leave the ring: a stream at the head is woken as the event
arrives and takes it within milliseconds, and a parsed event held for every watched
job costs kilobytes each (one kept longer is read from the log instead)."""

ReadNow = Callable[[str, int], Awaitable[list[Event]]]
"""Read a log after an id without waiting (``(key or job id, after)``)."""


class EventWatch:
    """One job's log as its reader last saw it: ids in ``(base, cursor]`` are in
    ``ring`` (with the time each arrived), and every waiter is woken whenever the
    cursor moves. Plain lists and bare futures, not deques and an ``asyncio.Event``:
    a process holds one watch per watched job, and those cost a kilobyte each empty."""

    __slots__ = ("armed", "base", "cursor", "moved", "ring", "used", "waiters")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.base = cursor
        self.ring: list[tuple[float, Event]] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.used = self.moved = time.monotonic()
        """``moved``: when the cursor last moved."""
        self.armed = False
        """True while a reader covers this watch: it will see every event after
        ``cursor`` without a reader of the stream reading the log."""

    def add(self, events: list[Event]) -> None:
        moved = False
        now = time.monotonic()
        for event in events:
            if event.id <= self.cursor:
                continue
            if event.id != self.cursor + 1:  # not contiguous: restart the ring here
                self.ring.clear()
                self.base = event.id - 1
            self.ring.append((now, event))
            self.cursor = event.id
            moved = True
        self.trim(now)
        if moved:
            self.moved = now
            for waiter in self.waiters:  # woken later, by the loop: none is added meanwhile
                _wake(waiter)
            self.waiters.clear()

    def trim(self, now: float) -> None:
        """Drop events beyond ``RING`` or older than ``RING_AGE_S``."""
        drop = 0
        while drop < len(self.ring) and (
            len(self.ring) - drop > RING or now - self.ring[drop][0] > RING_AGE_S
        ):
            drop += 1
        if drop:
            self.base = self.ring[drop - 1][1].id
            del self.ring[:drop]

    def since(self, after: int) -> list[Event] | None:
        """Events after ``after`` from the ring; ``None`` when the ring does not cover it."""
        if after < self.base or after > self.cursor:
            return None
        return [event for _, event in self.ring[after - self.base :]]

    def idle_since(self, before: float) -> bool:
        return not self.waiters and self.used < before

    async def wait(
        self, key: str, after: int, wait_s: float, read_now: ReadNow, quiet_read_s: float | None = None
    ) -> list[Event]:
        """Events after ``after`` once the watch has them (or the log, when the ring has
        moved past ``after``), else ``[]`` after ``wait_s``; with ``quiet_read_s``, a wait
        that ends on a job with no event for that long reads the log instead, in case a
        writer did not announce its events, and so does one that ends before a reader
        covers the watch (a subscription not confirmed yet). The wait is a bare future
        and one timer, not ``asyncio.timeout``: thousands of streams wait here, again
        after every event."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        try:
            while True:
                ring = self.since(after)
                if ring:
                    return ring
                if ring is None and self.cursor > after:  # past the ring: read the log
                    return await read_now(key, after)
                if loop.time() >= deadline:
                    if quiet_read_s is None or (self.armed and time.monotonic() - self.moved < quiet_read_s):
                        return []
                    events = await read_now(key, after)
                    self.add(events)
                    return events
                waiter = loop.create_future()
                self.waiters.append(waiter)
                timer = loop.call_at(deadline, _wake, waiter, context=_NO_CONTEXT)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    if waiter in self.waiters:  # woken by the timer, or cancelled
                        self.waiters.remove(waiter)
        finally:
            self.used = time.monotonic()


_NO_CONTEXT = contextvars.Context()
"""The context the wait's timer runs ``_wake`` in (it reads no context variable): one
for every timer, rather than a copy of the waiting task's context per wait."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
