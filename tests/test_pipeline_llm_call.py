"""One LLM step: repair of invalid output, retries of transient errors, deadline, trace."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from pipeline.deps import Deps, PipelineConfig
from pipeline.llm_call import StepCall, backoff_delay, call_llm_step
from pipeline.model import LLMError, LLMReply, LLMRequest
from pipeline.offline import OfflineProvider
from pipeline.ports import TextSink
from pipeline.request import validate_request
from pipeline.steps import build_pitch

PITCH = build_pitch(
    validate_request(
        {
            "project_title": "Acme Robotics",
            "elevator_pitch": "Robots that fold laundry for hotels. 12 pilots in Vienna.",
            "language": "en",
        }
    )
)
CONFIG = PipelineConfig(llm_backoff_base_s=0.01, llm_backoff_max_s=0.05, llm_max_retries=3)


class Scripted:
    """A provider that plays a script of replies ("valid", "not-json", "wrong-shape")
    and errors, then answers validly; it keeps every request it was sent."""

    name = "scripted"

    def __init__(self, script: list[str | LLMError]) -> None:
        self.script = list(script)
        self.requests: list[LLMRequest] = []
        self.offline = OfflineProvider()

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        self.requests.append(request)
        item = self.script.pop(0) if self.script else "valid"
        if isinstance(item, LLMError):
            raise item
        answer: Any = self.offline.answer(request.step, request.language, request.context)
        if item == "not-json":
            text = "Sure! Here is the evidence: {sources: [unclosed"
        elif item == "wrong-shape":
            text = json.dumps({k: v for k, v in answer.items() if k != "sources"})
        else:
            text = "```json\n" + json.dumps(answer) + "\n```"
        return LLMReply(text=text, model=request.model, prompt_tokens=100, completion_tokens=50)


def evidence_call(deadline_s: float = 30) -> StepCall:
    return StepCall(str(uuid.uuid4()), "evidence", "en", {"pitch": PITCH}, time.time() + deadline_s)


async def test_invalid_json_then_valid_succeeds_after_one_repair(store: SqliteStore) -> None:
    """Non-JSON output gets one repair request carrying the bad answer and the error; its answer is used."""
    llm = Scripted(["not-json"])
    call = evidence_call()
    data = await call_llm_step(Deps(store, llm, CONFIG), call)
    assert data["sources"] and data["region"] == "EU/DACH"
    assert len(llm.requests) == 2
    first, repair = llm.requests
    assert repair.history[-1] == ("assistant", "Sure! Here is the evidence: {sources: [unclosed")
    assert repair.history[-2] == ("user", first.prompt)
    assert "not valid JSON" in repair.prompt
    trace = await store.get_trace(call.job_id)
    assert [(r["kind"], r["attempt"], r["outcome"]) for r in trace] == [
        ("call", 1, "llm_invalid_output"),
        ("repair", 2, "ok"),
    ]


async def test_schema_violation_is_quoted_in_the_repair_prompt(store: SqliteStore) -> None:
    """A reply missing a required field is repaired with a prompt naming that field."""
    llm = Scripted(["wrong-shape"])
    await call_llm_step(Deps(store, llm, CONFIG), evidence_call())
    assert "sources" in llm.requests[1].prompt and "Field required" in llm.requests[1].prompt


async def test_invalid_twice_fails_with_llm_invalid_output(store: SqliteStore) -> None:
    """Invalid output, then invalid again after the one repair, is llm_invalid_output with no third call."""
    llm = Scripted(["not-json", "wrong-shape", "valid"])
    with pytest.raises(LLMError) as info:
        await call_llm_step(Deps(store, llm, CONFIG), evidence_call())
    assert info.value.code == "llm_invalid_output"
    assert len(llm.requests) == 2


async def test_transient_error_with_retry_after_is_retried(store: SqliteStore) -> None:
    """A 429 with Retry-After is retried and the step succeeds; the trace shows both attempts."""
    llm = Scripted([LLMError("llm_rate_limited", "slow down", transient=True, retry_after=0.05)])
    call = evidence_call()
    data = await call_llm_step(Deps(store, llm, CONFIG), call)
    assert data["sources"]
    trace = await store.get_trace(call.job_id)
    assert [(r["attempt"], r["outcome"]) for r in trace] == [(1, "llm_rate_limited"), (2, "ok")]
    assert trace[1]["prompt_tokens"] == 100 and trace[1]["completion_tokens"] == 50


def test_backoff_honours_retry_after_and_grows() -> None:
    """The wait is never shorter than Retry-After and doubles per attempt within jitter, up to the cap."""
    config = PipelineConfig(llm_backoff_base_s=1.0, llm_backoff_max_s=8.0)
    assert backoff_delay(config, 1, 30.0) >= 30.0
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 8.0), (9, 8.0)]:
        delays = [backoff_delay(config, attempt, None) for _ in range(50)]
        assert all(base <= d <= 2 * base for d in delays)


async def test_retries_stop_after_the_configured_number(store: SqliteStore) -> None:
    """A provider that stays unavailable is tried 1 + llm_max_retries times, then its error fails the step."""
    error = LLMError("llm_unavailable", "503 from upstream", transient=True)
    llm = Scripted([error] * 10)
    with pytest.raises(LLMError) as info:
        await call_llm_step(Deps(store, llm, CONFIG), evidence_call())
    assert info.value.code == "llm_unavailable"
    assert len(llm.requests) == 1 + CONFIG.llm_max_retries


async def test_retry_after_beyond_the_deadline_fails_with_timeout(store: SqliteStore) -> None:
    """When Retry-After would cross the job deadline the step fails with timeout instead of waiting."""
    llm = Scripted([LLMError("llm_rate_limited", "later", transient=True, retry_after=60)])
    with pytest.raises(LLMError) as info:
        await call_llm_step(Deps(store, llm, CONFIG), evidence_call(deadline_s=5))
    assert info.value.code == "timeout"
    assert "while retrying" in info.value.message, "it slept into the deadline instead"
    assert len(llm.requests) == 1


async def test_call_past_the_deadline_is_never_made(store: SqliteStore) -> None:
    """A step whose deadline already passed fails with timeout without calling the provider."""
    llm = Scripted([])
    with pytest.raises(LLMError) as info:
        await call_llm_step(Deps(store, llm, CONFIG), evidence_call(deadline_s=-1))
    assert info.value.code == "timeout" and llm.requests == []


async def test_request_carries_model_schema_language_and_only_the_inputs(store: SqliteStore) -> None:
    """The request uses the step's routed model and schema, and its prompt is filled from the inputs."""
    config = PipelineConfig(default_model="m-small", step_models={"evidence": "m-big"})
    llm = Scripted([])
    await call_llm_step(Deps(store, llm, config), evidence_call())
    request = llm.requests[0]
    assert request.model == "m-big"
    assert request.schema["properties"].keys() == {"region", "topics", "sources"}
    assert request.schema_name.startswith("sources")
    assert request.language == "en"
    assert "Acme Robotics" in request.prompt and "fold laundry" in request.prompt
    assert request.context == {"pitch": PITCH}


