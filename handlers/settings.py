"""Configuration from the environment, read once into a typed object (SPEC §3).

``Settings`` is a ``pydantic-settings`` model: each field is the upper-case
variable of its name (``port`` <- ``PORT``) unless it names another one, values are
stripped and a blank variable means the default. A bad value raises
:class:`SettingsError` whose message is one line naming the variable; entry
points print it and exit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import annotated_types
from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasGenerator,
    BeforeValidator,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from adapters.constants import KEY_PREFIX
from pipeline.budget import unpriced

LLM_PROVIDERS = ("offline", "openai", "anthropic")
DEFAULT_MODELS = {"offline": "offline", "openai": "gpt-5.4-mini", "anthropic": "claude-sonnet-5-5"}
STEP_MODEL_PREFIX = "LLM_MODEL_"
CONTEXT_PREFIX = "LLM_CONTEXT_"
CONTEXT_TOKENS = (256, 100_000_000)
DEFAULT_STORE_URL = "sqlite:///./data/jobq.db"
DEFAULT_QUEUE_URL = "memory://"


class SettingsError(ValueError):
    """One line naming the variable and what is wrong with it."""


# -- value parsers (a validator raising SettingsError words the whole message) -------------------


def _url(*schemes: str) -> AfterValidator:
    def check(raw: str | None) -> str | None:
        if raw is not None and urlparse(raw).scheme not in schemes:
            raise ValueError(f"scheme must be one of {', '.join(schemes)}")
        return raw

    return AfterValidator(check)


MIN_SECRET_CHARS = 16


def _lower(raw: object) -> object:
    return raw.lower() if isinstance(raw, str) else raw


def _api_keys(raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, tenant = item.partition(":")
        if not sep or not key.strip() or not tenant.strip():
            raise SettingsError("API_KEYS must look like 'key:tenant,key2:tenant2'")
        keys[key.strip()] = tenant.strip()
    return keys


def _comma_list(raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _prices(raw: object) -> object:
    """``LLM_PRICES=model:prompt_usd_per_1k:completion_usd_per_1k,...``"""
    if not isinstance(raw, str):
        return raw
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


def _positive_usd(raw: float | None) -> float | None:
    """``TENANT_MAX_COST_USD_PER_DAY``: a positive, finite number of USD."""
    if raw is not None and not (math.isfinite(raw) and raw > 0):
        raise SettingsError(
            f"TENANT_MAX_COST_USD_PER_DAY={raw} must be a positive number of USD"
        )
    return raw


# -- field markers ------------------------------------------------------------------------------

RedisUrl = Annotated[str | None, _url("redis", "rediss")]
HttpUrl = Annotated[str | None, _url("http", "https")]
LowerCase = BeforeValidator(_lower)


def _derived(field: FieldInfo) -> bool:
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get("derived"))


DERIVED = Field(json_schema_extra={"derived": True})
"""Marks a field computed from others, never read from a variable of its own name."""


def Variable(*names: str) -> Any:
    """Read from ``names`` (the first one set) instead of the field's upper-case name."""
    return Field(validation_alias=AliasChoices(*names) if len(names) > 1 else names[0])


def Between(lo: float, hi: float) -> Any:
    """A number from ``lo`` to ``hi``, both included."""
    return Field(ge=lo, le=hi)


# -- the environment as a settings source ------------------------------------------------------

_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("jobq_settings_environ", default=None)
"""The mapping ``Settings.from_env(env)`` reads instead of ``os.environ``."""


