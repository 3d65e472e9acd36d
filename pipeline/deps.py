"""What the pipeline needs from the outside world, handed in by ``bootstrap()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.context_guard import context_window
from pipeline.latency import LatencyModel
from pipeline.ports import JobStore, LLMProvider, RateLimiter


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the pipeline that come from the environment (see handlers.settings)."""

    default_model: str = "offline"
    step_models: dict[str, str] = field(default_factory=dict)
    """Per-step model overrides from ``LLM_MODEL_<STEP>`` (keys are lower-case step names)."""
    job_max_attempts: int = 3
    llm_timeout_s: float = 120.0
    llm_max_retries: int = 6
    llm_backoff_base_s: float = 0.5
    """First retry waits about this long; each further one doubles it (plus jitter)."""
    llm_backoff_max_s: float = 30.0
    cancel_poll_s: float = 0.25
    live_deltas: bool = True
    """Stream LLM answers into ``delta`` events while they are written (SPEC 7.1)."""
    price_per_1k_tokens: dict[str, tuple[float, float]] = field(default_factory=dict)
    """model -> (prompt, completion) USD per 1k tokens, for the trace's cost estimate
    and the cost caps (:mod:`pipeline.budget`)."""
    tenant_max_cost_usd_per_day: float | None = None
    """``TENANT_MAX_COST_USD_PER_DAY``: what one tenant's calls may cost per UTC day."""
    context_windows: dict[str, int] = field(default_factory=dict)
    """``LLM_CONTEXT_<MODEL>`` overrides in tokens, keyed by ``<MODEL>`` (see
    :func:`pipeline.context_guard.context_env_key`); other models use the shipped table."""

    def model_for(self, step: str) -> str:
        return self.step_models.get(step, self.default_model)

    def context_window(self, model: str) -> int:
        """Tokens of ``model``'s context window (the context guard's ``ctx_max``)."""
        return context_window(model, self.context_windows)


@dataclass
class Deps:
    store: JobStore
    llm: LLMProvider
    config: PipelineConfig = field(default_factory=PipelineConfig)
    limiter: RateLimiter | None = None
    latency: LatencyModel = field(default_factory=LatencyModel)
    """Step durations seen by this process; they weight the scheduler's critical path."""
    stopping: Callable[[], bool] = field(default=lambda: False)
    """True once this process shuts down (``Queue.stopping``): a delivery interrupted
    then is handed back, not lost (an abort by the sweep or a queue timeout is a loss)."""
