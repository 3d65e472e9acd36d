"""A :class:`RateLimiter` shared by every worker process through Redis (``limits``).

Per model: requests per minute as a *moving window* (exact: one list entry per
request, ``rpm`` entries at most) and tokens per minute as a *sliding window
counter* (two counters per model; a moving window would keep one list entry per
token, i.e. millions of entries for a typical TPM budget).

``acquire`` takes the request slot first, then the tokens; while a limit is
exhausted it sleeps until the window frees a slot (re-checking at least every
``MAX_SLEEP_S``), so N workers together stay under the provider's limits. A
request larger than the whole token budget is charged the full budget rather
than waiting forever. Redis being away does not stop LLM calls: the limiter
logs and lets the call through (the provider's own 429s are retried anyway).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError

from adapters.constants import KEY_PREFIX
from adapters.redis_clients import OP_TIMEOUT_S, RedisClients

log = structlog.get_logger("jobq.ratelimit")

MIN_SLEEP_S = 0.02
MAX_SLEEP_S = 1.0


T = TypeVar("T")


async def _bounded(operation: Awaitable[T]) -> T:
    """One Redis round trip of the limiter, bounded in time (a hung Redis must not
    hold LLM calls forever; ``acquire`` then lets the call through)."""
    async with asyncio.timeout(OP_TIMEOUT_S):
        return await operation


class RedisRateLimiter:
    """``rpm``/``tpm`` of 0 mean unlimited. ``window_s`` is 60 in production (per
    minute); tests shorten it."""

    def __init__(
        self,
        clients: RedisClients,
        rpm: int,
        tpm: int,
        prefix: str = KEY_PREFIX,
        *,
        window_s: int = 60,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        # The process's command pool (see adapters.redis_clients): ``limits`` builds its
        # client on that pool instead of opening one of its own from the URL.
        shared: dict[str, Any] = {"connection_pool": clients.commands.connection_pool}
        self._storage = RedisStorage(
            f"async+{clients.url}",
            implementation="redispy",
            key_prefix=f"{prefix}:ratelimit",
            wrap_exceptions=True,
            **shared,
        )
        self._requests = MovingWindowRateLimiter(self._storage)
        self._tokens = SlidingWindowCounterRateLimiter(self._storage)
        self._rpm_item = RateLimitItemPerSecond(rpm, window_s, namespace="rpm") if rpm else None
        self._tpm_item = RateLimitItemPerSecond(tpm, window_s, namespace="tpm") if tpm else None

    @classmethod
    def from_url(
        cls, url: str, rpm: int, tpm: int, prefix: str = KEY_PREFIX, *, window_s: int = 60
    ) -> RedisRateLimiter:
        """A limiter with connections of its own to the Redis at ``url``."""
        return cls(RedisClients.from_url(url), rpm, tpm, prefix, window_s=window_s)

    async def acquire(self, model: str, tokens: int) -> None:
        try:
            await self._acquire(model, tokens)
        except (StorageError, TimeoutError) as exc:
            log.warning("rate_limiter_unavailable", model=model, error=str(exc) or "timeout")

    async def _acquire(self, model: str, tokens: int) -> None:
        if self._rpm_item is not None:
            await self._take(self._requests, self._rpm_item, model, 1)
        if self._tpm_item is not None:
            cost = min(max(tokens, 1), self._tpm_item.amount)
            await self._take(self._tokens, self._tpm_item, model, cost)

    @staticmethod
    async def _take(limiter: RateLimiter, item: RateLimitItem, model: str, cost: int) -> None:
        waited = False
        while not await _bounded(limiter.hit(item, model, cost=cost)):
            if not waited:
                log.info("rate_limited", model=model, limit=item.namespace, cost=cost)
                waited = True
            reset_at, _remaining = await _bounded(limiter.get_window_stats(item, model))
            pause = min(max(reset_at - time.time(), MIN_SLEEP_S), MAX_SLEEP_S)
            # Jitter: waiters in several processes should not all retry at one instant.
            await asyncio.sleep(pause * (1.0 + random.random() * 0.2))
