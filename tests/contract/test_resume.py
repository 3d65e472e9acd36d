"""A worker that dies mid-job: the job is delivered again and resumes from its checkpoints."""

from __future__ import annotations

from collections import Counter

from tests.conftest import ServiceFactory
from tests.contract.helpers import (
    ARTIFACT_NAMES,
    LLM_STEPS,
    canonical_hash,
    llm_calls,
    submit,
    trace,
    wait_for,
    wait_until,
)

STEP_OF_ARTIFACT = {
    "sources": "evidence",
    "brief": "brief",
    "investor_score": "investor_score",
    **{f"section_{s}": s for s in LLM_STEPS if s not in ("evidence", "brief", "investor_score")},
}


def test_killed_worker_job_resumes_without_rerunning_finished_steps(
    service_factory: ServiceFactory,
) -> None:
    """kill -9 mid-job; the job completes on redelivery and no finished LLM step is called again."""
    deployment = service_factory({"LLM_OFFLINE_LATENCY_MS": "200"})
    with deployment.client() as client:
        job_id = submit(client, parallel_limit=1, skip_cache=True)

        def checkpoints() -> dict[str, dict[str, object]]:
            items = client.get(f"/api/jobs/{job_id}/artifacts").json()["artifacts"]
            return {a["name"]: a for a in items}

        def enough() -> dict[str, dict[str, object]] | None:
            found = checkpoints()
            return found if len(found) >= 4 else None

        before = wait_until(enough, "four checkpoints")
        deployment.crash_workers()

        view = wait_for(client, job_id)
        assert view["status"] == "completed", view
        assert view["attempts"] >= 2
        after = checkpoints()
        assert set(after) == set(ARTIFACT_NAMES)
        for name, meta in before.items():
            assert after[name]["hash"] == meta["hash"]
            assert after[name]["timestamp"] == meta["timestamp"], f"{name} was written again"
        for name in ARTIFACT_NAMES:
            data = client.get(f"/api/jobs/{job_id}/artifacts/{name}").json()
            assert canonical_hash(data["data"]) == data["hash"]

        calls = Counter(c["step"] for c in llm_calls(trace(client, job_id)) if c["outcome"] == "ok")
        for name in before:
            if name in STEP_OF_ARTIFACT:
                assert calls[STEP_OF_ARTIFACT[name]] == 1, f"{name} re-run: {calls}"
        assert set(calls) == set(LLM_STEPS)
