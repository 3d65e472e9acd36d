"""The composition root: one ``bootstrap()`` wires adapters from settings.

Backends are imported lazily, like SAQ's ``Queue.from_url``, so the local backend
needs none of redis, saq or boto3 at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlparse

from handlers.settings import Settings
from pipeline.delivery import Delivery, deliver
from pipeline.deps import Deps, PipelineConfig
from pipeline.ports import JobStore, LLMProvider, Queue, RateLimiter
from pipeline.service import JobService


@dataclass
class Container:
    """Everything an entry point needs, built once per process."""

    settings: Settings
    store: JobStore
    queue: Queue
    deps: Deps
    service: JobService

    async def open(self) -> None:
        await self.store.open()
        await self.queue.open()

    async def close(self) -> None:
        await self.queue.close()
        await self.store.close()

    async def deliver(
        self, job_id: str, *, last_delivery: bool = False, deadline_cap: float | None = None
    ) -> Delivery:
        """One delivery of a job: what every worker flavour calls (``pipeline.delivery``)."""
        return await deliver(
            job_id, self.deps, last_delivery=last_delivery, deadline_cap=deadline_cap
        )


def _load(module: str, attr: str, extra: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise RuntimeError(
            f"{module} needs the '{extra}' dependencies: pip install -e . ({exc})"
        ) from exc


RedisClientsFor = Callable[[str], Any]
"""The redis backend's connections for a URL (``adapters.redis_clients.RedisClients``)."""


def redis_clients(settings: Settings) -> RedisClientsFor:
    """The Redis connections of one process: made on first use for each URL, then shared
    by the store, the queue and the rate limiter (``bootstrap`` calls this once)."""
    made: dict[str, Any] = {}

    def clients_for(url: str) -> Any:
        if url not in made:
            made[url] = _load("adapters.redis_clients", "RedisClients", "redis").from_url(
                url, max_connections=settings.redis_max_connections
            )
        return made[url]

    return clients_for


def build_store(settings: Settings, redis: RedisClientsFor | None = None) -> JobStore:
    url = urlparse(settings.store_url)
    if url.scheme == "memory":
        from adapters.sqlite_store import SqliteStore

        return SqliteStore(":memory:")
    if url.scheme == "sqlite":
        from adapters.sqlite_store import SqliteStore

        return SqliteStore(settings.store_url[len("sqlite:///") :] or "./data/jobq.db")
    if url.scheme in ("redis", "rediss"):
        store: JobStore = _load("adapters.redis_store", "RedisStore", "redis")(
            (redis or redis_clients(settings))(settings.store_url),
            prefix=settings.key_prefix,
            ttl_s=settings.job_ttl_s,
        )
        return store
    if url.scheme == "s3":
        store = _load("adapters.s3_store", "S3Store", "aws")(
            bucket=url.netloc,
            prefix=url.path.strip("/"),
            endpoint_url=settings.aws_endpoint_url,
            region=settings.aws_region,
            ttl_s=settings.job_ttl_s,
        )
        return store
    raise ValueError(f"JOBS_STORE_URL: unsupported scheme {url.scheme!r}")


def build_queue(
    settings: Settings,
    run: Callable[[str], Awaitable[Delivery]],
    store: JobStore,
    redis: RedisClientsFor | None = None,
) -> Queue:
    url = urlparse(settings.queue_url)
    if url.scheme == "memory":
        from adapters.local_queue import LocalQueue

        return LocalQueue(
            run,
            store,
            concurrency=settings.worker_concurrency,
            fair=settings.fair_scheduling,
            tenant_max_running=settings.tenant_max_running,
        )
    if url.scheme in ("redis", "rediss"):
        queue: Queue = build_saq_queue(settings, redis)
        return queue
    if url.scheme == "sqs":
        queue = _load("adapters.sqs_queue", "SqsQueue", "aws")(
            url.netloc + url.path,
            endpoint_url=settings.aws_endpoint_url,
            region=settings.aws_region,
        )
        return queue
    raise ValueError(f"JOBS_QUEUE_URL: unsupported scheme {url.scheme!r}")


