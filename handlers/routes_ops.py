"""Observation (health, stats, metrics), the web page and the legacy synchronous API."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any, cast

import msgspec
import structlog
from litestar import MediaType, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from handlers import api_models as m
from handlers import http_common as h
from handlers.auth import job_stream_url, require_operator
from handlers.bootstrap import Container
from handlers.metrics import Metrics
from handlers.routes_jobs import job_location
from handlers.strict_body import StrictBody
from pipeline.model import Job
from pipeline.routing import effective_config
from pipeline.vocabulary import TERMINAL_STATUSES, JobStatus

JSONDict = dict[str, Any]
HEALTH_TIMEOUT_S = 0.8
HEALTH_RESPONSES = {
    **m.responses({200: (m.Health, "Store and queue answer")}),
    503: ResponseSpec(
        data_container=m.Health,
        description="Store or queue unreachable (answered within 1 s)",
        generate_examples=False,
    ),
}
LEGACY: dict[str, Any] = {
    "tags": ["legacy"],
    "before_request": h.submit_checks,
    "dto": StrictBody[m.JobRequest],
    "return_dto": None,
    "status_code": 200,
    "responses": {
        **m.responses(
            {
                200: (m.LegacyResult, "The job completed within `LEGACY_WAIT_S`"),
                202: (m.LegacyAccepted, "Still running: follow the stream or poll the status URL"),
            },
            400,
            401,
            413,
            415,
            429,
            503,
        ),
        500: ResponseSpec(
            data_container=cast(Any, m.LegacyError | m.Error),
            description="The job failed or was cancelled (`error` is its code), or an internal error",
            generate_examples=False,
        ),
    },
}
log = structlog.get_logger("jobq.http")


async def _health(c: Container) -> Response[JSONDict]:
    """Ping store and queue concurrently, bounded so a hung backend still gets an answer."""
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


@get(
    "/api/jobs/health",
    summary="Liveness of store and queue",
    tags=["ops"],
    responses=HEALTH_RESPONSES,
)
async def health(container: h.ContainerDep) -> Response[JSONDict]:
    return await _health(container)


@get("/api/v2/health", summary="Health (legacy path)", tags=["legacy"], responses=HEALTH_RESPONSES)
async def health_v2(container: h.ContainerDep) -> Response[JSONDict]:
    return await _health(container)


@get(
    "/api/jobs/stats",
    summary="Counts by status, workers, backend",
    tags=["ops"],
    responses=m.responses({200: (m.Stats, "Counts")}, 401, 403, 503),
)
async def stats(request: Request[Any, Any, Any], container: h.ContainerDep) -> JSONDict:
    """Every tenant's counts: an operator's view, so it takes an operator key."""
    require_operator(request, container.settings)
    body: JSONDict = await container.service.stats()
    body.setdefault("backend", container.settings.backend)
    return body


@get(
    "/api/config",
    summary="Effective configuration (no secrets)",
    tags=["ops"],
    responses=m.responses({200: (m.Config, "The effective configuration")}, 401),
)
async def config(request: Request[Any, Any, Any], container: h.ContainerDep) -> JSONDict:
    settings = container.settings
    h.tenant(request, settings)
    return effective_config(
        backend=settings.backend,
        provider=container.deps.llm.name,
        config=container.deps.config,
        rpm=settings.llm_rpm,
        tpm=settings.llm_tpm,
    )


@get("/metrics", include_in_schema=False, media_type="text/plain; version=0.0.4; charset=utf-8")
async def metrics(
    request: Request[Any, Any, Any], container: h.ContainerDep, metrics: h.MetricsDep
) -> bytes:
    """Prometheus text; with ``API_KEYS`` set, scrape with an operator key as bearer token."""
    require_operator(request, container.settings)
    counts = await container.store.count_by_status()
    try:
        workers = int((await container.queue.stats()).get("workers", 0))
    except Exception:  # queue stats are best effort; the counters still render
        workers = None
    return metrics.render(counts, workers)


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def index() -> bytes:
    return resources.files("handlers").joinpath("static/index.html").read_bytes()


async def _legacy(
    request: Request[Any, Any, Any], data: m.JobRequest, c: Container, metrics: Metrics, endpoint: str
) -> Response[JSONDict]:
    """Create a normal job, then wait up to ``LEGACY_WAIT_S`` for it; never a gateway timeout."""
    caller, key = h.submitter(request)
    job, created = await c.service.submit(msgspec.structs.asdict(data), caller, key)
    if created:
        metrics.submitted.labels(endpoint=endpoint).inc()
    if c.settings.legacy_wait_s > 0 and job.status not in TERMINAL_STATUSES:
        job = await c.service.wait_finished(job.id, c.settings.legacy_wait_s) or job
    return legacy_response(job, job_stream_url(c.settings, job.id, caller))


def legacy_response(job: Job, stream: str) -> Response[JSONDict]:
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
            "streamUrl": stream,
            "trace_id": job.id,
        },
        status_code=202,
        headers={"Location": location},
    )


@post("/api/v2/auto", summary="Legacy: run a job and wait", **LEGACY)
async def legacy_auto(
    request: Request[Any, Any, Any],
    data: JSONBody[m.JobRequest],
    container: h.ContainerDep,
    metrics: h.MetricsDep,
    idempotency_key: h.IdempotencyKeyHeader = None,
) -> Response[JSONDict]:
    return await _legacy(request, data, container, metrics, "v2_auto")


@post("/api/v2/dossier/generate", summary="Legacy: run a job and wait", **LEGACY)
async def legacy_generate(
    request: Request[Any, Any, Any],
    data: JSONBody[m.JobRequest],
    container: h.ContainerDep,
    metrics: h.MetricsDep,
    idempotency_key: h.IdempotencyKeyHeader = None,
) -> Response[JSONDict]:
    return await _legacy(request, data, container, metrics, "v2_dossier_generate")


ROUTES = [health, health_v2, stats, config, metrics, index, legacy_auto, legacy_generate]
