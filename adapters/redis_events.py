"""The redis store's event log: one Redis stream per job; waiting reads share one subscriber."""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

from adapters.constants import EVENTS_KEY
from adapters.redis_autopipeline import AutoPipeline
from adapters.redis_clients import REDIS_UNAVAILABLE, RedisClients, bounded, lua_script
from adapters.redis_codec import EVENT_SEQ_KEY, RedisKeys, parse_stream
from adapters.redis_feed import READ_COUNT, RedisEventFeed
from pipeline.model import JSON, Event


class RedisEventLog:
    """Event n of a job is entry ``<n>-0`` of its stream; a counter key hands out n, so
    ids are consecutive across writers, and each append is also published on a channel
    named after the stream. A read that finds nothing and may wait goes to the
    process's :class:`~adapters.redis_feed.RedisEventFeed`: one connection subscribed
    to every stream being waited on, instead of one blocking read per reader."""

    def __init__(
        self, clients: RedisClients, keys: RedisKeys, ttl_s: int, auto: AutoPipeline | None = None
    ) -> None:
        self._redis = clients.commands
        self._auto = auto or AutoPipeline(self._redis)
        self._keys = keys
        self.ttl_s = ttl_s
        self._append_script = self._redis.register_script(lua_script("store_append_event"))
        self.feed = RedisEventFeed(clients.url, self._read_now)

    def _stream(self, job_id: str) -> str:
        return self._keys.key(EVENTS_KEY, job_id)

    async def append(self, job_id: str, type: str, data: JSON) -> Event:
        async with bounded("redis"):
            event_id = await self._append_script(
                keys=[self._keys.key(EVENT_SEQ_KEY, job_id), self._stream(job_id)],
                args=[type, json.dumps(data), self.ttl_s],
            )
        return Event(int(event_id), type, data)

    def read(self, job_id: str, after: int, wait_s: float) -> Coroutine[Any, Any, list[Event]]:
        """The feed's read (Redis failing raises ``StoreUnavailable``: see ``_read_now``)."""
        return self.feed.read(self._stream(job_id), after, wait_s)

    async def _read_now(self, key: str, after: int) -> list[Event]:
        """A non-blocking XREAD, batched with whatever else this turn sends. The feed's
        one call to Redis on a reader's behalf: Redis failing raises ``StoreUnavailable``
        here (a waiting read holds no ``with`` block while it waits)."""
        with REDIS_UNAVAILABLE:
            reply: Any = await self._auto.submit("XREAD", "COUNT", READ_COUNT, "STREAMS", key, f"{after}-0")
        return parse_stream(reply)

    async def aclose(self) -> None:
        await self.feed.aclose()