def build_saq_queue(settings: Settings, redis: RedisClientsFor | None = None) -> Any:
    """The redis backend's ``SaqQueue`` (the web enqueues on it, the worker consumes it)."""
    return _load("adapters.saq_queue", "SaqQueue", "redis")(
        (redis or redis_clients(settings))(settings.queue_url),
        prefix=settings.key_prefix,
        heartbeat_s=settings.saq_heartbeat_s,
        max_attempts=settings.job_max_attempts,
        timeout_margin_s=settings.saq_timeout_margin_s,
        sweep_abort_wait_s=settings.saq_sweep_abort_wait_s,
        fair=settings.fair_scheduling,
        tenant_max_running=settings.tenant_max_running,
    )


def build_llm(settings: Settings) -> LLMProvider:
    if settings.llm_provider == "openai":
        provider: LLMProvider = _load("adapters.llm_openai", "OpenAIProvider", "openai")(
            api_key=settings.openai_api_key or "unused",
            base_url=settings.openai_base_url,
            json_mode=settings.openai_json_mode,
        )
        return provider
    if settings.llm_provider == "anthropic":
        provider = _load("adapters.llm_anthropic", "AnthropicProvider", "anthropic")(
            api_key=settings.anthropic_api_key, base_url=settings.anthropic_base_url
        )
        return provider
    from pipeline.offline import OfflineProvider

    return OfflineProvider(latency_ms=settings.llm_offline_latency_ms)


def build_limiter(settings: Settings, redis: RedisClientsFor | None = None) -> RateLimiter | None:
    if not (settings.llm_rpm or settings.llm_tpm):
        return None
    if settings.backend == "redis" and settings.redis_url:
        limiter: RateLimiter = _load("adapters.ratelimit_redis", "RedisRateLimiter", "redis")(
            (redis or redis_clients(settings))(settings.redis_url),
            rpm=settings.llm_rpm,
            tpm=settings.llm_tpm,
            prefix=settings.key_prefix,
        )
        return limiter
    from adapters.ratelimit_memory import MemoryRateLimiter

    return MemoryRateLimiter(rpm=settings.llm_rpm, tpm=settings.llm_tpm)


def pipeline_config(settings: Settings) -> PipelineConfig:
    return PipelineConfig(
        default_model=settings.llm_default_model,
        step_models=dict(settings.llm_step_models),
        job_max_attempts=settings.job_max_attempts,
        llm_timeout_s=settings.llm_timeout_s,
        llm_max_retries=settings.llm_max_retries,
        price_per_1k_tokens=dict(settings.llm_prices),
        tenant_max_cost_usd_per_day=settings.tenant_max_cost_usd_per_day,
        live_deltas=settings.live_deltas,
        context_windows=dict(settings.llm_context_windows),
    )


def bootstrap(
    settings: Settings | None = None,
    *,
    store: JobStore | None = None,
    queue: Queue | None = None,
    llm: LLMProvider | None = None,
    limiter: RateLimiter | None = None,
    config: PipelineConfig | None = None,
) -> Container:
    """Wire adapters from ``settings`` (default: the environment); any part may be
    overridden, which is how tests swap in a provider or a store."""
    settings = settings or Settings.from_env()
    redis = redis_clients(settings)  # one set of Redis connections per process and URL
    store = store or build_store(settings, redis)
    llm = llm or build_llm(settings)
    limiter = limiter if limiter is not None else build_limiter(settings, redis)
    deps = Deps(store=store, llm=llm, config=config or pipeline_config(settings), limiter=limiter)

    queue = queue or build_queue(settings, partial(deliver, deps=deps), store, redis)
    deps.stopping = queue.stopping
    service = JobService(deps, queue, backend=settings.backend)
    return Container(settings, store, queue, deps, service)
