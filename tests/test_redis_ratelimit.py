"""RedisRateLimiter: one budget per model shared by every process through a real Redis."""

from __future__ import annotations

import asyncio

from adapters.ratelimit_redis import RedisRateLimiter
from tests.support.redis_server import free_port, redis_url, unique_prefix


async def _blocked(limiter: RedisRateLimiter, model: str, tokens: int) -> bool:
    """True when ``acquire`` is still waiting after a moment (the window here is 60 s)."""
    try:
        await asyncio.wait_for(limiter.acquire(model, tokens), 0.3)
    except TimeoutError:
        return True
    return False


async def test_two_limiters_share_the_request_budget_per_model() -> None:
    """Requests taken through one limiter count against another on the same Redis, per model."""
    prefix = unique_prefix()
    first = RedisRateLimiter.from_url(redis_url(), rpm=3, tpm=0, prefix=prefix)
    second = RedisRateLimiter.from_url(redis_url(), rpm=3, tpm=0, prefix=prefix)
    for _ in range(3):
        await first.acquire("model-a", 10)
    assert await _blocked(second, "model-a", 10)
    assert not await _blocked(second, "model-b", 10)


async def test_token_budget_admits_what_fits_and_holds_what_does_not() -> None:
    """With 100 tokens per minute, 80 then 30 waits while 80 then 20 passes."""
    prefix = unique_prefix()
    first = RedisRateLimiter.from_url(redis_url(), rpm=0, tpm=100, prefix=prefix)
    second = RedisRateLimiter.from_url(redis_url(), rpm=0, tpm=100, prefix=prefix)
    await first.acquire("m", 80)
    assert await _blocked(second, "m", 30)
    assert not await _blocked(second, "m", 20)


async def test_a_waiting_acquire_goes_through_when_the_window_frees() -> None:
    """acquire sleeps until the moving window frees a slot instead of failing."""
    limiter = RedisRateLimiter.from_url(redis_url(), rpm=2, tpm=0, prefix=unique_prefix(), window_s=1)
    async with asyncio.timeout(10):
        for _ in range(5):
            await limiter.acquire("m", 1)


async def test_a_request_larger_than_the_budget_is_charged_the_budget() -> None:
    """A request bigger than the whole token budget waits for a full window, not forever."""
    limiter = RedisRateLimiter.from_url(redis_url(), rpm=0, tpm=50, prefix=unique_prefix(), window_s=1)
    async with asyncio.timeout(10):
        await limiter.acquire("m", 500)
        await limiter.acquire("m", 500)


async def test_an_unreachable_redis_does_not_stop_llm_calls() -> None:
    """With Redis away the limiter lets the call through instead of raising."""
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}", rpm=1, tpm=1, prefix="x")
    async with asyncio.timeout(30):
        await limiter.acquire("m", 10)


async def test_unlimited_when_no_budget_is_set() -> None:
    """rpm=0 and tpm=0 mean no limit: many acquisitions pass at once."""
    limiter = RedisRateLimiter.from_url(redis_url(), rpm=0, tpm=0, prefix=unique_prefix())
    async with asyncio.timeout(5):
        await asyncio.gather(*(limiter.acquire("m", 1000) for _ in range(50)))
