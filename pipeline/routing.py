"""The effective configuration as ``GET /api/config`` shows it (SPEC 7.3): which
provider and model each LLM step uses, its context window and output reserve, the
rate gate and the request limits. Built from plain values only, so no key, URL or
price can end up in it.
"""

from __future__ import annotations

from typing import Any

from pipeline.context_guard import DEFAULT_CONTEXT_WINDOW, output_reserve
from pipeline.deps import PipelineConfig
from pipeline.graph import LLM_STEPS
from pipeline.request import DEFAULT_PARALLEL_LIMIT, DEFAULT_TIMEOUT_MS

PARALLEL_LIMIT_RANGE = (1, 16)
TIMEOUT_MS_RANGE = (1_000, 3_600_000)
"""The bounds ``POST /api/jobs`` accepts (SPEC §4)."""


def effective_config(
    *, backend: str, provider: str, config: PipelineConfig, rpm: int, tpm: int
) -> dict[str, Any]:
    """The body of ``GET /api/config``."""
    step_models = {step: config.model_for(step) for step in LLM_STEPS}
    routing: dict[str, Any] = {}
    for step, model in step_models.items():
        ctx_max = config.context_window(model)
        routing[step] = {
            "provider": provider,
            "model": model,
            "ctx_max": ctx_max,
            "max_output_tokens": output_reserve(ctx_max),
        }
    return {
        "backend": backend,
        "provider": provider,
        "default_model": config.default_model,
        "step_models": step_models,
        "effective_routing": routing,
        "default_context_window": DEFAULT_CONTEXT_WINDOW,
        "rate_gate": {"LLM_RPM": rpm, "LLM_TPM": tpm, "enabled": bool(rpm or tpm)},
        "limits": {
            "parallel_limit": {
                "default": DEFAULT_PARALLEL_LIMIT,
                "min": PARALLEL_LIMIT_RANGE[0],
                "max": PARALLEL_LIMIT_RANGE[1],
            },
            "timeout_ms": {
                "default": DEFAULT_TIMEOUT_MS,
                "min": TIMEOUT_MS_RANGE[0],
                "max": TIMEOUT_MS_RANGE[1],
            },
        },
    }
