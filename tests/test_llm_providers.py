"""The OpenAI and Anthropic providers through their real SDKs against local HTTP
servers speaking the wire formats (tests/support/fake_llm.py), streamed answers
(theirs and the offline provider's), the error mapping and the fake's
schema-valid answers."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, Field

from adapters.llm_anthropic import AnthropicProvider
from adapters.llm_errors import parse_retry_after
from adapters.llm_openai import OpenAIProvider
from pipeline.graph import LLM_STEPS
from pipeline.model import LLMError, LLMReply, LLMRequest
from pipeline.offline import OfflineProvider
from pipeline.schemas import InvalidOutput, json_schema, parse_output
from tests.support.fake_llm import (
    FakeLLMServer,
    broken_example,
    fake_anthropic_server,
    fake_openai_server,
    presented_key,
    schema_example,
)

API_KEY = "sk-test-key"

SECTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "headline": {"type": "string", "minLength": 3, "maxLength": 120},
        "bullets": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "evidence_coverage": {"type": "number", "minimum": 0, "maximum": 1},
        "verdict": {"enum": ["GREEN", "YELLOW", "RED"]},
    },
    "required": ["headline", "bullets", "evidence_coverage", "verdict"],
    "additionalProperties": False,
}


def make_request(**changes: Any) -> LLMRequest:
    fields: dict[str, Any] = {
        "step": "market",
        "model": "test-model",
        "system": "You are an analyst.",
        "prompt": "Size the market.",
        "schema": SECTION_SCHEMA,
        "schema_name": "section market",
        "language": "en",
        # Generous: an answer comes at once unless a test asks for a slow one, and a
        # stall of the shared test machine must not read as a provider timeout.
        "timeout_s": 30.0,
    }
    fields.update(changes)
    return LLMRequest(**fields)


@pytest.fixture(params=["openai", "anthropic"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fake(api: str) -> Iterator[FakeLLMServer]:
    factory = fake_openai_server if api == "openai" else fake_anthropic_server
    with factory(api_key=API_KEY) as server:
        yield server


@pytest.fixture
async def provider(
    api: str, fake: FakeLLMServer
) -> AsyncIterator[OpenAIProvider | AnthropicProvider]:
    made = (
        OpenAIProvider(API_KEY, fake.base_url)
        if api == "openai"
        else AnthropicProvider(API_KEY, fake.base_url)
    )
    yield made
    await made.aclose()


async def expect_error(provider: OpenAIProvider | AnthropicProvider, **changes: Any) -> LLMError:
    with pytest.raises(LLMError) as caught:
        await provider.complete(make_request(**changes))
    return caught.value


# -- both providers ------------------------------------------------------------------


async def test_schema_request_answered_with_valid_json(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """A structured request returns JSON text that validates against the step's schema."""
    reply = await provider.complete(make_request())
    jsonschema.validate(json.loads(reply.text), SECTION_SCHEMA)
    assert reply.model == "test-model"
    record = fake.requests[0]
    assert [r.status for r in fake.requests] == [200]
    assert (record.schema, record.schema_name) == (SECTION_SCHEMA, "section_market")
    assert record.messages == [("system", "You are an analyst."), ("user", "Size the market.")]


