"""Cancel, deadlines, the parallel limit and the step cache, observed over HTTP."""

from __future__ import annotations

import time

import httpx

from tests.conftest import ServiceFactory
from tests.contract.helpers import (
    LLM_STEPS,
    body,
    get_job,
    llm_calls,
    max_overlap,
    read_stream,
    submit,
    trace,
    wait_for,
    wait_until,
)
from tests.support.service import Service


def _artifact_count(client: httpx.Client, job_id: str) -> int:
    return int(client.get(f"/api/jobs/{job_id}/artifacts").json()["count"])


def _settled_trace_count(client: httpx.Client, job_id: str, quiet_s: float = 0.6) -> int:
    """The trace length once it stops changing (an aborted call must not add records later)."""
    before = len(trace(client, job_id)["calls"])
    time.sleep(quiet_s)
    after = len(trace(client, job_id)["calls"])
    assert after == before, "LLM calls were still being recorded after the job ended"
    return after


def test_cancel_a_running_job_stops_it_and_is_idempotent(slow_service: Service) -> None:
    """A running job cancels (error code cancelled, stream ends with done), twice is harmless."""
    with slow_service.client() as client:
        job_id = submit(client, parallel_limit=1)
        wait_until(lambda: _artifact_count(client, job_id) >= 2, "job to be under way")
        first = client.post(f"/api/jobs/{job_id}/cancel")
        assert first.status_code in (200, 202), first.text
        view = wait_for(client, job_id)
        assert view["status"] == "cancelled"
        assert view["error"]["code"] == "cancelled"
        assert "result" not in view
        assert len(view["artifacts"]) < 15
        again = client.post(f"/api/jobs/{job_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        stream = read_stream(client, job_id)
        assert stream.events[-1].event == "done"
        assert stream.events[-1].data == {"status": "cancelled"}
        calls = _settled_trace_count(client, job_id)
        assert calls < len(LLM_STEPS)
        # The call in flight at the cancel was made (and may be billed): it is traced.
        aborted = [c["step"] for c in trace(client, job_id)["calls"] if c["outcome"] == "aborted"]
        step = view["error"]["step"]
        assert aborted == ([step] if step in LLM_STEPS else []), (aborted, step)


def test_cancel_a_queued_job_cancels_it_at_once(service_factory: ServiceFactory) -> None:
    """With the only worker slot busy, a queued job cancels immediately and never runs."""
    deployment = service_factory({"WORKER_CONCURRENCY": "1", "LLM_OFFLINE_LATENCY_MS": "200"})
    with deployment.client() as client:
        blocker = submit(client, parallel_limit=1)
        wait_for(client, blocker, ("running",))
        queued = submit(client)
        assert get_job(client, queued)["status"] == "queued"
        response = client.post(f"/api/jobs/{queued}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        view = get_job(client, queued)
        assert view["status"] == "cancelled" and view["startedAt"] is None
        assert view["error"]["code"] == "cancelled"
        client.post(f"/api/jobs/{blocker}/cancel")
        wait_for(client, blocker)
        stream = read_stream(client, queued)
        assert [e.event for e in stream.events][-1] == "done"
        assert client.get(f"/api/jobs/{queued}/artifacts").json()["count"] == 0
        assert trace(client, queued)["calls"] == []


def test_cancel_a_finished_job_leaves_it_unchanged(service: Service) -> None:
    """Cancelling a completed job answers its status and changes nothing."""
    with service.client() as client:
        job_id = submit(client)
        done = wait_for(client, job_id)
        assert done["status"] == "completed"
        response = client.post(f"/api/jobs/{job_id}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "completed"
        assert get_job(client, job_id) == done


def test_timeout_fails_the_job_with_code_timeout(slow_service: Service) -> None:
    """A deadline shorter than the work fails the job with code timeout; no call outlives it."""
    with slow_service.client() as client:
        job_id = submit(client, parallel_limit=1, timeout_ms=1000)
        view = wait_for(client, job_id)
        assert view["status"] == "failed"
        assert view["error"]["code"] == "timeout"
        assert "result" not in view
        stream = read_stream(client, job_id)
        assert stream.of("error")[-1]["code"] == "timeout"
        assert stream.events[-1].data == {"status": "failed"}
        _settled_trace_count(client, job_id)


def test_parallel_limit_bounds_concurrent_llm_calls(slow_service: Service) -> None:
    """LLM calls never overlap beyond parallel_limit (trace intervals, running LLM steps)."""
    with slow_service.client() as client:
        one = submit(client, parallel_limit=1, skip_cache=True)
        three = submit(client, parallel_limit=3, skip_cache=True)
        streams = {1: read_stream(client, one), 3: read_stream(client, three)}
        traces = {1: llm_calls(trace(client, one)), 3: llm_calls(trace(client, three))}
    for limit in (1, 3):
        assert len(traces[limit]) == len(LLM_STEPS)
        assert max_overlap(traces[limit]) <= limit
        running = [
            sum(1 for step in LLM_STEPS if status["steps"][step] == "running")
            for status in streams[limit].of("status")
        ]
        assert max(running) <= limit
    # The observation can see concurrency: the wider job did run calls side by side.
    assert max_overlap(traces[3]) >= 2


def test_identical_job_is_served_from_cache_and_skip_cache_calls_every_step(
    service: Service,
) -> None:
    """A repeat of a finished job makes zero LLM calls; with skip_cache every LLM step is called."""
    request = body()
    with service.client() as client:
        first = client.post("/api/jobs", json=request).json()["jobId"]
        assert wait_for(client, first)["status"] == "completed"
        first_trace = trace(client, first)
        assert first_trace["totals"]["llm_calls"] == len(LLM_STEPS)

        second = client.post("/api/jobs", json=request).json()["jobId"]
        assert second != first
        view = wait_for(client, second)
        assert view["status"] == "completed"
        cached = trace(client, second)
        assert cached["totals"]["llm_calls"] == 0 and llm_calls(cached) == []
        assert cached["totals"]["cache_hits"] == len(LLM_STEPS)
        assert view["result"]["meta"]["llm_calls"] == 0
        assert view["result"]["meta"]["cache_hits"] == len(LLM_STEPS)
        assert {view["steps"][s] for s in LLM_STEPS} == {"cached"}
        first_view = get_job(client, first)
        assert {k: v["hash"] for k, v in view["artifacts"].items()} == {
            k: v["hash"] for k, v in first_view["artifacts"].items()
        }

        fresh = client.post("/api/jobs", json={**request, "skip_cache": True}).json()["jobId"]
        assert wait_for(client, fresh)["status"] == "completed"
        uncached = trace(client, fresh)
        assert sorted(c["step"] for c in llm_calls(uncached)) == sorted(LLM_STEPS)
        assert uncached["totals"]["cache_hits"] == 0
