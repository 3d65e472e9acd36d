"""Observation (health, stats, metrics), the web page and the legacy synchronous API."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import structlog
from litestar import MediaType, Request, Response, get, post

from handlers import http_common as h
from handlers.routes_jobs import job_location
from pipeline.model import Job
from pipeline.vocabulary import TERMINAL_STATUSES, JobStatus

JSONDict = dict[str, Any]
HEALTH_TIMEOUT_S = 0.8
log = structlog.get_logger("jobq.http")


async def _health(request: Request[Any, Any, Any]) -> Response[JSONDict]:
    """Ping store and queue concurrently, bounded so a hung backend still gets an answer."""
    c = h.container(request)
    body: JSONDict = {"backend": c.settings.backend, "queue": c.queue.name}
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            await asyncio.gather(c.store.ping(), c.queue.ping())
    except TimeoutError:
        error = f"store or queue did not answer within {HEALTH_TIMEOUT_S}s"
    except Exception as exc:  # any backend failure is a health failure, reported not raised
        error = f"{type(exc).__name__}: {exc}"
    else:
        return Response({"status": "ok", **body}, status_code=200)
    log.warning("health_failed", error=error)
    return Response({"status": "error", "error": error, **body}, status_code=503)


@get("/api/jobs/health", summary="Liveness of store and queue", tags=["ops"])
async def health(request: Request[Any, Any, Any]) -> Response[JSONDict]:
    return await _health(request)


@get("/api/v2/health", summary="Health (legacy path)", tags=["legacy"])
async def health_v2(request: Request[Any, Any, Any]) -> Response[JSONDict]:
    return await _health(request)


@get("/api/jobs/stats", summary="Counts by status, workers, backend", tags=["ops"])
async def stats(request: Request[Any, Any, Any]) -> JSONDict:
    h.tenant(request)
    c = h.container(request)
    body: JSONDict = await c.service.stats()
    body.setdefault("backend", c.settings.backend)
    return body


@get("/metrics", include_in_schema=False, media_type="text/plain; version=0.0.4; charset=utf-8")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    c = h.container(request)
    counts = await c.store.count_by_status()
    try:
        workers = int((await c.queue.stats()).get("workers", 0))
    except Exception:  # queue stats are best effort; the counters still render
        workers = None
    return h.metrics(request).render(counts, workers)


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def index() -> bytes:
    return resources.files("handlers").joinpath("static/index.html").read_bytes()


async def _legacy(request: Request[Any, Any, Any], endpoint: str) -> Response[JSONDict]:
    """Create a normal job, then wait up to ``LEGACY_WAIT_S`` for it; never a gateway timeout."""
    c = h.container(request)
    caller = h.tenant(request)
    h.rate_limit(request, caller)
    key = h.idempotency_key(request)
    job, created = await c.service.submit(await h.json_body(request), caller, key)
    if created:
        h.metrics(request).submitted.labels(endpoint=endpoint).inc()
    if c.settings.legacy_wait_s > 0 and job.status not in TERMINAL_STATUSES:
        job = await c.service.wait_finished(job.id, c.settings.legacy_wait_s) or job
    return legacy_response(job)


def legacy_response(job: Job) -> Response[JSONDict]:
    if job.status == JobStatus.COMPLETED and job.result:
        meta = job.result.get("meta") or {}
        done = sum(1 for s in job.steps.values() if s in ("completed", "cached"))
        return Response(
            {
                "success": True,
                "data": job.result.get("data"),
                "meta": {
                    "trace_id": job.id,
                    "duration_ms": meta.get("duration_ms", 0),
                    "cache_hits": meta.get("cache_hits", 0),
                    "steps_completed": done,
                },
            },
            status_code=200,
        )
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        error = job.error or {}
        return Response(
            {
                "error": error.get("code", job.status),
                "message": error.get("message", f"job {job.status}"),
                "trace_id": job.id,
            },
            status_code=500,
        )
    location = job_location(job.id)
    return Response(
        {
            "jobId": job.id,
            "status": job.status,
            "message": "still running; follow the stream or poll the status URL",
            "statusUrl": location,
            "streamUrl": f"{location}/stream",
            "trace_id": job.id,
        },
        status_code=202,
        headers={"Location": location},
    )


@post("/api/v2/auto", summary="Legacy: run a job and wait", tags=["legacy"])
async def legacy_auto(request: Request[Any, Any, Any]) -> Response[JSONDict]:
    return await _legacy(request, "v2_auto")


@post("/api/v2/dossier/generate", summary="Legacy: run a job and wait", tags=["legacy"])
async def legacy_generate(request: Request[Any, Any, Any]) -> Response[JSONDict]:
    return await _legacy(request, "v2_dossier_generate")


ROUTES = [health, health_v2, stats, metrics, index, legacy_auto, legacy_generate]
