"""The redis store's event log: one Redis stream per job, read with XREAD BLOCK."""

from __future__ import annotations

import json
from typing import Any

from adapters.constants import EVENTS_KEY
from adapters.redis_clients import OP_TIMEOUT_S, RedisClients, bounded, lua_script
from adapters.redis_codec import EVENT_SEQ_KEY, RedisKeys, parse_stream
from pipeline.model import JSON, Event


class RedisEventLog:
    """Event n of a job is entry ``<n>-0`` of its stream; a counter key hands out n, so
    ids are consecutive across writers. A reader waiting for the next event is parked
    in XREAD BLOCK inside Redis (on the blocking pool) and wakes when one is appended."""

    def __init__(self, clients: RedisClients, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = clients.commands
        # XREAD BLOCK holds a connection for up to ``wait_s`` (one per SSE client): the
        # blocking pool, no socket timeout; ``asyncio.timeout`` bounds each read instead.
        self._blocking = clients.blocking
        self._keys = keys
        self.ttl_s = ttl_s
        self._append_script = self._redis.register_script(lua_script("store_append_event"))

    def _stream(self, job_id: str) -> str:
        return self._keys.key(EVENTS_KEY, job_id)

    async def append(self, job_id: str, type: str, data: JSON) -> Event:
        async with bounded("redis"):
            event_id = await self._append_script(
                keys=[self._keys.key(EVENT_SEQ_KEY, job_id), self._stream(job_id)],
                args=[type, json.dumps(data), self.ttl_s],
            )
        return Event(int(event_id), type, data)

    async def read(self, job_id: str, after: int, wait_s: float) -> list[Event]:
        stream: dict[Any, Any] = {self._stream(job_id): f"{after}-0"}
        async with bounded("redis"):
            events = parse_stream(await self._redis.xread(stream))
        if events or wait_s <= 0:
            return events
        # XREAD BLOCK: Redis answers when an event is appended or after ``wait_s``.
        async with bounded("redis", wait_s + OP_TIMEOUT_S):
            reply = await self._blocking.xread(stream, block=max(1, int(wait_s * 1000)))
        return parse_stream(reply)
