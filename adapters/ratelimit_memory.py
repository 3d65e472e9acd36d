"""In-process :class:`RateLimiter` for the local backend: requests and tokens per
minute per model, as two token buckets that refill continuously.

A bucket holds up to one minute's budget (so a fresh limiter allows a burst of
that size) and refills at ``limit / 60`` per second. ``acquire`` waits until both
buckets hold enough, then takes from both; waiters of one model queue in FIFO
order behind a lock, other models are not held up. A request larger than the
whole minute's token budget is charged the full budget rather than waiting forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_EPSILON_S = 1e-6
"""Float rounding after an exact sleep must not cost another round."""


@dataclass
class _Bucket:
    per_minute: int
    level: float
    updated: float

    def missing(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (0 when it fits now), after refilling to ``now``."""
        rate = self.per_minute / 60.0
        self.level = min(float(self.per_minute), self.level + (now - self.updated) * rate)
        self.updated = now
        return max(0.0, (min(amount, self.per_minute) - self.level) / rate)

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.per_minute)


@dataclass
class _ModelState:
    requests: _Bucket | None
    tokens: _Bucket | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def charges(self, tokens: int) -> list[tuple[_Bucket, float]]:
        pairs = ((self.requests, 1.0), (self.tokens, float(max(tokens, 0))))
        return [(bucket, amount) for bucket, amount in pairs if bucket is not None]


class MemoryRateLimiter:
    """``rpm``/``tpm`` of 0 mean unlimited. ``per_model`` overrides both for a model."""

    def __init__(
        self,
        rpm: int = 0,
        tpm: int = 0,
        *,
        per_model: Mapping[str, tuple[int, int]] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._default = (rpm, tpm)
        self._per_model = dict(per_model or {})
        self._clock = clock
        self._sleep = sleep
        self._models: dict[str, _ModelState] = {}

    async def acquire(self, model: str, tokens: int) -> None:
        state = self._state(model)
        charges = state.charges(tokens)
        if not charges:
            return
        async with state.lock:
            while True:
                now = self._clock()
                wait = max(bucket.missing(amount, now) for bucket, amount in charges)
                if wait <= _EPSILON_S:
                    break
                await self._sleep(wait)
            for bucket, amount in charges:
                bucket.take(amount)

    def _state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            rpm, tpm = self._per_model.get(model, self._default)
            now = self._clock()
            state = self._models[model] = _ModelState(
                requests=_Bucket(rpm, float(rpm), now) if rpm > 0 else None,
                tokens=_Bucket(tpm, float(tpm), now) if tpm > 0 else None,
            )
        return state