async def test_trace_cost_uses_the_price_table(store: SqliteStore) -> None:
    """With a price for the model, each traced attempt carries its cost from the reported tokens."""
    config = PipelineConfig(default_model="m", price_per_1k_tokens={"m": (1.0, 2.0)})
    call = evidence_call()
    await call_llm_step(Deps(store, Scripted([]), config), call)
    (record,) = await store.get_trace(call.job_id)
    assert record["cost_usd"] == pytest.approx(100 / 1000 * 1.0 + 50 / 1000 * 2.0)
    assert {"step", "provider", "model", "attempt", "cache_hit", "prompt_tokens",
            "completion_tokens", "duration_ms", "outcome"} <= record.keys()


async def test_rate_limiter_is_asked_before_every_attempt(store: SqliteStore) -> None:
    """The shared rate limiter is acquired once per provider attempt, for the step's model."""
    acquired: list[tuple[str, int]] = []

    class Limiter:
        async def acquire(self, model: str, tokens: int) -> None:
            acquired.append((model, tokens))

    llm = Scripted([LLMError("llm_unavailable", "reset", transient=True)])
    deps = Deps(store, llm, PipelineConfig(default_model="m", llm_backoff_base_s=0.01), Limiter())
    await call_llm_step(deps, evidence_call())
    assert [m for m, _ in acquired] == ["m", "m"]
    assert all(tokens > 0 for _, tokens in acquired)


class SlowLimiter:
    """A limiter that holds every acquire for ``wait_s``."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s

    async def acquire(self, model: str, tokens: int) -> None:
        await asyncio.sleep(self.wait_s)


async def test_a_rate_limit_wait_does_not_use_up_the_call_timeout(store: SqliteStore) -> None:
    """A call held by the rate limiter for longer than the per-call timeout is still made,
    once: only the job's deadline bounds the wait."""
    llm = Scripted([])
    config = replace(CONFIG, llm_timeout_s=0.1)
    call = evidence_call()
    await call_llm_step(Deps(store, llm, config, SlowLimiter(0.3)), call)
    assert len(llm.requests) == 1
    assert [r["outcome"] for r in await store.get_trace(call.job_id)] == ["ok"]


async def test_a_rate_limit_wait_past_the_deadline_fails_with_timeout(store: SqliteStore) -> None:
    """A limiter that would hold the call past the job's deadline ends the step with
    timeout, and no call is made."""
    llm = Scripted([])
    with pytest.raises(LLMError) as failed:
        await call_llm_step(Deps(store, llm, CONFIG, SlowLimiter(5)), evidence_call(deadline_s=0.2))
    assert failed.value.code == "timeout" and not failed.value.transient
    assert llm.requests == []
