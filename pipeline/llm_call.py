"""One LLM step: render the prompt, call the provider with retries inside the job's
deadline, validate the answer, repair once, and trace every attempt.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from pipeline.budget import JobBudget, cost_usd
from pipeline.context_guard import (
    CHARS_PER_TOKEN_ASCII,
    ContextOverflow,
    context_env_key,
    estimate_tokens,
    fit,
    output_reserve,
)
from pipeline.deltas import StepDeltas
from pipeline.deps import Deps, PipelineConfig
from pipeline.model import LLMError, LLMRequest, TraceRecord, now_ms
from pipeline.prompts import render, repair_prompt
from pipeline.schemas import InvalidOutput, json_schema, parse_output, schema_name
from pipeline.vocabulary import ErrorCode

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StepCall:
    """What one LLM step call needs to know about its job."""

    job_id: str
    step: str
    language: str
    inputs: dict[str, Any]
    """Input artifacts of the step: artifact name -> data."""
    deadline: float
    """Epoch seconds; no attempt or retry wait may run past it."""
    input_hashes: dict[str, str] = field(default_factory=dict)
    """Artifact name -> content hash of ``inputs``, when known (prompt rendering reuses
    the text of an artifact it has rendered before)."""
    deltas: StepDeltas | None = None
    """Where each attempt's streamed text goes (``delta`` events); ``None``: nowhere."""
    trace: Callable[[TraceRecord], None] | None = None
    """Where trace records go; ``None`` writes each to the store at once. The runner
    collects them and stores them with the step's artifact, in one round trip. A call
    aborted from outside is recorded only here: its task is being cancelled, and a
    store write of its own would delay that."""
    budget: JobBudget | None = None
    """The job's cost caps: each provider attempt reserves its worst case first."""


class _InvalidAnswer(Exception):
    def __init__(self, text: str, error: str) -> None:
        super().__init__(error)
        self.text = text
        self.error = error


def backoff_delay(config: PipelineConfig, attempt: int, retry_after: float | None) -> float:
    """Wait before retry number ``attempt`` (1-based): exponential with full jitter
    on top, capped, and never shorter than the provider's ``Retry-After``."""
    base = min(config.llm_backoff_max_s, config.llm_backoff_base_s * 2 ** (attempt - 1))
    delay: float = base + random.uniform(0, base)
    return max(delay, retry_after or 0.0)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, LLMError) and exc.transient


def cache_hit_record(deps: Deps, step: str) -> TraceRecord:
    """The trace record of a step served from the cache."""
    model = deps.config.model_for(step)
    return {
        "step": step,
        "provider": deps.llm.name,
        "model": model,
        "attempt": 0,
        "kind": "cache",
        "cache_hit": True,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "duration_ms": 0,
        "outcome": "ok",
        "cost_usd": cost_usd(deps.config, model, 0, 0),
        "ts": now_ms(),
    }


