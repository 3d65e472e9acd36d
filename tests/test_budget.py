"""Cost caps (SPEC 7.4): max_cost_usd per job and TENANT_MAX_COST_USD_PER_DAY, through the
real OpenAI SDK against the fake LLM server, wired as production is (``bootstrap``)."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from handlers.bootstrap import Container
from handlers.settings import Settings, SettingsError
from pipeline.budget import JobBudget, job_counter, tenant_counter, to_micro, utc_day, worst_case
from pipeline.graph import LLM_STEPS
from pipeline.model import LLMError
from pipeline.request import RequestInvalid, validate_request
from tests.support.fake_llm import BODY, FakeLLMServer, fake_openai_server

MODEL = "gpt-5.4-mini"
"""The openai provider's default model; its window keeps 4096 tokens for the answer."""
PRICE = (1.0, 1.0)
"""USD per 1k prompt / completion tokens: a call costs dollars, so caps are easy to read."""

Start = Callable[..., Awaitable[Container]]


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with fake_openai_server() as server:
        yield server


@pytest.fixture
def start(fake: FakeLLMServer, started: Callable[[dict[str, str]], Awaitable[Container]]) -> Start:
    async def start(**extra: str) -> Container:
        env = {
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": fake.openai_base_url,
            "LLM_PRICES": f"{MODEL}:{PRICE[0]}:{PRICE[1]}",
        }
        return await started(env | extra)

    return start


def server_cost(fake: FakeLLMServer) -> float:
    """USD of every answer the server delivered, at PRICE."""
    usage = fake.usage_totals
    return usage["prompt_tokens"] / 1000 * PRICE[0] + usage["completion_tokens"] / 1000 * PRICE[1]


async def run(container: Container, body: dict[str, Any], tenant: str = "t") -> Any:
    job, _ = await container.service.submit(body, tenant=tenant)
    return await container.service.wait_finished(job.id, 60)


# -- the request field ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 0.0, "1", True, [1], math.inf, math.nan, 1_000_001])
def test_bad_max_cost_usd_is_rejected_naming_the_field(value: Any) -> None:
    """max_cost_usd must be a positive finite number of at most 1,000,000 (USD)."""
    with pytest.raises(RequestInvalid) as caught:
        validate_request({"project_title": "A", "elevator_pitch": "B", "max_cost_usd": value})
    assert [d["field"] for d in caught.value.details] == ["max_cost_usd"]


def test_max_cost_usd_is_stored_only_when_given() -> None:
    """A capped request keeps its cap through to_dict/from_dict; an uncapped one stores no key."""
    capped = validate_request({"project_title": "A", "elevator_pitch": "B", "max_cost_usd": 2})
    assert capped.max_cost_usd == 2.0 and capped.to_dict()["max_cost_usd"] == 2.0
    assert validate_request(capped.to_dict()) == capped
    assert "max_cost_usd" not in validate_request({"project_title": "A", "elevator_pitch": "B"}).to_dict()


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "lots", "inf"])
def test_bad_tenant_cap_is_one_line_naming_the_variable(value: str) -> None:
    """TENANT_MAX_COST_USD_PER_DAY must be a positive number; the error names the variable."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"TENANT_MAX_COST_USD_PER_DAY": value})
    assert str(caught.value).startswith("TENANT_MAX_COST_USD_PER_DAY=")
    assert "\n" not in str(caught.value)


def test_tenant_cap_without_prices_for_the_models_in_use_stops_the_start() -> None:
    """A tenant cap needs a price for the default model and every LLM_MODEL_<STEP> model."""
    base = {"TENANT_MAX_COST_USD_PER_DAY": "5", "OPENAI_API_KEY": "sk"}
    with pytest.raises(SettingsError, match=f"missing: {MODEL}"):
        Settings.from_env(base)
    with pytest.raises(SettingsError, match="missing: gpt-other"):
        Settings.from_env(base | {"LLM_PRICES": f"{MODEL}:1:1", "LLM_MODEL_EVIDENCE": "gpt-other"})
    assert Settings.from_env(base | {"LLM_PRICES": f"{MODEL}:1:1"}).tenant_max_cost_usd_per_day == 5.0
    assert Settings.from_env({"TENANT_MAX_COST_USD_PER_DAY": "5"}).llm_provider == "offline"  # free


# -- the job's cap --------------------------------------------------------------------------------


async def test_without_prices_a_capped_job_is_refused_at_submit(start: Start, fake: FakeLLMServer) -> None:
    """With no LLM_PRICES for the model, max_cost_usd is a 400 naming the field; no job, no call."""
    container = await start(LLM_PRICES="")
    before = await container.store.count_by_status()
    with pytest.raises(RequestInvalid) as caught:
        await container.service.submit(BODY | {"max_cost_usd": 5}, tenant="t")
    (detail,) = caught.value.details
    assert detail["field"] == "max_cost_usd" and MODEL in detail["message"]
    assert await container.store.count_by_status() == before
    assert fake.requests == []


async def test_small_cap_fails_with_budget_exceeded_and_no_call_past_it(
    start: Start, fake: FakeLLMServer
) -> None:
    """A job whose calls cost more than max_cost_usd fails with budget_exceeded; its trace,
    the spend counter and what the server delivered stay within the cap, and every call the
    server got is in the trace."""
    container = await start()
    cap = 8.0
    job = await run(container, BODY | {"max_cost_usd": cap})
    assert job.status == "failed", job.error
    assert job.error["code"] == "budget_exceeded"
    assert "max_cost_usd" in job.error["message"] and job.error["step"] in LLM_STEPS
    trace = await container.service.trace(job.id, "t")
    calls = [c for c in trace["calls"] if not c["cache_hit"]]
    assert 0 < len(calls) < len(LLM_STEPS)
    assert len(fake.requests) == len(calls), "a call reached the server without a trace record"
    assert trace["totals"]["cost_usd"] <= cap
    assert server_cost(fake) <= cap
    spent = await container.store.spent(job_counter(job.id))
    assert to_micro(trace["totals"]["cost_usd"]) <= spent <= to_micro(cap)


async def test_parallel_calls_cannot_all_pass_the_cap(start: Start, fake: FakeLLMServer) -> None:
    """Calls of parallel steps reserve their worst case before they start: with answers that
    use the whole output budget, a cap that fits two of four parallel calls lets no more run."""
    # each call costs 4.196 USD, near its worst case, and takes long enough to overlap
    fake.set_behaviour(usage=(100, 4096), delay_s=0.5)
    container = await start()
    per_call = (100 + 4096) / 1000
    # evidence and brief run one after the other; then four section steps are ready at once
    cap = 2 * per_call + 2 * 5.2
    job = await run(container, BODY | {"max_cost_usd": cap, "parallel_limit": 4})
    assert job.status == "failed" and job.error["code"] == "budget_exceeded", job.error
    trace = await container.service.trace(job.id, "t")
    assert trace["totals"]["cost_usd"] <= cap
    assert server_cost(fake) <= cap
    assert len(fake.requests) == trace["totals"]["llm_calls"] == 4
    assert fake.max_in_flight <= 2


async def test_a_cap_that_fits_the_whole_job_changes_nothing(start: Start, fake: FakeLLMServer) -> None:
    """A job whose worst cases fit its cap completes; the counter ends at the trace's cost."""
    container = await start()
    job = await run(container, BODY | {"max_cost_usd": 100})
    assert job.status == "completed", job.error
    trace = await container.service.trace(job.id, "t")
    assert trace["totals"]["llm_calls"] == len(LLM_STEPS) == len(fake.requests)
    assert await container.store.spent(job_counter(job.id)) == to_micro(trace["totals"]["cost_usd"])


