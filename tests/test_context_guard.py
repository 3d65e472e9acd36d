"""The context guard (SPEC 7.3): windows, LLM_CONTEXT_<MODEL>, the estimate, trimming, overflow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from handlers.bootstrap import pipeline_config
from handlers.settings import Settings, SettingsError
from pipeline.context_guard import (
    DEFAULT_CONTEXT_WINDOW,
    context_env_key,
    drop_order,
    estimate_text,
    estimate_tokens,
    fit,
    topic_words,
)
from pipeline.deps import Deps, PipelineConfig
from pipeline.llm_call import StepCall, call_llm_step
from pipeline.model import LLMError, LLMReply, LLMRequest
from pipeline.offline import OfflineProvider
from pipeline.ports import TextSink
from pipeline.request import validate_request
from pipeline.schemas import parse_output
from pipeline.steps import build_pitch
from tests.support.fake_llm import FakeLLMServer, fake_openai_server
from tests.support.service import ROOT, base_env

PITCH = build_pitch(
    validate_request(
        {
            "project_title": "Laundry Robots",
            "elevator_pitch": "Robots that fold laundry for hotels. 12 pilots in Vienna.",
            "language": "en",
        }
    )
)
BRIEF = {
    "project_title": "Laundry Robots",
    "brief": "Robots fold hotel laundry.",
    "facts": [],
    "open_questions": [],
    "assumptions": [],
}
BODY = {
    "project_title": "Acme Robotics",
    "elevator_pitch": "Robots that fold laundry for hotels, 40% cheaper than staff, 12 pilots.",
    "language": "en",
    "parallel_limit": 4,
}


def source(title: str, reliability: float, finding: str, filler: int = 0) -> dict[str, Any]:
    return {
        "title": title,
        "publisher": "p",
        "year": 2024,
        "region": "EU",
        "url": "https://example.com/" + title.replace(" ", "-"),
        "method": "survey",
        "key_findings": [finding, "x" * filler],
        "usage_note": "",
        "access": "open",
        "reliability_score": reliability,
        "last_accessed": "2026-01-01",
    }


def evidence(*sources: dict[str, Any]) -> dict[str, Any]:
    return {"region": "EU", "topics": ["laundry robots"], "sources": list(sources)}


# -- windows and LLM_CONTEXT_<MODEL> -------------------------------------------------------------


def test_known_windows_prefixes_default_and_override() -> None:
    """Shipped windows match by longest prefix, unknown models get the default, LLM_CONTEXT_ wins."""
    config = PipelineConfig(context_windows={"GPT_4O_MINI": 5000, "QWEN3_8B": 4096})
    assert context_env_key("gpt-4o-mini") == "GPT_4O_MINI"
    assert context_env_key("qwen3:8b") == "QWEN3_8B"
    assert config.context_window("gpt-4o-mini") == 5000
    assert config.context_window("qwen3:8b") == 4096
    assert config.context_window("gpt-4o-2024-08-06") == 128_000
    assert config.context_window("gpt-4.1-mini") == 1_047_576
    assert config.context_window("claude-3-5-sonnet-latest") == 200_000
    assert config.context_window("claude-sonnet-4-20250514") == 200_000
    assert config.context_window("llama3:8b") == 8192
    assert config.context_window("llama3.1:70b") == 131_072
    assert config.context_window("qwen3:14b") == 40_960
    assert config.context_window("someone/unknown-model") == DEFAULT_CONTEXT_WINDOW == 8192


def test_llm_context_variable_reaches_the_pipeline_config() -> None:
    """LLM_CONTEXT_GPT_4O_MINI=6000 is what the pipeline uses for gpt-4o-mini; other models keep theirs."""
    settings = Settings.from_env({"LLM_CONTEXT_GPT_4O_MINI": " 6000 ", "LLM_CONTEXT_LLAMA3_8B": "2048"})
    config = pipeline_config(settings)
    assert config.context_window("gpt-4o-mini") == 6000
    assert config.context_window("llama3:8b") == 2048
    assert config.context_window("gpt-4o") == 128_000


@pytest.mark.parametrize("value", ["lots", "4.5", "-1", "100", "1000000000"])
def test_bad_llm_context_value_is_one_line_naming_the_variable(value: str) -> None:
    """A value that is no integer or out of range raises one line naming LLM_CONTEXT_<MODEL>."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"LLM_CONTEXT_QWEN3_8B": value})
    message = str(caught.value)
    assert message.startswith(f"LLM_CONTEXT_QWEN3_8B={value}") or message.startswith(
        f"LLM_CONTEXT_QWEN3_8B='{value}'"
    )
    assert "\n" not in message