class _Caller:
    def __init__(self, deps: Deps, call: StepCall) -> None:
        self.deps = deps
        self.call = call
        self.attempt = 0
        self.guard: dict[str, Any] = {}
        """The context guard's fields of the current request's records: ``ctx_max``,
        ``prompt_tokens_est``, ``truncate_applied`` (and ``sources_dropped``)."""
        self.billed: float | None = None
        """``cost_usd`` of the current attempt's trace record (what its reservation
        settles to)."""

    async def trace(self, kind: str, outcome: str, started: float, **extra: Any) -> None:
        record = self._record(kind, outcome, started, **extra)
        if self.call.trace is not None:
            self.call.trace(record)
        else:
            await self.deps.store.add_trace(self.call.job_id, record)

    def _record(self, kind: str, outcome: str, started: float, **extra: Any) -> TraceRecord:
        prompt_tokens = int(extra.pop("prompt_tokens", 0))
        completion_tokens = int(extra.pop("completion_tokens", 0))
        model = self.deps.config.model_for(self.call.step)
        cost = cost_usd(self.deps.config, model, prompt_tokens, completion_tokens)
        self.billed = cost
        return {
            "step": self.call.step,
            "provider": self.deps.llm.name,
            "model": model,
            "attempt": self.attempt,
            "kind": kind,
            "cache_hit": False,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            "outcome": outcome,
            "cost_usd": cost,
            "ts": now_ms(),
            **self.guard,
            **extra,
        }

    def overflow(self, kind: str, tokens: int, ctx_max: int, reserve: int, note: str) -> LLMError:
        """The error of a request the context guard stopped: no provider call, so no
        trace record (the trace lists calls); the message carries the numbers."""
        model = self.deps.config.model_for(self.call.step)
        return LLMError(
            ErrorCode.LLM_CONTEXT_OVERFLOW,
            f"{self.deps.llm.name}: the {kind} prompt of step {self.call.step} needs about "
            f"{tokens} tokens; model {model} has a context window of {ctx_max} with {reserve} "
            f"reserved for the answer{note} (LLM_CONTEXT_{context_env_key(model)} sets the window)",
        )

    async def once(self, request: LLMRequest, kind: str) -> dict[str, Any]:
        """One provider call and validation of its answer; with cost caps, its worst
        case reserved before and settled to its trace record's cost after."""
        self.attempt += 1
        tokens = estimate_tokens(request.system, request.prompt, request.history)
        await self._wait_for_rate_limit(request, tokens)
        budget = self.call.budget
        if budget is None:
            return await self._attempt(request, kind)
        reservation = await budget.reserve(self.call.step, request.model, tokens, request.max_tokens)
        self.billed = None
        try:
            data = await self._attempt(request, kind)
        except asyncio.CancelledError:
            budget.keep(reservation)
            raise
        except BaseException:
            await budget.settle(reservation, self.billed)
            raise
        await budget.settle(reservation, self.billed)
        return data

    async def _attempt(self, request: LLMRequest, kind: str) -> dict[str, Any]:
        remaining = self.call.deadline - time.time()
        if remaining <= 0:
            raise LLMError(ErrorCode.TIMEOUT, "job deadline reached before the call")
        per_call = min(request.timeout_s, remaining)
        deltas = self.call.deltas
        on_text = deltas.sink(self.attempt) if deltas is not None else None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(per_call):
                reply = await self.deps.llm.complete(request, on_text)
        except asyncio.CancelledError:
            # Stopped from outside (the job was cancelled, another step failed, the
            # worker is stopping): the provider may still bill the call, so it is traced,
            # with the completion tokens received estimated from the text streamed so far.
            if self.call.trace is not None:
                received = deltas.received if deltas is not None else 0
                self.call.trace(
                    self._record(
                        kind, "aborted", started, error="the job stopped",
                        completion_tokens=math.ceil(received / CHARS_PER_TOKEN_ASCII),
                        tokens_estimated=True,
                    )
                )
            raise
        except TimeoutError:
            deadline_hit = per_call >= remaining
            error = LLMError(
                ErrorCode.TIMEOUT,
                f"no answer within {per_call:.1f}s"
                + (" (job deadline)" if deadline_hit else ""),
                transient=not deadline_hit,
            )
            await self.trace(kind, error.code, started, error=error.message)
            raise error from None
        except LLMError as exc:
            await self.trace(kind, exc.code, started, error=exc.message)
            raise
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
        }
        try:
            data = parse_output(self.call.step, reply.text)
        except InvalidOutput as exc:
            await self.trace(kind, ErrorCode.LLM_INVALID_OUTPUT, started, error=str(exc), **usage)
            raise _InvalidAnswer(reply.text, str(exc)) from exc
        await self.trace(kind, "ok", started, **usage)
        return data

    async def _wait_for_rate_limit(self, request: LLMRequest, tokens: int) -> None:
        """Wait for the shared limiter, as long as the job's deadline allows: the wait
        is not the provider's slowness, so the per-call timeout does not cover it and
        it is not traced as a call. ``tokens`` is the context guard's estimate of the
        prompt."""
        if self.deps.limiter is None:
            return
        try:
            async with asyncio.timeout(max(0.0, self.call.deadline - time.time())):
                await self.deps.limiter.acquire(request.model, tokens)
        except TimeoutError:
            raise LLMError(ErrorCode.TIMEOUT, "job deadline reached waiting for the LLM rate limit") from None

    async def with_retries(self, request: LLMRequest, kind: str) -> dict[str, Any]:
        """``once`` retried on transient errors; a wait that would cross the
        deadline ends the step with ``timeout`` instead."""
        config = self.deps.config
        passed_deadline = False

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = exc.retry_after if isinstance(exc, LLMError) else None
            return backoff_delay(config, state.attempt_number, retry_after)

        def stop(state: RetryCallState) -> bool:
            nonlocal passed_deadline
            if time.time() + state.upcoming_sleep >= self.call.deadline:
                passed_deadline = True
                return True
            return state.attempt_number > config.llm_max_retries

        try:
            return await self.once(request, kind)
        except LLMError as exc:
            if not _is_transient(exc):
                raise
            failed: LLMError | None = exc
        # Built only once a call failed: building tenacity's machinery for every call
        # cost a tenth of a step's CPU. Its first attempt re-raises that failure, so
        # stop and wait count attempts as if tenacity had made the first call.
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_transient), wait=wait, stop=stop, reraise=True
            ):
                with attempt:
                    if failed is not None:
                        first, failed = failed, None
                        raise first
                    return await self.once(request, kind)
        except LLMError as exc:
            if passed_deadline:
                raise LLMError(
                    ErrorCode.TIMEOUT, f"job deadline reached while retrying: {exc.message}"
                ) from exc
            raise
        raise AssertionError("unreachable: AsyncRetrying returns or raises")


