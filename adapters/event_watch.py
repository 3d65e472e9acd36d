"""What a process knows of one job's event log while readers wait on it: shared by the
redis feed (one reader for all jobs) and the S3 feed (one poller per job)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import islice

from pipeline.model import Event

RING = 32
"""Most events kept per watched job; readers further behind read the log themselves."""
RING_AGE_S = 2.0
"""Events older than this leave the ring: a stream at the head is back for the next
events within milliseconds, and a parsed event costs kilobytes held per job."""

ReadNow = Callable[[str, int], Awaitable[list[Event]]]
"""Read a log after an id without waiting (``(key or job id, after)``)."""


class EventWatch:
    """One job's log as its reader last saw it: ids in ``(base, cursor]`` are in ``ring``,
    and ``changed`` is set (then replaced) whenever the cursor moves."""

    __slots__ = ("added", "armed", "base", "changed", "cursor", "ring", "used", "waiters")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.base = cursor
        self.ring: deque[Event] = deque()
        self.added: deque[float] = deque()
        """When each event of ``ring`` arrived (monotonic)."""
        self.changed = asyncio.Event()
        self.waiters = 0
        self.used = time.monotonic()
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
                self.added.clear()
                self.base = event.id - 1
            self.ring.append(event)
            self.added.append(now)
            self.cursor = event.id
            moved = True
        self.trim(now)
        if moved:
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()

    def trim(self, now: float) -> None:
        """Drop events beyond ``RING`` or older than ``RING_AGE_S``."""
        while self.ring and (len(self.ring) > RING or now - self.added[0] > RING_AGE_S):
            self.base = self.ring.popleft().id
            self.added.popleft()

    def since(self, after: int) -> list[Event] | None:
        """Events after ``after`` from the ring; ``None`` when the ring does not cover it."""
        if after < self.base or after > self.cursor:
            return None
        return list(islice(self.ring, after - self.base, None))

    def idle_since(self, before: float) -> bool:
        return self.waiters == 0 and self.used < before

    async def wait(self, key: str, after: int, wait_s: float, read_now: ReadNow) -> list[Event]:
        """Events after ``after`` once the watch has them (or the log, when the ring has
        moved past ``after``), else ``[]`` after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        self.waiters += 1
        try:
            while True:
                ring = self.since(after)
                if ring:
                    return ring
                if ring is None and self.cursor > after:  # past the ring: read the log
                    return await read_now(key, after)
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                try:
                    async with asyncio.timeout(left):  # not wait_for: it can swallow a cancel
                        await self.changed.wait()
                except TimeoutError:
                    return []
        finally:
            self.waiters -= 1
            self.used = time.monotonic()
