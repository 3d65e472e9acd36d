"""Guards before the refactoring of issue 12: behaviours that are right today and
must stay right, on every backend.

- progress never goes down while steps finish out of order (parallel_limit 4, 16);
- the trace's tokens are what the provider reported, also for retried (429, 500)
  and repaired (invalid, malformed) attempts;
- the step cache never serves a job whose pitch differs.

The progress and token tests drive the deployment's real OpenAI SDK against the
local wire-format fake (``tests.support.fake_llm``): the offline provider's latency
is one fixed number (``LLM_OFFLINE_LATENCY_MS``), so steps started together would
finish in the order they started; the fake answers each request after a random
delay instead, and can fail or spoil the answers of chosen steps.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _build
from tests.contract.helpers import (
    ARTIFACT_NAMES,
    LLM_STEPS,
    TERMINAL,
    body,
    get_job,
    llm_calls,
    read_stream,
    submit,
    trace,
    wait_for,
)
from tests.support.fake_llm import FakeLLMServer, RecordedRequest, fake_openai_server
from tests.support.service import Service

STEP_OF_ARTIFACT = {
    "sources": "evidence",
    "brief": "brief",
    "investor_score": "investor_score",
    **{f"section_{s}": s for s in LLM_STEPS if s not in ("evidence", "brief", "investor_score")},
}
ARTIFACT_OF_STEP = {step: name for name, step in STEP_OF_ARTIFACT.items()}


class ScriptedLLM:
    """What the fake server answers: per step (by the request's schema name) a list
    of directives used up one per request, then ``ok`` after the step's delay in
    ``slow`` or else a random one drawn from ``delay_s`` (seeded), so steps that
    start together finish in any order."""

    def __init__(self, fake: FakeLLMServer) -> None:
        self.fake = fake
        self.lock = threading.Lock()
        self.script: dict[str, list[str]] = {}
        self.delay_s = (0.0, 0.0)
        self.slow: dict[str, float] = {}
        self.rng = random.Random(0)
        fake.set_behaviour(responder=self.respond)

    def reset(
        self,
        *,
        seed: int,
        delay_s: tuple[float, float],
        script: dict[str, list[str]] | None = None,
        slow: dict[str, float] | None = None,
    ) -> None:
        with self.lock:
            self.rng = random.Random(seed)
            self.delay_s = delay_s
            self.script = {_schema(s): list(d) for s, d in (script or {}).items()}
            self.slow = {_schema(s): delay for s, delay in (slow or {}).items()}
        self.fake.reset()

    def respond(self, request: RecordedRequest) -> str:
        with self.lock:
            planned = self.script.get(request.schema_name or "")
            if planned:
                return planned.pop(0)
            delay = self.slow.get(request.schema_name or "") or self.rng.uniform(*self.delay_s)
            return f"ok:delay={delay:.3f}"


def _schema(step: str) -> str:
    """The schema name the provider sends for ``step`` (``LLMRequest.schema_name``)."""
    return f"{ARTIFACT_OF_STEP[step]}_v1"


@pytest.fixture(scope="module")
def scripted_llm() -> Iterator[ScriptedLLM]:
    with fake_openai_server() as fake:
        yield ScriptedLLM(fake)


@pytest.fixture(scope="module")
def fake_llm_deployment(
    backend: str, tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM
) -> Iterator[Service]:
    """One deployment of ``backend`` whose LLM provider is the OpenAI SDK talking to
    the scripted fake (shared by this module's tests: one job at a time)."""
    env = {
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": scripted_llm.fake.openai_base_url,
        "SUBMIT_RATE_PER_MIN": "0",
        "SSE_HEARTBEAT_S": "0.5",
    }
    service = _build(backend, Path(tmp_path_factory.mktemp(f"guards-{backend}")), env, workers=1)
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture
def deployment(fake_llm_deployment: Service, request: pytest.FixtureRequest) -> Service:
    request.node.jobq_services = [*getattr(request.node, "jobq_services", []), fake_llm_deployment]
    return fake_llm_deployment


def _poll(service: Service, job_id: str, seen: list[dict[str, Any]], stop: threading.Event) -> None:
    """GET the job every few ms until it is finished, keeping each view."""
    with service.client() as client:
        while not stop.is_set():
            view = get_job(client, job_id)
            seen.append(view)
            if view["status"] in TERMINAL:
                return
            stop.wait(0.005)


def _assert_never_down(progress: list[dict[str, Any]], where: str) -> None:
    for before, after in itertools.pairwise(progress):
        assert after["percentage"] >= before["percentage"], (where, before, after)
        assert after["currentStep"] >= before["currentStep"], (where, before, after)


@pytest.mark.parametrize("limit", [4, 16])
def test_progress_never_goes_down_when_parallel_steps_finish_out_of_order(
    deployment: Service, scripted_llm: ScriptedLLM, limit: int
) -> None:
    """With parallel_limit 4 or 16 and steps finishing out of order, percentage and
    currentStep never go down, neither in GET /api/jobs/{id} nor in SSE status events."""
    # Every call 10-150 ms, but one section started with the first batch takes 2.5 s and
    # the last section 3 s: the first ends long after the steps started with it, alone
    # in its store write on every backend (S3's slow commits included, on a loaded
    # machine), while the job waits for the second.
    scripted_llm.reset(seed=limit, delay_s=(0.01, 0.15), slow={"problem": 2.5, "financial_plan": 3.0})
    views: list[dict[str, Any]] = []
    stop = threading.Event()
    with deployment.client() as client:
        job_id = submit(client, parallel_limit=limit, skip_cache=True)
        poller = threading.Thread(target=_poll, args=(deployment, job_id, views, stop))
        poller.start()
        try:
            stream = read_stream(client, job_id)
        finally:
            poller.join(30)
            stop.set()
        view = wait_for(client, job_id)
    assert view["status"] == "completed", view
    statuses = stream.of("status")
    streamed = [s["progress"] for s in statuses]
    polled = [v["progress"] for v in views]
    _assert_never_down(streamed, "SSE status events")
    _assert_never_down(polled, "GET /api/jobs/{id}")
    assert streamed[-1]["percentage"] == polled[-1]["percentage"] == 100
    assert streamed[-1]["currentStep"] == polled[-1]["currentStep"] == 15

    # Not vacuous: calls overlapped, and both views showed the job while the slow
    # section was still running and steps started after it had finished.
    assert scripted_llm.fake.max_in_flight >= 3
    for where, seen in (("SSE", statuses), ("GET", views)):
        assert any(
            v["steps"]["problem"] == "running" and v["steps"]["business_model"] == "completed" for v in seen
        ), f"{where} never showed a step finishing before an earlier one"
        assert len({v["progress"]["percentage"] for v in seen}) >= 4, where


OUTCOME_OF_STATUS = {429: "llm_rate_limited", 500: "llm_unavailable"}


def test_trace_tokens_are_what_the_provider_reported_across_retries_and_repairs(
    deployment: Service, scripted_llm: ScriptedLLM
) -> None:
    """GET /api/jobs/{id}/trace lists every attempt (429, 500, invalid answer, repair)
    with the prompt and completion tokens the provider reported for it, and totals
    that add up to what the provider served, the repaired invalid answers included."""
    scripted_llm.reset(
        seed=7,
        delay_s=(0.0, 0.02),
        script={
            "evidence": ["500", "invalid"],  # a 5xx, then an invalid answer, repaired
            "brief": ["429:retry_after=0.05"],
            "market": ["invalid", "500"],  # invalid answer; its repair gets a 5xx first
            "investor_score": ["malformed"],  # not JSON at all, repaired
        },
    )
    with deployment.client() as client:
        job_id = submit(client, parallel_limit=4, skip_cache=True)
        view = wait_for(client, job_id)
        assert view["status"] == "completed", view
        body_ = trace(client, job_id)
    fake = scripted_llm.fake
    served = fake.requests
    assert fake.count(status=429) == 1 and fake.count(status=500) == 2
    assert sum(r.directive in ("invalid", "malformed") for r in served) == 3

    # Per attempt: the trace's records of a step, in attempt order, are the requests
    # the server received for it, in arrival order, with the tokens it reported.
    calls = llm_calls(body_)
    by_step: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        by_step[call["step"]].append(call)
    requests_of: dict[str, list[RecordedRequest]] = defaultdict(list)
    for request in served:
        requests_of[STEP_OF_ARTIFACT[(request.schema_name or "")[: -len("_v1")]]].append(request)
    assert set(by_step) == set(requests_of) == set(LLM_STEPS)
    for step in LLM_STEPS:
        records = sorted(by_step[step], key=lambda c: c["attempt"])
        got = [(c["outcome"], c["prompt_tokens"], c["completion_tokens"]) for c in records]
        want = [
            (
                OUTCOME_OF_STATUS.get(r.status or 0)
                or ("ok" if r.directive.startswith("ok") else "llm_invalid_output"),
                r.prompt_tokens,
                r.completion_tokens,
            )
            for r in requests_of[step]
        ]
        assert got == want, f"{step}: trace {got} != served {want}"
    spoiled = [c for c in calls if c["outcome"] == "llm_invalid_output"]
    assert len(spoiled) == 3 and all(c["completion_tokens"] > 0 for c in spoiled)
    assert sum(c.get("kind") == "repair" for c in calls) == 4  # 3 repairs, one retried after a 500

    totals = body_["totals"]
    usage = fake.usage_totals
    assert totals["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert totals["completion_tokens"] == usage["completion_tokens"] > 0
    assert totals["llm_calls"] == len(served) == len(LLM_STEPS) + 3 + 3
    assert totals["cache_hits"] == 0


def test_a_different_pitch_is_never_served_from_the_step_cache(service: Service) -> None:
    """A job with the same title and settings as a finished one but a different pitch
    gets fresh artifacts: nothing cached, a call for every LLM step, other hashes."""
    first_body = body()
    second_body = {
        **first_body,
        "elevator_pitch": "Autonomous drones that inspect wind turbine blades for cracks; "
        "operators pay per inspected turbine.",
    }
    with service.client() as client:

        def run(job_body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            response = client.post("/api/jobs", json=job_body)
            assert response.status_code == 202, response.text
            job_id = response.json()["jobId"]
            view = wait_for(client, job_id)
            assert view["status"] == "completed", view
            return view, trace(client, job_id)

        first, _ = run(first_body)
        second, second_trace = run(second_body)
        # The cache works on this deployment: the first job's very body is all hits.
        again, again_trace = run(first_body)

    assert all(again["steps"][s] == "cached" for s in LLM_STEPS), again["steps"]
    assert again_trace["totals"]["cache_hits"] == len(LLM_STEPS)

    assert not [s for s, state in second["steps"].items() if state != "completed"], second["steps"]
    assert second["result"]["meta"]["cache_hits"] == 0
    assert second_trace["totals"]["cache_hits"] == 0
    assert not [c for c in second_trace["calls"] if c["cache_hit"]]
    assert sorted(c["step"] for c in llm_calls(second_trace)) == sorted(LLM_STEPS)
    reused = [
        name
        for name in ARTIFACT_NAMES
        if name != "validation"  # number checks: may legitimately come out the same
        and second["artifacts"][name]["hash"] == first["artifacts"][name]["hash"]
    ]
    assert not reused, f"artifacts of the first job reused: {reused}"