async def test_usage_tokens_are_the_servers(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """Prompt/completion tokens in the reply are exactly what the server reported."""
    fake.set_behaviour(usage=(123, 45))
    fake.plan(["ok", "ok:prompt_tokens=7,completion_tokens=3"])
    replies = [await provider.complete(make_request()) for _ in range(3)]
    usage = [(r.prompt_tokens, r.completion_tokens) for r in replies]
    assert usage == [(123, 45), (7, 3), (123, 45)]
    assert fake.usage_totals == {
        "prompt_tokens": 253,
        "completion_tokens": 93,
        "total_tokens": 346,
        "calls": 3,
    }


@pytest.mark.parametrize(
    ("directive", "expected"),
    [("429:retry_after=7", 7.0), ("429:retry_after_ms=250", 0.25), ("429", None)],
)
async def test_rate_limited_is_transient_with_retry_after(
    provider: OpenAIProvider | AnthropicProvider,
    fake: FakeLLMServer,
    directive: str,
    expected: float | None,
) -> None:
    """429 maps to llm_rate_limited, transient, with Retry-After (s or ms) as retry_after."""
    fake.plan([directive])
    error = await expect_error(provider)
    assert (error.code, error.transient, error.retry_after, error.status) == (
        "llm_rate_limited",
        True,
        expected,
        429,
    )
    assert f"{provider.name}: rate limited on step 'market' (429)" in error.message


async def test_retry_after_as_http_date(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """A Retry-After HTTP date becomes the seconds until that date."""
    fake.plan(["429:retry_after_date=120"])
    error = await expect_error(provider)
    assert error.retry_after is not None
    assert 100 <= error.retry_after <= 120


@pytest.mark.parametrize("status", [500, 502, 503, 529])
async def test_server_errors_are_unavailable_and_transient(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer, status: int
) -> None:
    """5xx and 529 (overloaded) map to llm_unavailable, transient."""
    fake.plan([f"{status}:retry_after=2"])
    error = await expect_error(provider)
    assert (error.code, error.transient, error.status, error.retry_after) == (
        "llm_unavailable",
        True,
        status,
        2.0,
    )


async def test_wrong_key_is_auth_error_not_transient(api: str, fake: FakeLLMServer) -> None:
    """A key the server rejects (401) maps to llm_auth, not transient."""
    provider = (
        OpenAIProvider("sk-wrong", fake.base_url)
        if api == "openai"
        else AnthropicProvider("sk-wrong", fake.base_url)
    )
    error = await expect_error(provider)
    await provider.aclose()
    assert (error.code, error.transient, error.status) == ("llm_auth", False, 401)
    assert fake.requests[0].directive == "401"


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("403", "llm_auth"),
        ("400", "llm_bad_request"),
        ("404", "llm_bad_request"),
        ("422", "llm_bad_request"),
    ],
)
async def test_client_errors_are_not_transient(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer, directive: str, code: str
) -> None:
    """403 is an auth error, 400/404/422 bad requests; none is retried."""
    fake.plan([directive])
    error = await expect_error(provider)
    assert (error.code, error.transient) == (code, False)


