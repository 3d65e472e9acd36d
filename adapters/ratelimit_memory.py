"""In-process :class:`RateLimiter` for the local and aws backends, on ``limits``'
memory storage with the strategies :mod:`adapters.ratelimit_redis` uses in
production, so a local run is limited the way a deployment is.

Per model: requests per minute as a *moving window* (at most ``rpm`` requests in
any ``window_s`` seconds) and tokens per minute as a *sliding window counter*.
``acquire`` takes the request slot first, then the tokens; while a limit is
exhausted it sleeps until the window frees room (re-checking at least every
``MAX_SLEEP_S``). Waiters of one model queue in FIFO order behind a lock, other
models are not held up. A request larger than the whole token budget is charged
the full budget rather than waiting forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import structlog
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

log = structlog.get_logger("jobq.ratelimit")

MIN_SLEEP_S = 0.01
MAX_SLEEP_S = 1.0


class MemoryRateLimiter:
    """``rpm``/``tpm`` of 0 mean unlimited. ``per_model`` overrides both for a model.
    ``window_s`` is 60 in production (per minute); tests shorten it."""

    def __init__(
        self,
        rpm: int = 0,
        tpm: int = 0,
        *,
        per_model: Mapping[str, tuple[int, int]] | None = None,
        window_s: int = 60,
    ) -> None:
        self._default = (rpm, tpm)
        self._per_model = dict(per_model or {})
        self._window_s = window_s
        storage = MemoryStorage()
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = SlidingWindowCounterRateLimiter(storage)
        self._items: dict[str, tuple[RateLimitItem | None, RateLimitItem | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, model: str, tokens: int) -> None:
        rpm_item, tpm_item = self._limits(model)
        if rpm_item is None and tpm_item is None:
            return
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            if rpm_item is not None:
                await _take(self._requests, rpm_item, model, 1)
            if tpm_item is not None:
                await _take(self._tokens, tpm_item, model, min(max(tokens, 1), tpm_item.amount))

    def _limits(self, model: str) -> tuple[RateLimitItem | None, RateLimitItem | None]:
        items = self._items.get(model)
        if items is None:
            rpm, tpm = self._per_model.get(model, self._default)
            window = self._window_s
            items = self._items[model] = (
                RateLimitItemPerSecond(rpm, window, namespace="rpm") if rpm > 0 else None,
                RateLimitItemPerSecond(tpm, window, namespace="tpm") if tpm > 0 else None,
            )
        return items


async def _take(limiter: RateLimiter, item: RateLimitItem, model: str, cost: int) -> None:
    waited = False
    while not await limiter.hit(item, model, cost=cost):
        if not waited:
            log.info("rate_limited", model=model, limit=item.namespace, cost=cost)
            waited = True
        reset_at, _remaining = await limiter.get_window_stats(item, model)
        await asyncio.sleep(min(max(reset_at - time.time(), MIN_SLEEP_S), MAX_SLEEP_S))
