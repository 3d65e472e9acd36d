"""A job from submission to dossier, through real HTTP, on every backend."""

from __future__ import annotations

from tests.contract.helpers import (
    ARTIFACT_NAMES,
    LLM_STEPS,
    canonical_hash,
    llm_calls,
    submit,
    trace,
    wait_for,
)
from tests.support.service import Service


def test_job_completes_with_fifteen_artifacts_whose_hashes_verify(service: Service) -> None:
    """A job completes; all 15 artifacts exist, each hash is sha256 of its canonical JSON."""
    with service.client() as client:
        created = client.post(
            "/api/jobs",
            json={"project_title": "  Hash Check  ", "pitch": "Batteries as a service for farms."},
        )
        assert created.status_code == 202
        job_id = created.json()["jobId"]
        assert created.json()["status"] == "queued"
        assert created.headers["location"] == f"/api/jobs/{job_id}"

        view = wait_for(client, job_id)
        assert view["status"] == "completed", view
        assert view["progress"]["percentage"] == 100
        assert view["progress"]["currentStep"] == view["progress"]["totalSteps"] == 15
        assert set(view["steps"].values()) <= {"completed", "cached"}
        assert len(view["steps"]) == 15
        assert view["error"] is None
        assert view["startedAt"] and view["completedAt"] and view["attempts"] >= 1
        result = view["result"]
        assert result["success"] is True
        assert result["data"]["title"] == "Hash Check"
        assert result["data"]["language"] == "de"
        assert {"duration_ms", "cache_hits", "llm_calls"} <= set(result["meta"])

        listed = client.get(f"/api/jobs/{job_id}/artifacts").json()["artifacts"]
        assert sorted(a["name"] for a in listed) == sorted(ARTIFACT_NAMES)
        assert set(view["artifacts"]) == set(ARTIFACT_NAMES)
        for meta in listed:
            one = client.get(f"/api/jobs/{job_id}/artifacts/{meta['name']}")
            assert one.status_code == 200
            artifact = one.json()
            assert set(artifact) >= {"name", "type", "data", "hash", "timestamp"}
            assert artifact["hash"] == meta["hash"] == view["artifacts"][meta["name"]]["hash"]
            assert canonical_hash(artifact["data"]) == artifact["hash"], meta["name"]
        dossier = client.get(f"/api/jobs/{job_id}/artifacts/dossier").json()["data"]
        assert dossier == result["data"]
        assert dossier["meta"]["offline"] is True


def test_trace_lists_every_llm_call_with_totals(service: Service) -> None:
    """The trace lists each LLM step's call (provider, model, tokens, outcome) and totals."""
    with service.client() as client:
        job_id = submit(client)
        assert wait_for(client, job_id)["status"] == "completed"
        body = trace(client, job_id)
        calls = llm_calls(body)
        assert sorted(c["step"] for c in calls) == sorted(LLM_STEPS)
        for call in calls:
            assert call["provider"] == "offline" and call["outcome"] == "ok"
            assert {
                "model",
                "attempt",
                "cache_hit",
                "prompt_tokens",
                "completion_tokens",
                "duration_ms",
            } <= set(call)
        assert body["totals"]["llm_calls"] == len(LLM_STEPS)
        assert body["totals"]["prompt_tokens"] == sum(c["prompt_tokens"] for c in calls) > 0


def test_list_returns_the_callers_jobs_newest_first_with_paging(service: Service) -> None:
    """GET /api/jobs lists jobs newest first, filters by status and pages with a cursor."""
    with service.client() as client:
        first, second = submit(client), submit(client)
        wait_for(client, first)
        wait_for(client, second)
        page = client.get("/api/jobs", params={"limit": 1})
        assert page.status_code == 200
        assert [j["jobId"] for j in page.json()["jobs"]] == [second]
        cursor = page.json()["nextCursor"]
        assert cursor
        nxt = client.get("/api/jobs", params={"limit": 1, "cursor": cursor}).json()
        assert [j["jobId"] for j in nxt["jobs"]] == [first]
        done = client.get("/api/jobs", params={"status": "completed", "limit": 200}).json()
        assert {first, second} <= {j["jobId"] for j in done["jobs"]}
        assert all(j["status"] == "completed" for j in done["jobs"])
        none = client.get("/api/jobs", params={"status": "cancelled", "limit": 200}).json()
        assert not {first, second} & {j["jobId"] for j in none["jobs"]}


def test_health_stats_metrics_and_web_page(service: Service) -> None:
    """Health is 200 ok, stats count by status with the backend, /metrics and / answer."""
    with service.client() as client:
        job_id = submit(client)
        wait_for(client, job_id)
        health = client.get("/api/jobs/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert client.get("/api/v2/health").json()["status"] == "ok"
        stats = client.get("/api/jobs/stats").json()
        assert stats["backend"] == service.backend
        assert stats["jobs"]["completed"] >= 1
        assert set(stats["jobs"]) == {"queued", "running", "completed", "failed", "cancelled"}
        assert "workers" in stats
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "jobq_http_requests_total" in metrics.text
        assert 'jobq_jobs{status="completed"}' in metrics.text
        assert "jobq_jobs_submitted_total" in metrics.text
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "EventSource" in page.text


def test_schema_is_valid_openapi_listing_the_api(service: Service) -> None:
    """/schema serves the OpenAPI document (valid by openapi-spec-validator) with every route."""
    from openapi_spec_validator import validate

    with service.client() as client:
        assert client.get("/schema").status_code == 200
        spec = client.get("/schema/openapi.json").json()
    validate(spec)
    paths = set(spec["paths"])
    assert {
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/stream",
        "/api/jobs/{job_id}/artifacts",
        "/api/jobs/{job_id}/artifacts/{name}",
        "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/trace",
        "/api/jobs/health",
        "/api/jobs/stats",
        "/api/v2/auto",
        "/api/v2/dossier/generate",
        "/api/v2/health",
    } <= paths
