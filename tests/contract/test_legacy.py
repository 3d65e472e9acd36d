"""The legacy synchronous endpoints: 200 when done in time, 202 with URLs when not, 500 on failure."""

from __future__ import annotations

import pytest

from tests.contract.helpers import body, get_job, read_stream, wait_for
from tests.support.service import Service

LEGACY = ["/api/v2/auto", "/api/v2/dossier/generate"]


@pytest.mark.parametrize("path", LEGACY)
def test_legacy_returns_the_dossier_when_done_within_the_wait(service: Service, path: str) -> None:
    """A job that finishes within LEGACY_WAIT_S answers 200 with data and meta."""
    with service.client() as client:
        response = client.post(path, json=body())
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["success"] is True
        assert payload["data"]["title"].startswith("Solar Mesh")
        meta = payload["meta"]
        assert set(meta) >= {"trace_id", "duration_ms", "cache_hits", "steps_completed"}
        assert meta["steps_completed"] == 15
        job = get_job(client, meta["trace_id"])
        assert job["status"] == "completed" and job["result"]["data"] == payload["data"]


@pytest.mark.parametrize("path", LEGACY)
def test_legacy_answers_202_with_job_urls_when_still_running(slow_service: Service, path: str) -> None:
    """A job slower than LEGACY_WAIT_S answers 202 with its id, status and stream URLs."""
    with slow_service.client() as client:
        response = client.post(path, json=body(parallel_limit=1))
        assert response.status_code == 202, response.text
        payload = response.json()
        job_id = payload["jobId"]
        assert payload["status"] in ("queued", "running")
        assert payload["statusUrl"] == f"/api/jobs/{job_id}"
        assert payload["streamUrl"] == f"/api/jobs/{job_id}/stream"
        assert client.get(payload["statusUrl"]).status_code == 200
        assert read_stream(client, job_id).events[-1].data == {"status": "completed"}


def test_legacy_failure_is_500_with_error_and_trace_id(slow_service: Service) -> None:
    """A job failing within the wait answers 500 with error, message and trace_id."""
    with slow_service.client() as client:
        response = client.post("/api/v2/auto", json=body(parallel_limit=1, timeout_ms=1000))
        assert response.status_code == 500, response.text
        payload = response.json()
        assert payload["error"] == "timeout" and payload["message"]
        assert wait_for(client, payload["trace_id"])["status"] == "failed"