async def call_llm_step(deps: Deps, call: StepCall) -> dict[str, Any]:
    """Validated output of one LLM step, or :class:`LLMError` (``code`` says why)."""
    schema = json_schema(call.step)
    model = deps.config.model_for(call.step)
    system, prompt = render(call.step, call.language, call.inputs, schema, call.input_hashes)
    caller = _Caller(deps, call)
    # The context guard: one length estimate per call; a re-render only when it does
    # not fit (evidence trimmed, least relevant sources first).
    ctx_max = deps.config.context_window(model)
    reserve = output_reserve(ctx_max)
    budget = ctx_max - reserve

    def rerender(inputs: dict[str, Any], changed: bool) -> tuple[str, str]:
        hashes = call.input_hashes
        if changed:  # the evidence is no longer the stored artifact its hash names
            hashes = {name: digest for name, digest in hashes.items() if name != "sources"}
        return render(call.step, call.language, inputs, schema, hashes)

    tokens = estimate_tokens(system, prompt)
    inputs = call.inputs
    caller.guard = {"ctx_max": ctx_max, "prompt_tokens_est": tokens, "truncate_applied": False}
    if tokens > budget:
        try:
            fitted = fit(system, prompt, inputs, budget, rerender)
        except ContextOverflow as exc:
            note = ", even with all evidence left out" if exc.trimmed else ""
            raise caller.overflow("call", exc.tokens, ctx_max, reserve, note) from None
        system, prompt, inputs = fitted.system, fitted.prompt, fitted.inputs
        caller.guard |= {
            "prompt_tokens_est": fitted.tokens,
            "truncate_applied": True,
            "sources_dropped": fitted.dropped,
        }
        log.info("llm_prompt_truncated", job_id=call.job_id, step=call.step, sources_dropped=fitted.dropped)
    request = LLMRequest(
        step=call.step,
        model=model,
        system=system,
        prompt=prompt,
        schema=schema,
        schema_name=schema_name(call.step),
        language=call.language,
        max_tokens=reserve,
        timeout_s=deps.config.llm_timeout_s,
        context=inputs,
    )
    try:
        return await caller.with_retries(request, "call")
    except _InvalidAnswer as first:
        log.warning("llm_output_invalid", job_id=call.job_id, step=call.step, error=first.error)
        repair = replace(
            request,
            history=(*request.history, ("user", request.prompt), ("assistant", first.text)),
            prompt=repair_prompt(call.language, first.error),
        )
        tokens = estimate_tokens(repair.system, repair.prompt, repair.history)
        caller.guard["prompt_tokens_est"] = tokens
        if tokens > budget:
            note = ", with the invalid answer quoted"
            raise caller.overflow("repair", tokens, ctx_max, reserve, note) from first
        try:
            return await caller.with_retries(repair, "repair")
        except _InvalidAnswer as second:
            raise LLMError(
                ErrorCode.LLM_INVALID_OUTPUT,
                f"answer for step {call.step} invalid after one repair: {second.error}",
            ) from second