def test_serve_with_a_bad_llm_context_exits_with_one_line() -> None:
    """`jobq serve` with LLM_CONTEXT_GPT_4O=big exits non-zero printing one line naming it."""
    result = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "serve"],
        cwd=ROOT,
        env={**base_env(), "LLM_CONTEXT_GPT_4O": "big"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "LLM_CONTEXT_GPT_4O" in lines[0], result.stderr


# -- the estimate and the order of trimming ------------------------------------------------------


def test_estimate_is_conservative_for_ascii_and_other_text() -> None:
    """ASCII counts 3.5 characters a token, other text 2.5 UTF-8 bytes; messages add overhead."""
    assert estimate_text("a" * 350) == 100
    assert estimate_text("a" * 351) == 101
    assert estimate_text("ü" * 100) == 80  # 200 bytes
    assert estimate_text("日本" * 50) == 120  # 300 bytes
    bare = estimate_tokens("s" * 35, "p" * 35)
    assert bare > 20
    assert estimate_tokens("s" * 35, "p" * 35, (("user", "q" * 350),)) > bare + 100


def test_drop_order_is_least_reliable_then_fewest_topic_words() -> None:
    """Lower reliability goes first; among equals the source sharing fewest topic words goes first."""
    sources = [
        source("Hotel laundry robots study", 0.8, "robots fold laundry in hotels"),
        source("Unrelated shipping report", 0.8, "container freight rates"),
        source("Weak blog", 0.2, "laundry robots hotels"),
        source("Laundry market", 0.8, "laundry spending"),
    ]
    topic = topic_words({"pitch": PITCH, "sources": evidence(*sources)})
    assert {"laundry", "robots", "hotels"} <= topic
    assert drop_order(sources, topic) == [2, 1, 3, 0]


def test_a_prompt_that_fits_is_not_rendered_again() -> None:
    """Within the budget the guard only measures: the render callback is never called."""

    def render(inputs: dict[str, Any], changed: bool) -> tuple[str, str]:
        raise AssertionError("re-rendered a prompt that fits")

    fitted = fit("system", "prompt " * 100, {"sources": evidence(source("a", 0.5, "b"))}, 1000, render)
    assert fitted.dropped == 0 and fitted.tokens == estimate_tokens("system", "prompt " * 100)


# -- one call -----------------------------------------------------------------------------------


class Recording:
    """The offline provider, keeping every request it was sent."""

    name = "recording"

    def __init__(self) -> None:
        self.requests: list[LLMRequest] = []
        self.offline = OfflineProvider()

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        self.requests.append(request)
        return await self.offline.complete(request, on_text)


def market_call(sources: dict[str, Any], trace: list[dict[str, Any]]) -> StepCall:
    return StepCall(
        str(uuid.uuid4()),
        "market",
        "en",
        {"brief": BRIEF, "sources": sources},
        time.time() + 30,
        trace=trace.append,
    )


SOURCES = evidence(
    source("Hotel laundry robots study", 0.9, "robots fold hotel laundry", filler=1500),
    source("Unrelated shipping report", 0.9, "container freight rates", filler=1500),
    source("Weak blog about laundry robots", 0.1, "laundry robots hotels", filler=1500),
    source("Laundry market overview", 0.9, "laundry robots hotel spending", filler=1500),
)


async def test_sources_are_trimmed_least_relevant_first_and_the_answer_still_validates(
    store: SqliteStore,
) -> None:
    """A small window drops the weak and the off-topic source; the trace says so; the answer validates."""
    llm = Recording()
    trace: list[dict[str, Any]] = []
    deps = Deps(store, llm, PipelineConfig(default_model="tiny"))
    full = await call_llm_step(deps, market_call(SOURCES, trace))
    untrimmed = trace[-1]
    assert untrimmed["truncate_applied"] is False and untrimmed["ctx_max"] == DEFAULT_CONTEXT_WINDOW
    assert "Weak blog" in llm.requests[-1].prompt
    assert len(full["citations"]) == 2

    # a window where two of the four 1.5k-character sources have to go
    window = 2 * (untrimmed["prompt_tokens_est"] - 800)
    config = PipelineConfig(default_model="tiny", context_windows={"TINY": window})
    data = await call_llm_step(Deps(store, llm, config), market_call(SOURCES, trace))
    record = trace[-1]
    assert record["truncate_applied"] is True and record["sources_dropped"] == 2
    assert record["ctx_max"] == window
    assert record["prompt_tokens_est"] <= window // 2 < untrimmed["prompt_tokens_est"]
    request = llm.requests[-1]
    assert request.max_tokens == window // 2
    assert "Weak blog" not in request.prompt and "Unrelated shipping" not in request.prompt
    assert "Hotel laundry robots study" in request.prompt and "Laundry market overview" in request.prompt
    parse_output("market", json.dumps(data))
    assert sorted(data["citations"]) == ["Hotel laundry robots study", "Laundry market overview"]
    assert request.context["sources"]["sources"] == [SOURCES["sources"][0], SOURCES["sources"][3]]


async def test_a_bare_prompt_too_big_fails_with_llm_context_overflow_and_no_request(
    store: SqliteStore,
) -> None:
    """Even without sources the prompt does not fit: llm_context_overflow, the provider never asked."""
    llm = Recording()
    trace: list[dict[str, Any]] = []
    config = PipelineConfig(default_model="tiny", context_windows={"TINY": 600})
    with pytest.raises(LLMError) as caught:
        await call_llm_step(Deps(store, llm, config), market_call(SOURCES, trace))
    assert caught.value.code == "llm_context_overflow"
    assert "LLM_CONTEXT_TINY" in caught.value.message and "market" in caught.value.message
    assert llm.requests == [] and trace == []


class Malformed(Recording):
    """Answers the first request with text that is no JSON, then like the offline provider."""

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        if not self.requests:
            self.requests.append(request)
            return LLMReply(text="Sure! " + "the market is big " * 40, model=request.model)
        return await super().complete(request, on_text)


async def test_a_repair_that_would_not_fit_fails_with_llm_context_overflow(store: SqliteStore) -> None:
    """The first prompt fits, the repair quoting the bad answer does not: overflow, no second request."""
    trace: list[dict[str, Any]] = []
    roomy = Deps(store, Recording(), PipelineConfig(default_model="tiny"))
    await call_llm_step(roomy, market_call(SOURCES, trace))
    window = 2 * (trace[-1]["prompt_tokens_est"] + 20)
    llm = Malformed()
    config = PipelineConfig(default_model="tiny", context_windows={"TINY": window})
    with pytest.raises(LLMError) as caught:
        await call_llm_step(Deps(store, llm, config), market_call(SOURCES, trace))
    assert caught.value.code == "llm_context_overflow" and "repair" in caught.value.message
    assert len(llm.requests) == 1 and trace[-1]["truncate_applied"] is False


# -- whole jobs ---------------------------------------------------------------------------------


async def test_offline_job_with_a_small_market_window_trims_and_completes(started: Any) -> None:
    """A small window for market's model: its evidence is trimmed, the job completes, all calls traced."""
    container = await started({"LLM_MODEL_MARKET": "tiny-ctx", "LLM_CONTEXT_TINY_CTX": "2000"})
    job, _ = await container.service.submit(BODY, tenant="t")
    job = await container.service.wait_finished(job.id, 30)
    assert job is not None and job.status == "completed", job and job.error
    calls = (await container.service.trace(job.id, "t"))["calls"]
    assert all(isinstance(c["ctx_max"], int) and c["prompt_tokens_est"] > 0 for c in calls)
    market = [c for c in calls if c["step"] == "market"]
    assert [(c["truncate_applied"], c["ctx_max"]) for c in market] == [(True, 2000)]
    assert market[0]["sources_dropped"] > 0 and market[0]["prompt_tokens_est"] <= 1000
    assert not any(c["truncate_applied"] for c in calls if c["step"] != "market")
    section = await container.service.artifact(job.id, "t", "section_market")
    sources = await container.service.artifact(job.id, "t", "sources")
    assert section is not None and sources is not None
    parse_output("market", json.dumps(section["data"]))
    titles = {s["title"] for s in sources["data"]["sources"]}
    assert set(section["data"]["citations"]) < titles


@pytest.fixture
def openai_fake() -> Iterator[FakeLLMServer]:
    with fake_openai_server() as fake:
        yield fake


async def test_overflow_fails_the_job_before_any_request_reaches_the_provider(
    openai_fake: FakeLLMServer, started: Any
) -> None:
    """Through the real OpenAI SDK: a 300-token window fails the job (llm_context_overflow), no requests."""
    env = {
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": openai_fake.openai_base_url,
        "LLM_DEFAULT_MODEL": "local-small",
        "LLM_CONTEXT_LOCAL_SMALL": "300",
    }
    container = await started(env)
    job, _ = await container.service.submit(BODY, tenant="t")
    job = await container.service.wait_finished(job.id, 30)
    assert job is not None and job.status == "failed"
    assert job.error["code"] == "llm_context_overflow", job.error
    assert "LLM_CONTEXT_LOCAL_SMALL" in job.error["message"]
    assert openai_fake.requests == []
    # control: the same setup with a window that fits does reach the server
    roomy = await started({**env, "LLM_CONTEXT_LOCAL_SMALL": "32000"})
    job, _ = await roomy.service.submit(BODY, tenant="t")
    job = await roomy.service.wait_finished(job.id, 30)
    assert job is not None and job.status == "completed", job and job.error
    assert len(openai_fake.requests) == 12
