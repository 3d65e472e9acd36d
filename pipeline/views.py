"""The JSON shapes the API shows of a job (SPEC §4): GET /api/jobs/{id}, the
``status`` SSE event, list entries. Stored jobs use epoch seconds; views ISO-8601."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pipeline.graph import STEP_NAMES, STEPS, TOTAL_STEPS
from pipeline.model import Artifact, Job
from pipeline.vocabulary import JobStatus


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def initial_steps() -> dict[str, str]:
    return {name: "pending" for name in STEP_NAMES}


def initial_progress() -> dict[str, Any]:
    return {"step": STEPS[0].display, "percentage": 0, "currentStep": 1, "totalSteps": TOTAL_STEPS}


def status_view(
    job: Job, artifacts: Iterable[Artifact] | None = None, include_result: bool = True
) -> dict[str, Any]:
    """GET /api/jobs/{id}. ``artifacts=None`` leaves the key out (the ``status`` event
    and list entries); ``result`` appears only for completed jobs."""
    view: dict[str, Any] = {
        "jobId": job.id,
        "status": job.status,
        "progress": dict(job.progress) or initial_progress(),
        "steps": {**initial_steps(), **job.steps},
        "createdAt": iso(job.created_at),
        "startedAt": iso(job.started_at),
        "completedAt": iso(job.completed_at),
        "attempts": job.attempts,
        "error": job.error if job.status in (JobStatus.FAILED, JobStatus.CANCELLED) else None,
    }
    if artifacts is not None:
        view["artifacts"] = {
            a.name: {"type": a.type, "hash": a.hash, "timestamp": a.timestamp, "size": a.size}
            for a in artifacts
        }
    if include_result and job.status == JobStatus.COMPLETED and job.result is not None:
        view["result"] = job.result
    return view


def status_event(job: Job) -> dict[str, Any]:
    """Payload of the ``status`` SSE event: the job view without result and artifacts."""
    return status_view(job, None, include_result=False)