async def test_connection_reset_is_unavailable(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """A connection reset without an answer maps to llm_unavailable, transient."""
    fake.plan(["reset"])
    error = await expect_error(provider)
    assert (error.code, error.transient) == ("llm_unavailable", True)


async def test_connection_refused_is_unavailable(api: str) -> None:
    """Nobody listening maps to llm_unavailable, transient."""
    with fake_openai_server() as gone:
        url = gone.base_url if api == "openai" else gone.anthropic_base_url
    provider = OpenAIProvider(API_KEY, url) if api == "openai" else AnthropicProvider(API_KEY, url)
    error = await expect_error(provider)
    await provider.aclose()
    assert (error.code, error.transient) == ("llm_unavailable", True)


async def test_unparsable_body_is_invalid_output(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """An HTTP body that is not JSON maps to llm_invalid_output."""
    fake.plan(["badbody"])
    error = await expect_error(provider)
    assert (error.code, error.transient) == ("llm_invalid_output", False)


async def test_slow_server_times_out_and_connection_closes(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """A server slower than timeout_s gives code timeout (transient) and sees the client leave."""
    fake.plan(["ok:delay=60"])
    error = await expect_error(provider, timeout_s=0.3)
    assert (error.code, error.transient) == ("timeout", True)
    assert await fake.async_wait_until(lambda f: f.requests[0].client_disconnected, within_s=10)
    assert fake.requests[0].delivered is False
    assert fake.usage_totals["calls"] == 0


async def test_cancel_aborts_the_http_request(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """Cancelling the awaiting task closes the connection before the server answers."""
    fake.plan(["ok:delay=60"])
    task = asyncio.create_task(provider.complete(make_request(timeout_s=120)))
    assert await fake.async_wait_until(lambda f: len(f.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.async_wait_until(lambda f: f.requests[0].client_disconnected, within_s=10)
    assert fake.requests[0].status is None


async def test_malformed_answer_text_is_returned_for_repair(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """Non-JSON answer text comes back as text (the pipeline validates and repairs)."""
    fake.plan(["malformed"])
    reply = await provider.complete(make_request())
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)
    assert reply.completion_tokens > 0


async def test_concurrent_calls_under_failures_account_tokens_exactly(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """Under 30% 429/500/resets and concurrency, reply tokens sum to the server's totals."""
    fake.set_behaviour(
        failure_rate=0.3, seed=11, failures=("429:retry_after=0", "500", "reset"), delay_s=0.05
    )
    codes: list[str] = []

    async def call_until_answered() -> LLMReply:
        while True:
            try:
                return await provider.complete(make_request())
            except LLMError as error:
                assert error.transient, error.message
                codes.append(error.code)

    replies = await asyncio.gather(*(call_until_answered() for _ in range(24)))
    totals = fake.usage_totals
    assert totals["calls"] == 24
    assert totals["prompt_tokens"] == sum(r.prompt_tokens for r in replies) > 0
    assert totals["completion_tokens"] == sum(r.completion_tokens for r in replies) > 0
    assert {"llm_rate_limited", "llm_unavailable"} <= set(codes)
    assert fake.max_in_flight > 1


# -- streaming ----------------------------------------------------------------------


class Pieces:
    """An ``on_text`` sink that keeps each piece with the time it arrived."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.pieces: list[str] = []
        self.times: list[float] = []

    def __call__(self, text: str) -> None:
        self.pieces.append(text)
        self.times.append(time.perf_counter() - self.started)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def test_stream_pieces_arrive_in_order_as_written_and_make_the_text(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """Each piece of the answer reaches on_text as the server writes it, in order; joined: the answer."""
    fake.plan(["ok:chunks=6,chunk_delay=0.1"])
    sink = Pieces()
    reply = await provider.complete(make_request(), sink)
    done = time.perf_counter() - sink.started
    record = fake.requests[0]
    assert record.streamed and record.delivered
    assert sink.pieces == record.pieces and len(sink.pieces) == 6
    assert sink.text == reply.text
    jsonschema.validate(json.loads(reply.text), SECTION_SCHEMA)
    assert done - sink.times[0] >= 0.4, "the first piece came only with the end of the answer"


async def test_stream_token_counts_are_the_final_usage_exactly(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """A streamed answer's token counts are exactly the stream's final usage, not a count of pieces."""
    fake.plan(["ok:chunks=9,prompt_tokens=1234,completion_tokens=567"])
    sink = Pieces()
    reply = await provider.complete(make_request(), sink)
    assert (reply.prompt_tokens, reply.completion_tokens) == (1234, 567)
    assert len(sink.pieces) == 9
    body = fake.requests[0].body
    assert body["stream"] is True
    if provider.name == "openai":
        assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "directive",
    ["ok:cut=3", "ok:cut=3,reset=1", "ok:cut=3,clean=1", "ok:nousage=1", "ok:cut=0"],
    ids=["closed-mid-body", "reset", "body-ended-early", "no-usage", "cut-before-any-text"],
)
async def test_stream_cut_mid_answer_is_transient_unavailable(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer, directive: str
) -> None:
    """A stream that stops before its final chunk is a retryable llm_unavailable, never an answer."""
    fake.plan([directive])
    sink = Pieces()
    with pytest.raises(LLMError) as caught:
        await provider.complete(make_request(), sink)
    error = caught.value
    assert (error.code, error.transient) == ("llm_unavailable", True), error.message
    assert sink.pieces == fake.requests[0].pieces, "pieces before the cut still reach on_text"
    assert fake.usage_totals["calls"] == 0
    reply = await provider.complete(make_request())
    jsonschema.validate(json.loads(reply.text), SECTION_SCHEMA)


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [(529, "llm_unavailable", True), (500, "llm_unavailable", True), (429, "llm_rate_limited", True),
     (400, "llm_bad_request", False)],
)
async def test_stream_error_event_mid_answer_maps_like_its_status(
    provider: OpenAIProvider | AnthropicProvider,
    fake: FakeLLMServer,
    status: int,
    code: str,
    transient: bool,
) -> None:
    """An error event inside a begun stream (e.g. overloaded) is classified like its HTTP status."""
    fake.plan([f"ok:cut=2,error={status}"])
    error = await expect_error(provider)
    assert (error.code, error.transient) == (code, transient), error.message
    assert "mid-stream" in error.message


async def test_slow_stream_is_cut_by_the_call_timeout(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """A model trickling pieces past timeout_s times out, though every single gap is short."""
    fake.plan(["ok:chunks=30,chunk_delay=0.1"])
    sink = Pieces()
    started = time.perf_counter()
    with pytest.raises(LLMError) as caught:
        await provider.complete(make_request(timeout_s=0.8), sink)
    assert (caught.value.code, caught.value.transient) == ("timeout", True)
    assert time.perf_counter() - started < 2.5
    assert 0 < len(sink.pieces) < 30
    assert await fake.async_wait_until(lambda f: f.requests[0].client_disconnected, within_s=10)


async def test_cancel_mid_stream_closes_the_connection(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """Cancelling the call while the answer streams closes the connection: the server stops writing."""
    fake.plan(["ok:chunks=200,chunk_delay=0.05"])
    sink = Pieces()
    task = asyncio.create_task(provider.complete(make_request(timeout_s=120), sink))
    assert await fake.async_wait_until(lambda f: len(f.requests[0].pieces) >= 2 if f.requests else False)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.async_wait_until(lambda f: f.requests[0].client_disconnected, within_s=10)
    record = fake.requests[0]
    assert record.delivered is False and len(record.pieces) < 200


async def test_stream_truncated_by_the_output_budget_logs_a_warning(
    provider: OpenAIProvider | AnthropicProvider, fake: FakeLLMServer
) -> None:
    """An answer stopped by the output budget is still returned, and logged as truncated."""
    from structlog.testing import capture_logs

    fake.plan(["ok:truncated=1"])
    with capture_logs() as logs:
        reply = await provider.complete(make_request())
    assert reply.completion_tokens > 0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["llm_output_truncated"]


PITCH = {"pitch": {"title": "Acme", "pitch": "Robots fold laundry."}}

# -- offline provider ---------------------------------------------------------------


async def test_offline_stream_is_spread_over_its_latency() -> None:
    """Offline answers stream in pieces across the simulated latency, the first well before the end."""
    provider = OfflineProvider(latency_ms=600)
    request = make_request(step="brief", context=PITCH)
    sink = Pieces()
    reply = await provider.complete(request, sink)
    done = time.perf_counter() - sink.started
    assert len(sink.pieces) >= 6
    assert sink.text == reply.text
    assert json.loads(reply.text)["project_title"] == "Acme"
    assert sink.times[0] < 0.25 * done
    assert 0.55 <= done < 1.5, "the pieces are spread over the latency, not added to it"
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert max(gaps) < 0.45


async def test_offline_at_zero_latency_sends_one_piece_at_once() -> None:
    """At zero latency the offline answer arrives whole in one piece, the same as without on_text."""
    provider = OfflineProvider()
    request = make_request(step="brief", context=PITCH)
    sink = Pieces()
    reply = await provider.complete(request, sink)
    assert sink.pieces == [reply.text]
    assert (await provider.complete(request)) == reply


# -- OpenAI specifics ------------------------------------------------------------------


async def test_openai_request_shape() -> None:
    """OpenAI gets system + history + user, json_schema (strict False), max_tokens, no retries."""
    with fake_openai_server(plan=["ok", "500"]) as fake:
        provider = OpenAIProvider(API_KEY, fake.base_url)
        request = make_request(history=(("user", "first"), ("assistant", "{bad")), max_tokens=321)
        await provider.complete(request)
        with pytest.raises(LLMError):
            await provider.complete(request)
        await provider.aclose()
    body = fake.requests[0].body
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "You are an analyst."),
        ("user", "first"),
        ("assistant", "{bad"),
        ("user", "Size the market."),
    ]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "section_market", "schema": SECTION_SCHEMA, "strict": False},
    }
    assert body["max_tokens"] == 321 and "max_completion_tokens" not in body
    assert fake.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert len(fake.requests) == 2, "the SDK must not retry the 500 by itself"


async def test_openai_json_object_mode_for_compatible_servers() -> None:
    """json_object mode sends response_format json_object and the schema in the system message."""
    with fake_openai_server() as fake:
        provider = OpenAIProvider(None, fake.base_url, json_mode="json_object")
        reply = await provider.complete(make_request())
        await provider.aclose()
    body = fake.requests[0].body
    assert body["response_format"] == {"type": "json_object"}
    assert json.dumps(SECTION_SCHEMA) in body["messages"][0]["content"]
    jsonschema.validate(json.loads(reply.text), SECTION_SCHEMA)
    assert fake.requests[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("json_mode", ["json_schema", "json_object"])
async def test_openai_both_json_modes_stream(json_mode: str) -> None:
    """Both json modes stream with include_usage: pieces in order, exact usage, a cut stream retryable."""
    with fake_openai_server(usage=(321, 54), plan=["ok:chunks=5", "ok:cut=2"]) as fake:
        provider = OpenAIProvider(None, fake.base_url, json_mode=json_mode)
        sink = Pieces()
        reply = await provider.complete(make_request(), sink)
        with pytest.raises(LLMError) as caught:
            await provider.complete(make_request())
        await provider.aclose()
    first = fake.requests[0]
    assert first.body["response_format"]["type"] == json_mode
    assert (first.body["stream"], first.body["stream_options"]) == (True, {"include_usage": True})
    assert sink.pieces == first.pieces and len(sink.pieces) == 5 and sink.text == reply.text
    assert (reply.prompt_tokens, reply.completion_tokens) == (321, 54)
    assert (caught.value.code, caught.value.transient) == ("llm_unavailable", True)


async def test_openai_refusal_in_a_stream_is_invalid_output() -> None:
    """A streamed refusal (no content, only refusal pieces) is llm_invalid_output naming the refusal."""
    from tests.support import fake_llm

    class Refusing(fake_llm._OpenAIStream):
        def piece(self, text: str) -> bytes:
            return self._chunk([self._choice({"refusal": "I will not"})], usage=None)

        def head(self) -> list[bytes]:
            return [self._chunk([self._choice({"role": "assistant", "content": None})], usage=None)]

    with fake_openai_server() as fake, pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_llm, "_OpenAIStream", Refusing)
        provider = OpenAIProvider(None, fake.base_url)
        error = await expect_error(provider)
        await provider.aclose()
    assert error.code == "llm_invalid_output" and "refused: I will not" in error.message


async def test_openai_official_endpoint_uses_max_completion_tokens() -> None:
    """Without a base_url (the official API) the budget goes as max_completion_tokens."""
    from openai import AsyncOpenAI

    with fake_openai_server() as fake:
        client = AsyncOpenAI(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
        provider = OpenAIProvider(API_KEY, client=client)
        await provider.complete(make_request(max_tokens=99))
        await provider.aclose()
    body = fake.requests[0].body
    assert body["max_completion_tokens"] == 99 and "max_tokens" not in body


def test_openai_rejects_unknown_json_mode() -> None:
    """A json_mode other than json_schema/json_object is refused, naming the variable."""
    with pytest.raises(ValueError, match="OPENAI_JSON_MODE"):
        OpenAIProvider(API_KEY, json_mode="grammar")


async def test_openai_stream_event_that_is_no_chunk_is_invalid_output() -> None:
    """A compatible server streaming events that are not chat.completion.chunks gets llm_invalid_output."""
    from tests.support import fake_llm

    class Odd(fake_llm._OpenAIStream):
        def piece(self, text: str) -> bytes:
            return b'data: "just a string"\n\n'

    with fake_openai_server() as fake, pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_llm, "_OpenAIStream", Odd)
        provider = OpenAIProvider(None, fake.base_url)
        error = await expect_error(provider)
        await provider.aclose()
    assert (error.code, error.transient) == ("llm_invalid_output", False)
    assert "not a chat completion chunk" in error.message


# -- Anthropic specifics ------------------------------------------------------------------


async def test_anthropic_forced_tool_call_becomes_json_text() -> None:
    """Anthropic gets one forced tool with the schema; its tool_use input comes back as JSON."""
    with fake_anthropic_server(api_key=API_KEY, usage=(11, 22)) as fake:
        provider = AnthropicProvider(API_KEY, fake.base_url)
        reply = await provider.complete(
            make_request(history=(("user", "first"), ("assistant", "{bad")))
        )
        await provider.aclose()
    body = fake.requests[0].body
    assert body["tools"] == [
        {
            "name": "section_market",
            "description": "Record the market result.",
            "input_schema": SECTION_SCHEMA,
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "section_market"}
    assert body["system"] == "You are an analyst."
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "first"),
        ("assistant", "{bad"),
        ("user", "Size the market."),
    ]
    assert presented_key("anthropic", fake.requests[0].headers) == API_KEY
    assert json.loads(reply.text) == schema_example(SECTION_SCHEMA)
    assert reply == LLMReply(reply.text, "test-model", 11, 22)


async def test_anthropic_history_is_made_alternating() -> None:
    """A history starting with the assistant, or with repeated roles, still alternates from user."""
    with fake_anthropic_server() as fake:
        provider = AnthropicProvider(API_KEY, fake.base_url)
        await provider.complete(make_request(history=(("assistant", "{bad"), ("user", "fix it"))))
        await provider.aclose()
    roles = [(m["role"], m["content"]) for m in fake.requests[0].body["messages"]]
    assert roles == [
        ("user", "(continue)"),
        ("assistant", "{bad"),
        ("user", "fix it\n\nSize the market."),
    ]


# -- error helpers and the fake itself ---------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    """Retry-After is read from ms, seconds or an HTTP date; garbage and the past give None/0."""
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after": date}, now=now) == 30.0
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 5)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "999999"}) == 3600.0


class _Source(BaseModel):
    title: str = Field(min_length=5)
    year: int = Field(ge=1990, le=2030)
    url: str | None = None
    reliability_score: float = Field(ge=0, le=1)
    key_findings: list[str] = Field(min_length=2, max_length=5)


class _Evidence(BaseModel):
    region: str
    sources: list[_Source] = Field(min_length=1)
    data: dict[str, float] = {}


@pytest.mark.parametrize(
    "schema",
    [
        SECTION_SCHEMA,
        _Evidence.model_json_schema(),
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "exclusiveMinimum": 0, "multipleOf": 5},
                "when": {"type": "string", "format": "date"},
                "tags": {
                    "type": "array",
                    "items": {"type": "string"},
                    "uniqueItems": True,
                    "minItems": 3,
                },
            },
            "required": ["n", "when", "tags"],
        },
        {
            "type": "object",
            "properties": {
                "x": {"anyOf": [{"type": "null"}, {"type": "number", "maximum": -3}]},
                "c": {"const": "fixed"},
            },
        },
    ],
)
def test_schema_example_is_valid_and_broken_example_is_not(schema: dict[str, Any]) -> None:
    """The fake's generated answer validates against the schema; the 'invalid' one does not."""
    jsonschema.validate(schema_example(schema), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken_example(schema), schema)


@pytest.mark.parametrize("step", LLM_STEPS)
def test_fake_answers_every_pipeline_step_validly(step: str) -> None:
    """The fake's 'ok' answer passes the pipeline's own validation for every LLM step."""
    schema = json_schema(step)
    assert parse_output(step, json.dumps(schema_example(schema)))
    with pytest.raises(InvalidOutput):
        parse_output(step, json.dumps(broken_example(schema)))


def test_failure_rate_is_seeded_and_plan_comes_first() -> None:
    """The same seed gives the same failure sequence; planned directives are used first."""

    def outcomes(seed: int) -> list[str]:
        server = FakeLLMServer(failure_rate=0.5, seed=seed, plan=["401"])
        try:
            return [server._begin("openai", "/", {}, {})[0].directive for _ in range(40)]
        finally:
            server._httpd.server_close()

    first = outcomes(3)
    assert first == outcomes(3)
    assert first[0] == "401"
    assert {"ok", "429:retry_after=0.05", "500"} <= set(first[1:])
    assert outcomes(4) != first
