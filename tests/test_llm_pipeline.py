"""The whole 15-step pipeline through the real OpenAI and Anthropic SDKs, against local
servers speaking their wire formats, wired exactly as production is (``bootstrap``)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from handlers.bootstrap import Container
from pipeline.graph import LLM_STEPS
from tests.support.fake_llm import BODY, FakeLLMServer, fake_anthropic_server, fake_openai_server

ServerFactory = Callable[..., AbstractContextManager[FakeLLMServer]]


def _env(provider: str, fake: FakeLLMServer, **extra: str) -> dict[str, str]:
    env = {"JOBS_STORE_URL": "memory://", "LLM_PROVIDER": provider, "LLM_MAX_RETRIES": "8"}
    if provider == "openai":
        env |= {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.openai_base_url}
    else:
        env |= {"ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": fake.anthropic_base_url}
    return env | extra


@pytest.fixture(params=["openai", "anthropic"])
def provider_fake(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeLLMServer]]:
    factory: ServerFactory = fake_openai_server if request.param == "openai" else fake_anthropic_server
    with factory() as fake:
        yield request.param, fake


async def _run(container: Container, body: dict[str, Any] | None = None, wait_s: float = 60) -> Any:
    job, _ = await container.service.submit(body or BODY, tenant="t")
    return await container.service.wait_finished(job.id, wait_s)


async def test_whole_pipeline_completes_and_trace_tokens_equal_the_servers(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """Every step runs through the SDK; the trace's token totals are what the server reported."""
    provider, fake = provider_fake
    container = await started(_env(provider, fake))
    job = await _run(container)
    assert job.status == "completed", job.error
    assert len(await container.store.list_artifacts(job.id)) == 15
    trace = await container.service.trace(job.id, "t")
    assert trace["totals"]["prompt_tokens"] == fake.usage_totals["prompt_tokens"] > 0
    assert trace["totals"]["completion_tokens"] == fake.usage_totals["completion_tokens"] > 0
    assert {c["provider"] for c in trace["calls"]} == {provider}
    assert all(r.schema is not None for r in fake.requests), "structured output not enforced"
    assert fake.usage_totals["calls"] == len(LLM_STEPS)


