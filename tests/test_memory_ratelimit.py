"""MemoryRateLimiter: the production strategies (``limits``' moving window for requests,
sliding window counter for tokens) on in-process memory. The window is shortened to
one second so the waits are real but short."""

from __future__ import annotations

import asyncio
import time

from adapters.ratelimit_memory import MemoryRateLimiter


async def _blocked(limiter: MemoryRateLimiter, model: str, tokens: int) -> bool:
    """True when ``acquire`` is still waiting after a moment (the window here is 60 s)."""
    try:
        await asyncio.wait_for(limiter.acquire(model, tokens), 0.3)
    except TimeoutError:
        return True
    return False


async def test_requests_beyond_rpm_wait_for_the_window() -> None:
    """With rpm=2 a third request waits until the first one leaves the window."""
    limiter = MemoryRateLimiter(rpm=2, window_s=1)
    started = time.monotonic()
    for _ in range(2):
        await limiter.acquire("m", 10)
    assert time.monotonic() - started < 0.2
    await limiter.acquire("m", 10)
    assert 0.9 <= time.monotonic() - started < 2.5


async def test_tokens_per_minute_and_models_apart() -> None:
    """tpm limits tokens per model; another model has its own budget; 0 means unlimited."""
    limiter = MemoryRateLimiter(tpm=600, per_model={"free": (0, 0)})
    await limiter.acquire("a", 500)
    await limiter.acquire("b", 600)
    async with asyncio.timeout(2):
        for _ in range(100):
            await limiter.acquire("free", 10_000)
    assert not await _blocked(limiter, "a", 100)
    assert await _blocked(limiter, "a", 1)


async def test_an_oversized_request_is_charged_the_budget_not_refused() -> None:
    """A request above the whole token budget waits for a full window, not forever."""
    limiter = MemoryRateLimiter(tpm=100, window_s=1)
    async with asyncio.timeout(10):
        await limiter.acquire("m", 5_000)
        await limiter.acquire("m", 5_000)


async def test_concurrent_waiters_never_exceed_the_budget_of_any_window() -> None:
    """Acquirers beyond the budget all get through, never more than rpm in any window."""
    limiter = MemoryRateLimiter(rpm=5, window_s=1)
    released: list[float] = []

    async def one() -> None:
        await limiter.acquire("m", 1)
        released.append(time.monotonic())

    async with asyncio.timeout(10):
        await asyncio.gather(*(one() for _ in range(12)))
    assert len(released) == 12
    released.sort()
    for i in range(len(released) - 5):
        assert released[i + 5] - released[i] >= 0.95  # the 6th after any release is a window later


async def test_unlimited_when_no_budget_is_set() -> None:
    """rpm=0 and tpm=0 mean no limit: many acquisitions pass at once."""
    limiter = MemoryRateLimiter()
    async with asyncio.timeout(2):
        await asyncio.gather(*(limiter.acquire("m", 1000) for _ in range(50)))
