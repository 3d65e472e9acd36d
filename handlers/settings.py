"""Configuration from the environment, read once into a typed object (SPEC §3).

A bad value raises :class:`SettingsError` whose message is one line naming the
variable; entry points print it and exit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from adapters.constants import KEY_PREFIX

LLM_PROVIDERS = ("offline", "openai", "anthropic")


class SettingsError(ValueError):
    """One line naming the variable and what is wrong with it."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} must be between {lo} and {hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} must be between {lo} and {hi}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


def _api_keys(raw: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, tenant = item.partition(":")
        if not sep or not key.strip() or not tenant.strip():
            raise SettingsError("API_KEYS must look like 'key:tenant,key2:tenant2'")
        keys[key.strip()] = tenant.strip()
    return keys


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    scheme = urlparse(raw).scheme
    if scheme not in schemes:
        raise SettingsError(f"{name}={raw!r}: scheme must be one of {', '.join(schemes)}")
    return raw


@dataclass(frozen=True)
class Settings:
    backend: str = "local"
    """local | redis | aws, derived from the URLs below."""
    store_url: str = "sqlite:///./data/jobq.db"
    queue_url: str = "memory://"
    redis_url: str | None = None
    key_prefix: str = KEY_PREFIX
    aws_endpoint_url: str | None = None
    aws_region: str = "us-east-1"

    llm_provider: str = "offline"
    llm_default_model: str = "offline"
    llm_step_models: dict[str, str] = field(default_factory=dict)
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_json_mode: str = "json_schema"
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    llm_offline_latency_ms: float = 0.0
    llm_timeout_s: float = 120.0
    llm_max_retries: int = 6
    llm_rpm: int = 0
    llm_tpm: int = 0
    llm_prices: dict[str, tuple[float, float]] = field(default_factory=dict)

    api_keys: dict[str, str] = field(default_factory=dict)
    cors_origins: tuple[str, ...] = ()
    job_ttl_s: int = 7 * 24 * 3600
    job_max_attempts: int = 3
    legacy_wait_s: float = 25.0
    worker_concurrency: int = 4
    submit_rate_per_min: int = 120
    max_body_bytes: int = 1_000_000
    sse_window_s: float = 0.0
    """> 0 where the platform buffers responses (Lambda): the stream ends after this long."""
    sse_heartbeat_s: float = 15.0
    worker_grace_s: float = 25.0
    """SIGTERM: how long running jobs may finish before they are handed back."""
    redis_max_connections: int = 128
    saq_heartbeat_s: float = 20.0
    saq_sweep_s: float = 10.0
    saq_timeout_margin_s: float = 60.0
    saq_sweep_abort_wait_s: float = 5.0
    saq_worker_info_s: float = 10.0
    sqs_visibility_timeout_s: int = 0
    """Dev worker only; 0 = the queue's own visibility timeout."""
    sqs_batch_size: int = 1
    sqs_wait_s: int = 5
    sqs_retry_delay_s: float = 10.0
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_json: bool = False

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        redis_url = _url(env, "REDIS_URL", ("redis", "rediss")) or _url(
            env, "REDISCLOUD_URL", ("redis", "rediss")
        )
        store_url = _url(env, "JOBS_STORE_URL", ("memory", "sqlite", "redis", "rediss", "s3"))
        queue_url = _url(env, "JOBS_QUEUE_URL", ("memory", "redis", "rediss", "sqs"))
        if redis_url:
            store_url = store_url or redis_url
            queue_url = queue_url or redis_url
        store_url = store_url or cls.store_url
        queue_url = queue_url or cls.queue_url
        store_scheme = urlparse(store_url).scheme
        queue_scheme = urlparse(queue_url).scheme
        if queue_scheme == "sqs" or store_scheme == "s3":
            if not (queue_scheme == "sqs" and store_scheme == "s3"):
                raise SettingsError("JOBS_QUEUE_URL=sqs://... and JOBS_STORE_URL=s3://... go together")
            backend = "aws"
        elif queue_scheme in ("redis", "rediss"):
            if store_scheme not in ("redis", "rediss"):
                raise SettingsError("JOBS_STORE_URL must be a redis:// URL when the queue is on Redis")
            backend = "redis"
            redis_url = redis_url or queue_url
        else:
            if store_scheme not in ("memory", "sqlite"):
                raise SettingsError(
                    "JOBS_STORE_URL: the in-process queue needs a sqlite:// or memory:// store"
                )
            backend = "local"

        openai_key = env.get("OPENAI_API_KEY", "").strip() or None
        anthropic_key = env.get("ANTHROPIC_API_KEY", "").strip() or None
        openai_base = _url(env, "OPENAI_BASE_URL", ("http", "https"))
        provider = env.get("LLM_PROVIDER", "").strip().lower()
        if not provider:
            provider = "openai" if openai_key or openai_base else "anthropic" if anthropic_key else "offline"
        if provider not in LLM_PROVIDERS:
            raise SettingsError(f"LLM_PROVIDER={provider!r} must be one of {', '.join(LLM_PROVIDERS)}")
        if provider == "anthropic" and not anthropic_key:
            raise SettingsError("ANTHROPIC_API_KEY is required with LLM_PROVIDER=anthropic")
        if provider == "openai" and not (openai_key or openai_base):
            raise SettingsError("OPENAI_API_KEY (or OPENAI_BASE_URL) is required with LLM_PROVIDER=openai")
        default_models = {"offline": "offline", "openai": "gpt-5.4-mini", "anthropic": "claude-sonnet-5-5"}
        step_models = {
            name[len("LLM_MODEL_"):].lower(): value.strip()
            for name, value in env.items()
            if name.startswith("LLM_MODEL_") and value.strip()
        }
        json_mode = env.get("OPENAI_JSON_MODE", "json_schema").strip() or "json_schema"
        if json_mode not in ("json_schema", "json_object"):
            raise SettingsError(f"OPENAI_JSON_MODE={json_mode!r} must be json_schema or json_object")
        log_level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
        if log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"LOG_LEVEL={log_level!r} must be debug, info, warning or error")

        return cls(
            backend=backend,
            store_url=store_url,
            queue_url=queue_url,
            redis_url=redis_url,
            key_prefix=env.get("JOBS_KEY_PREFIX", KEY_PREFIX).strip() or KEY_PREFIX,
            aws_endpoint_url=_url(env, "AWS_ENDPOINT_URL", ("http", "https")),
            aws_region=env.get("AWS_REGION", env.get("AWS_DEFAULT_REGION", "us-east-1")).strip()
            or "us-east-1",
            llm_provider=provider,
            llm_default_model=env.get("LLM_DEFAULT_MODEL", "").strip() or default_models[provider],
            llm_step_models=step_models,
            openai_api_key=openai_key,
            openai_base_url=openai_base,
            openai_json_mode=json_mode,
            anthropic_api_key=anthropic_key,
            anthropic_base_url=_url(env, "ANTHROPIC_BASE_URL", ("http", "https")),
            llm_offline_latency_ms=_float(env, "LLM_OFFLINE_LATENCY_MS", 0.0, 0.0, 600_000.0),
            llm_timeout_s=_float(env, "LLM_TIMEOUT_S", 120.0, 0.1, 3600.0),
            llm_max_retries=_int(env, "LLM_MAX_RETRIES", 6, 0, 50),
            llm_rpm=_int(env, "LLM_RPM", 0, 0, 10_000_000),
            llm_tpm=_int(env, "LLM_TPM", 0, 0, 1_000_000_000),
            llm_prices=_prices(env.get("LLM_PRICES", "")),
            api_keys=_api_keys(env.get("API_KEYS", "")),
            cors_origins=tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()),
            job_ttl_s=_int(env, "JOB_TTL_S", 7 * 24 * 3600, 60, 366 * 24 * 3600),
            job_max_attempts=_int(env, "JOB_MAX_ATTEMPTS", 3, 1, 100),
            legacy_wait_s=_float(env, "LEGACY_WAIT_S", 25.0, 0.0, 600.0),
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", 4 if backend == "local" else 50, 1, 10_000),
            submit_rate_per_min=_int(env, "SUBMIT_RATE_PER_MIN", 120, 0, 1_000_000),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 1_000_000, 1024, 100_000_000),
            sse_window_s=_float(env, "SSE_WINDOW_S", 0.0, 0.0, 28.0),
            sse_heartbeat_s=_float(env, "SSE_HEARTBEAT_S", 15.0, 0.05, 300.0),
            worker_grace_s=_float(env, "WORKER_GRACE_S", 25.0, 0.0, 3600.0),
            redis_max_connections=_int(env, "REDIS_MAX_CONNECTIONS", 128, 4, 100_000),
            saq_heartbeat_s=_float(env, "SAQ_HEARTBEAT_S", 20.0, 1.0, 3600.0),
            saq_sweep_s=_float(env, "SAQ_SWEEP_S", 10.0, 1.0, 3600.0),
            saq_timeout_margin_s=_float(env, "SAQ_TIMEOUT_MARGIN_S", 60.0, 0.0, 86400.0),
            saq_sweep_abort_wait_s=_float(env, "SAQ_SWEEP_ABORT_WAIT_S", 5.0, 0.0, 60.0),
            saq_worker_info_s=_float(env, "SAQ_WORKER_INFO_S", 10.0, 1.0, 3600.0),
            sqs_visibility_timeout_s=_int(env, "SQS_VISIBILITY_TIMEOUT_S", 0, 0, 43200),
            sqs_batch_size=_int(env, "SQS_BATCH_SIZE", 1, 1, 10),
            sqs_wait_s=_int(env, "SQS_WAIT_S", 5, 1, 20),
            sqs_retry_delay_s=_float(env, "SQS_RETRY_DELAY_S", 10.0, 0.0, 900.0),
            host=env.get("HOST", "127.0.0.1").strip() or "127.0.0.1",
            port=_int(env, "PORT", 8000, 1, 65535),
            log_level=log_level,
            log_json=_bool(env, "LOG_JSON", False),
        )


def _prices(raw: str) -> dict[str, tuple[float, float]]:
    """``LLM_PRICES=model:prompt_usd_per_1k:completion_usd_per_1k,...``"""
    prices: dict[str, tuple[float, float]] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        parts = item.rsplit(":", 2)
        try:
            prices[parts[0]] = (float(parts[1]), float(parts[2]))
        except (IndexError, ValueError):
            raise SettingsError(
                "LLM_PRICES must look like 'model:0.15:0.6,model2:3:15' (USD per 1k tokens)"
            ) from None
    return prices