class _Environment(EnvSettingsSource):
    """``EnvSettingsSource`` over a given mapping: values stripped, blank ones dropped
    (a blank variable means the default); ``LLM_MODEL_<STEP>`` variables collected into
    ``llm_step_models``; fields marked ``derived`` never read from the environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {name: value.strip() for name, value in environ.items() if value.strip()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if _derived(field):
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        steps = {
            name[len(STEP_MODEL_PREFIX) :].lower(): value
            for name, value in self.env_vars.items()
            if name.startswith(STEP_MODEL_PREFIX) and value is not None
        }
        if steps:
            data["LLM_STEP_MODELS"] = steps
        windows = {
            name[len(CONTEXT_PREFIX) :].upper(): _context_tokens(name, value)
            for name, value in self.env_vars.items()
            if name.startswith(CONTEXT_PREFIX) and len(name) > len(CONTEXT_PREFIX) and value is not None
        }
        if windows:
            data["LLM_CONTEXT_WINDOWS"] = windows
        return data


def _context_tokens(name: str, raw: str) -> int:
    """``LLM_CONTEXT_<MODEL>``: a model's context window in tokens."""
    lo, hi = CONTEXT_TOKENS
    try:
        tokens = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r} is not an integer (the model's context window in tokens)"
        ) from None
    if not lo <= tokens <= hi:
        raise SettingsError(f"{name}={raw} must be between {lo} and {hi} (tokens)")
    return tokens


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=True,
        alias_generator=AliasGenerator(validation_alias=str.upper),
    )

    backend: Annotated[Literal["local", "redis", "aws"], DERIVED] = "local"
    """local | redis | aws, derived from the URLs below."""
    store_url: Annotated[
        str, Variable("JOBS_STORE_URL"), _url("memory", "sqlite", "redis", "rediss", "s3")
    ] = DEFAULT_STORE_URL
    queue_url: Annotated[str, Variable("JOBS_QUEUE_URL"), _url("memory", "redis", "rediss", "sqs")] = (
        DEFAULT_QUEUE_URL
    )
    redis_url: Annotated[RedisUrl, Variable("REDIS_URL", "REDISCLOUD_URL")] = None
    key_prefix: Annotated[str, Variable("JOBS_KEY_PREFIX")] = KEY_PREFIX
    aws_endpoint_url: HttpUrl = None
    aws_region: Annotated[str, Variable("AWS_REGION", "AWS_DEFAULT_REGION")] = "us-east-1"

    llm_provider: Annotated[Literal["offline", "openai", "anthropic"], LowerCase] = "offline"
    """By which key is set when ``LLM_PROVIDER`` is not."""
    llm_default_model: str = "offline"
    """Per provider when not set."""
    llm_step_models: Annotated[dict[str, str], DERIVED] = Field(default_factory=dict)
    """From ``LLM_MODEL_<STEP>``."""
    llm_context_windows: Annotated[dict[str, int], DERIVED] = Field(default_factory=dict)
    """From ``LLM_CONTEXT_<MODEL>`` (tokens), keyed by ``<MODEL>``."""
    openai_api_key: str | None = None
    openai_base_url: HttpUrl = None
    openai_json_mode: Literal["json_schema", "json_object"] = "json_schema"
    anthropic_api_key: str | None = None
    anthropic_base_url: HttpUrl = None
    llm_offline_latency_ms: Annotated[float, Between(0.0, 600_000.0)] = 0.0
    llm_timeout_s: Annotated[float, Between(0.1, 3600.0)] = 120.0
    llm_max_retries: Annotated[int, Between(0, 50)] = 6
    live_deltas: bool = True
    """``delta`` events of a running step's text (SPEC 7.1); ``LIVE_DELTAS=0`` turns them off."""
    llm_rpm: Annotated[int, Between(0, 10_000_000)] = 0
    llm_tpm: Annotated[int, Between(0, 1_000_000_000)] = 0
    llm_prices: Annotated[dict[str, tuple[float, float]], NoDecode, BeforeValidator(_prices)] = Field(
        default_factory=dict
    )
    tenant_max_cost_usd_per_day: Annotated[float | None, AfterValidator(_positive_usd)] = None
    """Cost cap per tenant and UTC day; needs ``LLM_PRICES`` for every model in use."""

    api_keys: Annotated[dict[str, str], NoDecode, BeforeValidator(_api_keys)] = Field(default_factory=dict)
    operator_keys: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)] = ()
    """Keys for ``/metrics`` and ``/api/jobs/stats`` when ``API_KEYS`` is set."""
    stream_token_secret: str | None = None
    """Signs the tokens of ``streamUrl``; required when ``API_KEYS`` is set."""
    stream_token_ttl_s: Annotated[int, Between(10, 7 * 24 * 3600)] = 3600
    cors_origins: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)] = ()
    job_ttl_s: Annotated[int, Between(60, 366 * 24 * 3600)] = 7 * 24 * 3600
    job_max_attempts: Annotated[int, Between(1, 100)] = 3
    legacy_wait_s: Annotated[float, Between(0.0, 600.0)] = 25.0
    worker_concurrency: Annotated[int, Between(1, 10_000)] = 4
    """4 on the local backend, 50 otherwise, when not set."""
    submit_rate_per_min: Annotated[int, Between(0, 1_000_000)] = 120
    max_body_bytes: Annotated[int, Between(1024, 100_000_000)] = 1_000_000
    sse_window_s: Annotated[float, Between(0.0, 28.0)] = 0.0
    """> 0 where the platform buffers responses (Lambda): the stream ends after this long."""
    sse_heartbeat_s: Annotated[float, Between(0.05, 300.0)] = 15.0
    fair_scheduling: bool = True
    """Local and redis backends: tenants take turns for free worker slots; 0 = first in, first out."""
    tenant_max_running: Annotated[int, Between(0, 1_000_000)] = 0
    """Local and redis backends, with fair scheduling: one tenant's jobs running at once (0: no cap)."""
    worker_grace_s: Annotated[float, Between(0.0, 3600.0)] = 25.0
    """SIGTERM: how long running jobs may finish before they are handed back."""
    redis_max_connections: Annotated[int, Between(4, 100_000)] = 128
    saq_heartbeat_s: Annotated[float, Between(1.0, 3600.0)] = 20.0
    saq_sweep_s: Annotated[float, Between(1.0, 3600.0)] = 10.0
    saq_timeout_margin_s: Annotated[float, Between(0.0, 86400.0)] = 60.0
    saq_sweep_abort_wait_s: Annotated[float, Between(0.0, 60.0)] = 5.0
    saq_worker_info_s: Annotated[float, Between(1.0, 3600.0)] = 10.0
    sqs_visibility_timeout_s: Annotated[int, Between(0, 43200)] = 0
    """Dev worker only; 0 = the queue's own visibility timeout."""
    sqs_batch_size: Annotated[int, Between(1, 10)] = 1
    sqs_wait_s: Annotated[int, Between(1, 20)] = 5
    sqs_retry_delay_s: Annotated[float, Between(0.0, 900.0)] = 10.0
    host: str = "127.0.0.1"
    port: Annotated[int, Between(1, 65535)] = 8000
    log_level: Annotated[Literal["debug", "info", "warning", "error"], LowerCase] = "info"
    log_json: bool = False

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of ``env`` (default: the process environment)."""
        token = _ENVIRON.set(env)
        try:
            return cls()
        except ValidationError as exc:
            raise SettingsError(_one_line(exc, os.environ if env is None else env)) from None
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        return init_settings, _Environment(settings_cls, os.environ if environ is None else environ)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        """What one variable implies for others: the backend from the URLs (``REDIS_URL``
        alone puts both on Redis), the provider from the key that is set, its model."""
        given = self.model_fields_set
        derived: dict[str, Any] = {}
        redis_url = self.redis_url
        store_url = self.store_url if "store_url" in given else redis_url or DEFAULT_STORE_URL
        queue_url = self.queue_url if "queue_url" in given else redis_url or DEFAULT_QUEUE_URL
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
        derived.update(backend=backend, store_url=store_url, queue_url=queue_url, redis_url=redis_url)

        provider = self.llm_provider
        if "llm_provider" not in given:
            provider = (
                "openai"
                if self.openai_api_key or self.openai_base_url
                else "anthropic"
                if self.anthropic_api_key
                else "offline"
            )
        if provider == "anthropic" and not self.anthropic_api_key:
            raise SettingsError("ANTHROPIC_API_KEY is required with LLM_PROVIDER=anthropic")
        if provider == "openai" and not (self.openai_api_key or self.openai_base_url):
            raise SettingsError("OPENAI_API_KEY (or OPENAI_BASE_URL) is required with LLM_PROVIDER=openai")
        derived["llm_provider"] = provider
        if "llm_default_model" not in given:
            derived["llm_default_model"] = DEFAULT_MODELS[provider]
        model = derived.get("llm_default_model", self.llm_default_model)
        missing = unpriced({model, *self.llm_step_models.values()}, self.llm_prices)
        if self.tenant_max_cost_usd_per_day is not None and missing:
            raise SettingsError(
                "TENANT_MAX_COST_USD_PER_DAY needs a price in LLM_PRICES for every model in use; "
                f"missing: {', '.join(missing)}"
            )
        if "worker_concurrency" not in given:
            derived["worker_concurrency"] = 4 if backend == "local" else 50
        # The model is frozen for everyone else; this validator is where it is built.
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        return self

    @model_validator(mode="after")
    def _stream_token_secret(self) -> Settings:
        """With keys, a stream URL must carry a token, and tokens need a secret."""
        secret = self.stream_token_secret or ""
        if self.api_keys and not secret:
            raise SettingsError(
                "STREAM_TOKEN_SECRET is required when API_KEYS is set (it signs the streamUrl tokens; "
                "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise SettingsError(f"STREAM_TOKEN_SECRET must be at least {MIN_SECRET_CHARS} characters")
        return self


# -- one line per bad value --------------------------------------------------------------------

_KIND = {
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "int_type": "is not an integer",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "bool_parsing": "is not a boolean (use true or false)",
    "bool_type": "is not a boolean (use true or false)",
}
_RANGE = ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number")


def _one_line(exc: ValidationError, environ: Mapping[str, str]) -> str:
    """The first error as ``VARIABLE=value <what is wrong>`` (or the validator's own words)."""
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SettingsError):
        return str(cause)
    loc = error["loc"]
    if not loc:
        return " ".join(error["msg"].split())
    field = _field(str(loc[0]))
    variable = _variable(field, environ) if field else str(loc[0])
    value = error.get("input")
    kind = error["type"]
    if kind in _KIND:
        message = f"{variable}={value!r} {_KIND[kind]}"
    elif kind in _RANGE:
        lo, hi = _bounds(field)
        message = f"{variable}={value} must be between {lo} and {hi}"
    elif kind == "literal_error":
        message = f"{variable}={value!r} must be {error['ctx']['expected']}"
    elif kind == "value_error" and cause is not None:
        message = f"{variable}={value!r}: {cause}"
    else:
        message = f"{variable}={value!r}: {error['msg']}"
    return " ".join(message.split())


def _names(field: FieldInfo) -> list[str]:
    alias = field.validation_alias
    return [str(a) for a in alias.choices] if isinstance(alias, AliasChoices) else [str(alias)]


def _field(variable: str) -> FieldInfo | None:
    """The field an error's location (its first variable name) belongs to."""
    return next((f for f in Settings.model_fields.values() if variable in _names(f)), None)


def _variable(field: FieldInfo, environ: Mapping[str, str]) -> str:
    """The variable that was read: with two names (``REDIS_URL`` / ``REDISCLOUD_URL``),
    the first one set."""
    names = _names(field)
    return next((name for name in names if environ.get(name, "").strip()), names[0])


def _bounds(field: FieldInfo | None) -> tuple[object, object]:
    metadata = field.metadata if field else []
    lo = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    hi = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    return lo, hi
