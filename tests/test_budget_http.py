"""Cost caps on real processes: `jobq serve` (and `jobq worker`s on Redis) calling the fake
LLM server through the OpenAI SDK; the API's 400s, budget_exceeded, and a tenant cap that
two workers share."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract.helpers import body, job_count, llm_calls, trace, wait_for
from tests.support.fake_llm import FakeLLMServer, fake_openai_server
from tests.support.service import ROOT, Service, base_env

MODEL = "gpt-5.4-mini"
PRICES = f"{MODEL}:1:1"
"""1 USD per 1k tokens either way: one call of a job costs about 0.4 to 1.6 USD."""


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with fake_openai_server() as server:
        yield server


def _env(fake: FakeLLMServer, **extra: str) -> dict[str, str]:
    return {
        **base_env(),
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake.openai_base_url,
        "SUBMIT_RATE_PER_MIN": "0",
        **extra,
    }


@pytest.fixture
def local(fake: FakeLLMServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``start(**env) -> Service``: `jobq serve` on the local backend, stopped after the test."""
    started: list[Service] = []

    def start(**extra: str) -> Service:
        env = _env(fake, JOBS_STORE_URL=f"sqlite:///{tmp_path / f'jobs{len(started)}.db'}", **extra)
        service = Service("local", env, tmp_path / f"svc{len(started)}")
        service.log_dir.mkdir(parents=True)
        started.append(service)
        request.node.jobq_services = [*getattr(request.node, "jobq_services", []), service]
        return service.start()

    yield start
    for service in started:
        service.stop()


def _cost(calls: list[dict[str, Any]]) -> float:
    return sum(c["cost_usd"] for c in calls)


def _server_cost(fake: FakeLLMServer) -> float:
    usage = fake.usage_totals
    return (usage["prompt_tokens"] + usage["completion_tokens"]) / 1000


BAD_VALUES: list[Any] = [0, -0.5, "2", True, [1], {"usd": 1}, 1_000_001]


def test_bad_max_cost_usd_is_a_400_naming_it(local: Any) -> None:
    """POST /api/jobs with a max_cost_usd that is no positive number (up to 1,000,000)
    answers 400 in the SPEC §4 shape, details naming max_cost_usd, and creates nothing;
    null means no cap."""
    service = local(LLM_PRICES=PRICES)
    with service.client() as client:
        before = job_count(client)
        for value in BAD_VALUES:
            response = client.post("/api/jobs", json=body(max_cost_usd=value))
            assert response.status_code == 400, (value, response.text)
            payload = response.json()
            assert payload["error"] and payload["message"], value
            assert [d["field"] for d in payload["details"]] == ["max_cost_usd"], value
            assert all(d["message"] for d in payload["details"])
        assert job_count(client) == before
        response = client.post("/api/jobs", json=body(max_cost_usd=None))
        assert response.status_code == 202, response.text


def test_max_cost_usd_without_prices_is_a_400_and_no_call(local: Any, fake: FakeLLMServer) -> None:
    """Without LLM_PRICES for the model in use, a capped job is refused at submit with a 400
    that says why; nothing is created and no LLM call is made."""
    service = local()
    with service.client() as client:
        before = job_count(client)
        response = client.post("/api/jobs", json=body(max_cost_usd=5))
        assert response.status_code == 400, response.text
        (detail,) = response.json()["details"]
        assert detail["field"] == "max_cost_usd"
        assert "LLM_PRICES" in detail["message"] and MODEL in detail["message"]
        assert job_count(client) == before
    assert fake.requests == []


def test_small_cap_fails_the_job_with_budget_exceeded(local: Any, fake: FakeLLMServer) -> None:
    """A job with max_cost_usd=8 (about 5 of its 12 calls) fails with budget_exceeded; its
    trace's total is within the cap and holds every call the server received."""
    service = local(LLM_PRICES=PRICES)
    cap = 8.0
    with service.client() as client:
        response = client.post("/api/jobs", json=body(max_cost_usd=cap, parallel_limit=4))
        assert response.status_code == 202, response.text
        view = wait_for(client, response.json()["jobId"])
        assert view["status"] == "failed"
        assert view["error"]["code"] == "budget_exceeded", view["error"]
        spent = trace(client, view["jobId"])
    calls = llm_calls(spent)
    assert 0 < len(calls) == len(fake.requests)
    assert spent["totals"]["cost_usd"] <= cap
    assert _server_cost(fake) <= cap


def test_serve_with_a_tenant_cap_and_no_prices_exits_with_one_line(fake: FakeLLMServer) -> None:
    """`jobq serve` with TENANT_MAX_COST_USD_PER_DAY but no LLM_PRICES exits non-zero with
    one line naming the variable and the unpriced model."""
    result = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "serve"],
        cwd=ROOT,
        env=_env(fake, TENANT_MAX_COST_USD_PER_DAY="10"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "TENANT_MAX_COST_USD_PER_DAY" in lines[0] and MODEL in lines[0]


def test_tenant_cap_is_shared_by_two_workers_on_redis(fake: FakeLLMServer, tmp_path: Path) -> None:
    """Two workers (one job at a time each) run one job each for the same tenant at once; the
    tenant's daily cap fits one job, not two: together they stay within it, at least one
    fails with budget_exceeded, and every call the server got is in a trace."""
    pytest.importorskip("tests.support.redis_server")
    from tests.support.redis_server import redis_backend_env

    cap = 16.0
    fake.set_behaviour(delay_s=0.2)  # the jobs overlap
    env = _env(
        fake,
        **redis_backend_env(f"b{uuid.uuid4().hex[:8]}"),
        LLM_PRICES=PRICES,
        TENANT_MAX_COST_USD_PER_DAY=str(cap),
        WORKER_CONCURRENCY="1",
    )
    service = Service("redis", env, tmp_path, workers=2)
    try:
        service.start()
        with service.client() as client:
            _wait_for_workers(client, 2)
            ids = []
            for _ in range(2):
                response = client.post("/api/jobs", json=body(parallel_limit=4))
                assert response.status_code == 202, response.text
                ids.append(response.json()["jobId"])
            views = [wait_for(client, job_id) for job_id in ids]
            traces = [trace(client, job_id) for job_id in ids]
        logs = [(tmp_path / f"worker{n}.log").read_text() for n in range(2)]
    finally:
        service.stop()
    codes = [v["error"]["code"] if v["error"] else v["status"] for v in views]
    assert "budget_exceeded" in codes, codes
    calls = [c for t in traces for c in llm_calls(t)]
    assert len(calls) == len(fake.requests)
    assert _cost(calls) <= cap
    assert _server_cost(fake) <= cap
    ran_on = {job_id: {n for n, log in enumerate(logs) if job_id in log} for job_id in ids}
    assert ran_on[ids[0]] | ran_on[ids[1]] == {0, 1}, ran_on  # one job on each worker


def _wait_for_workers(client: httpx.Client, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (client.get("/api/jobs/stats").json().get("workers") or 0) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not report in time")