async def test_cached_steps_cost_nothing(start: Start, fake: FakeLLMServer) -> None:
    """A second job with the same input is served from the cache: no call, no spend, even
    with a cap smaller than one call's worst case."""
    container = await start()
    first = await run(container, BODY)
    assert first.status == "completed", first.error
    calls = len(fake.requests)
    smallest = worst_case(PRICE, 0, 4096) / 1_000_000
    again = await run(container, BODY | {"max_cost_usd": smallest / 2})
    assert again.status == "completed", again.error
    assert len(fake.requests) == calls
    assert await container.store.spent(job_counter(again.id)) == 0


# -- the tenant's cap -----------------------------------------------------------------------------


async def test_tenant_cap_is_shared_by_its_jobs_and_not_by_other_tenants(
    start: Start, fake: FakeLLMServer
) -> None:
    """With TENANT_MAX_COST_USD_PER_DAY fitting one job, the tenant's second job fails with
    budget_exceeded; both traces together stay within the cap; another tenant is not held."""
    cap = 16.0
    container = await start(TENANT_MAX_COST_USD_PER_DAY=str(cap))
    tenant = f"a{uuid.uuid4().hex[:6]}"
    first = await run(container, BODY, tenant)
    assert first.status == "completed", first.error
    second = await run(container, BODY | {"skip_cache": True}, tenant)
    assert second.status == "failed" and second.error["code"] == "budget_exceeded", second.error
    assert "TENANT_MAX_COST_USD_PER_DAY" in second.error["message"]
    totals = [(await container.service.trace(j.id, tenant))["totals"] for j in (first, second)]
    assert sum(t["cost_usd"] for t in totals) <= cap
    assert sum(t["llm_calls"] for t in totals) == len(fake.requests)
    assert server_cost(fake) <= cap
    spent = await container.store.spent(tenant_counter(tenant, utc_day()))
    assert to_micro(sum(t["cost_usd"] for t in totals)) <= spent <= to_micro(cap)
    other = await run(container, BODY | {"skip_cache": True}, "someone-else")
    assert other.status == "completed", other.error


# -- reservations of one job's parallel calls -----------------------------------------------------


async def test_a_call_that_does_not_fit_waits_for_the_jobs_calls_in_flight() -> None:
    """Of three parallel reservations where the cap fits two worst cases, the third waits;
    when one settles below its worst case the third fits; with nothing in flight a call
    that does not fit fails with budget_exceeded."""
    store = SqliteStore(":memory:")
    await store.open()
    try:
        # worst case of each call: 1000 prompt + 1000 output tokens at 1 USD per 1k = 2 USD
        budget = JobBudget(store, {"m": PRICE}, "job1", "t", max_cost_usd=5.0, tenant_max_usd_per_day=None)
        first = await budget.reserve("a", "m", 1000, 1000)
        second = await budget.reserve("b", "m", 1000, 1000)
        third = asyncio.create_task(budget.reserve("c", "m", 1000, 1000))
        await asyncio.sleep(0.2)
        assert not third.done(), "the third call went past the cap"
        assert await store.spent(job_counter("job1")) == to_micro(4.0)
        await budget.settle(first, 0.5)
        held = await asyncio.wait_for(third, 5)
        assert await store.spent(job_counter("job1")) == to_micro(0.5 + 2 + 2)
        await budget.settle(second, 2.0)
        await budget.settle(held, 2.0)
        with pytest.raises(LLMError) as caught:
            await budget.reserve("d", "m", 1000, 1000)
        assert caught.value.code == "budget_exceeded"
        assert "$4.500000 is spent of the job's max_cost_usd of $5" in caught.value.message
        assert await store.spent(job_counter("job1")) == to_micro(4.5)
    finally:
        await store.close()