async def test_thirty_percent_429_and_500_still_complete_every_job(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """With 30% of calls answered 429 (Retry-After) or 500, every job still completes."""
    provider, fake = provider_fake
    fake.set_behaviour(failure_rate=0.3, failures=("429:retry_after=0.05", "500"), seed=11)
    container = await started(_env(provider, fake))
    jobs = [await _run(container, BODY | {"project_title": f"Acme {n}"}) for n in range(3)]
    assert [j.status for j in jobs] == ["completed"] * 3, [j.error for j in jobs]
    failed_calls = fake.count(status=429) + fake.count(status=500)
    assert failed_calls > 0
    retried = [
        c for j in jobs for c in (await container.service.trace(j.id, "t"))["calls"] if c["attempt"] > 1
    ]
    assert len(retried) == failed_calls


async def test_wrong_key_fails_the_job_at_once_with_llm_auth(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """A 401 is not retried: the job fails with llm_auth after one request per started step."""
    provider, fake = provider_fake
    fake.set_behaviour(api_key="the-right-key")
    container = await started(_env(provider, fake))
    job = await _run(container, BODY | {"parallel_limit": 1})
    assert job.status == "failed"
    assert job.error["code"] == "llm_auth"
    assert provider in job.error["message"]
    assert fake.count(status=401) == len(fake.requests) == 1


async def test_malformed_then_valid_answer_succeeds_after_one_repair(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """A non-JSON answer triggers exactly one repair request quoting the error, then the job completes."""
    provider, fake = provider_fake
    fake.plan(["malformed"])
    container = await started(_env(provider, fake))
    job = await _run(container, BODY | {"parallel_limit": 1})
    assert job.status == "completed", job.error
    repairs = [c for c in (await container.service.trace(job.id, "t"))["calls"] if c["kind"] == "repair"]
    assert len(repairs) == 1 and repairs[0]["outcome"] == "ok"
    repair_request = fake.requests[1]
    assert len(repair_request.messages) > len(fake.requests[0].messages)


async def test_invalid_twice_fails_the_step_with_llm_invalid_output(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """Invalid output, then invalid again after the repair, fails the job with llm_invalid_output."""
    provider, fake = provider_fake
    fake.plan(["invalid", "invalid"])
    container = await started(_env(provider, fake))
    job = await _run(container, BODY | {"parallel_limit": 1})
    assert job.status == "failed"
    assert job.error["code"] == "llm_invalid_output"
    assert job.error["step"] == "evidence"


async def test_slow_server_is_cut_by_the_job_deadline(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """A server slower than timeout_ms: the job fails with timeout and no call is left open."""
    provider, fake = provider_fake
    fake.set_behaviour(delay_s=30)
    container = await started(_env(provider, fake))
    job = await _run(container, BODY | {"timeout_ms": 1500}, wait_s=20)
    assert job.status == "failed"
    assert job.error["code"] == "timeout"
    assert await fake.async_wait_until(
        lambda f: all(r.client_disconnected for r in f.requests), within_s=10
    )


async def test_step_model_routing_reaches_the_provider(started: Any) -> None:
    """LLM_MODEL_<STEP> sends that step to its own model; the rest use LLM_DEFAULT_MODEL."""
    with fake_openai_server() as fake:
        container = await started(
            _env("openai", fake, LLM_DEFAULT_MODEL="small-model", LLM_MODEL_INVESTOR_SCORE="big-model")
        )
        job = await _run(container)
        assert job.status == "completed", job.error
        by_model = {r.model for r in fake.requests if (r.schema_name or "").startswith("investor_score")}
        others = {r.model for r in fake.requests if not (r.schema_name or "").startswith("investor_score")}
        assert (by_model, others) == ({"big-model"}, {"small-model"})


async def test_stream_cut_mid_answer_is_retried_and_the_job_completes(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """A stream the server closes mid-answer is retried as a new attempt; the job completes, tokens exact."""
    provider, fake = provider_fake
    fake.plan(["ok:cut=2", "ok:cut=3,clean=1"])
    container = await started(_env(provider, fake))
    job = await _run(container, BODY | {"parallel_limit": 1})
    assert job.status == "completed", job.error
    assert all(r.streamed for r in fake.requests)
    assert fake.count(cut=True) == 2
    calls = (await container.service.trace(job.id, "t"))["calls"]
    evidence = [(c["attempt"], c["outcome"]) for c in calls if c["step"] == "evidence"]
    assert evidence == [(1, "llm_unavailable"), (2, "llm_unavailable"), (3, "ok")]
    artifact = await container.store.get_artifact(job.id, "sources")
    assert artifact is not None
    answered = json.loads("".join(fake.requests[2].pieces))
    assert artifact.data == answered, "the artifact is the whole answer, not a partial one"
    trace = await container.service.trace(job.id, "t")
    assert trace["totals"]["prompt_tokens"] == fake.usage_totals["prompt_tokens"] > 0
    assert trace["totals"]["completion_tokens"] == fake.usage_totals["completion_tokens"] > 0


async def test_a_streaming_provider_s_text_arrives_as_deltas_and_a_retry_starts_over(
    provider_fake: tuple[str, FakeLLMServer], started: Any
) -> None:
    """Through the SDK, a slow answer's text shows up as delta events with contiguous
    offsets that spell the answer; after a cut stream, attempt 2 starts again at 0."""
    provider, fake = provider_fake
    fake.plan(["ok:chunks=10,chunk_delay=0.06,cut=6", "ok:chunks=10,chunk_delay=0.06"])
    container = await started(_env(provider, fake))
    job = await _run(container, BODY | {"parallel_limit": 1})
    assert job.status == "completed", job.error
    deltas = [e.data for e in await container.store.read_events(job.id) if e.type == "delta"]
    retried = {d["step"] for d in deltas if d["attempt"] == 2}
    assert len(retried) == 1, deltas
    (step,) = retried
    by_attempt = {n: [d for d in deltas if d["step"] == step and d["attempt"] == n] for n in (1, 2)}
    for attempt in by_attempt.values():
        assert attempt and attempt[0]["offset"] == 0
        for before, after in itertools.pairwise(attempt):
            assert after["offset"] == before["offset"] + len(before["text"])
    answered = "".join(fake.requests[1].pieces)
    assert answered.startswith("".join(d["text"] for d in by_attempt[2]))
