"""The job API (SPEC §4): thin handlers over ``JobService``."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import MediaType, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import ServerSentEvent

from handlers import http_common as h
from handlers.auth import read_scope, resolve_stream_tenant, stream_tokens
from handlers.sse import job_events, last_event_id, sse_response
from handlers.stream_tokens import stream_url
from pipeline.dossier_markdown import render_markdown, slug
from pipeline.vocabulary import STATUSES, TERMINAL_STATUSES

JSONDict = dict[str, Any]


def job_location(job_id: str) -> str:
    return f"/api/jobs/{job_id}"


@post("/api/jobs", status_code=202, summary="Create a job", tags=["jobs"])
async def create_job(
    request: Request[Any, Any, Any],
    container: h.ContainerDep,
    metrics: h.MetricsDep,
    limiter: h.LimiterDep,
) -> Response[JSONDict]:
    """Accept a job at once; the worker runs it. Same ``Idempotency-Key`` -> same job."""
    caller = h.tenant(request, container.settings)
    h.rate_limit(limiter, caller)
    key = h.idempotency_key(request)
    body = await h.json_body(request)
    job, created = await container.service.submit(body, caller, key)
    if created:
        metrics.submitted.labels(endpoint="jobs").inc()
    message = "job accepted" if created else "job already exists for this Idempotency-Key"
    stream = stream_url(stream_tokens(container.settings), job.id, caller)
    return Response(
        {"jobId": job.id, "status": job.status, "message": message, "streamUrl": stream},
        status_code=202,
        headers={"Location": job_location(job.id), "Idempotent-Replayed": str(not created).lower()},
    )


@get("/api/jobs", summary="List the caller's recent jobs", tags=["jobs"])
async def list_jobs(
    request: Request[Any, Any, Any],
    container: h.ContainerDep,
    status: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 20,
    cursor: FromQuery[str | None] = None,
) -> JSONDict:
    if status is not None and status not in STATUSES:
        raise h.InvalidBody(
            "invalid query", extra=[{"field": "status", "message": f"one of {', '.join(STATUSES)}"}]
        )
    scope = h.reader(request, container.settings)
    try:
        page: JSONDict = await container.service.list(scope, status, limit, cursor)
    except ValueError:
        raise h.InvalidBody(
            "invalid query", extra=[{"field": "cursor", "message": "not a cursor this API issued"}]
        ) from None
    return page


@get("/api/jobs/{job_id:str}", summary="Job status", tags=["jobs"])
async def get_job(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> JSONDict:
    h.check_job_id(job_id)
    caller = h.tenant(request, container.settings)
    view = await container.service.view(job_id, read_scope(container.settings, caller))
    if view is None:
        raise NotFoundException("job not found")
    view["streamUrl"] = stream_url(stream_tokens(container.settings), job_id, caller)
    return view


@get("/api/jobs/{job_id:str}/stream", summary="Job events (Server-Sent Events)", tags=["jobs"])
async def stream_job(
    request: Request[Any, Any, Any],
    container: h.ContainerDep,
    job_id: FromPath[str],
    last_event_id_query: Annotated[str | None, QueryParameter(name="lastEventId")] = None,
    token: Annotated[
        str | None, QueryParameter(description="the short-lived token of the job's `streamUrl`")
    ] = None,
    deltas: Annotated[
        str | None, QueryParameter(description="0 leaves out the live `delta` events", pattern="^[01]$")
    ] = None,
) -> ServerSentEvent:
    """The job's events. Opens with the ``token`` of the job's ``streamUrl`` (EventSource
    cannot send headers) or with a key header."""
    settings = container.settings
    h.check_job_id(job_id)
    scope = read_scope(settings, resolve_stream_tenant(request, settings, job_id, token))
    if await container.service.get(job_id, scope) is None:
        raise NotFoundException("job not found")

    async def load_job() -> Any:
        return await container.service.get(job_id, scope)

    after = last_event_id(request.headers.get("last-event-id"), last_event_id_query)
    return sse_response(
        job_events(
            container.store,
            job_id,
            after,
            heartbeat_s=settings.sse_heartbeat_s,
            window_s=settings.sse_window_s,
            deltas=deltas != "0",
            load_job=load_job,
        )
    )


@get("/api/jobs/{job_id:str}/artifacts", summary="Artifact metadata of a job", tags=["artifacts"])
async def list_artifacts(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> JSONDict:
    h.check_job_id(job_id)
    items = await container.service.artifacts(job_id, h.reader(request, container.settings))
    if items is None:
        raise NotFoundException("job not found")
    return {"jobId": job_id, "artifacts": items, "count": len(items)}


@get("/api/jobs/{job_id:str}/artifacts/{name:str}", summary="One artifact", tags=["artifacts"])
async def get_artifact(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str], name: FromPath[str]
) -> JSONDict:
    h.check_job_id(job_id)
    scope = h.reader(request, container.settings)
    item = await container.service.artifact(job_id, scope, h.check_artifact(name))
    if item is None:
        raise NotFoundException("artifact not found")
    result: JSONDict = item
    return result


@get(
    "/api/jobs/{job_id:str}/dossier.md",
    media_type="text/markdown",
    summary="The dossier as Markdown",
    tags=["artifacts"],
)
async def get_dossier_markdown(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> Response[Any]:
    """The ``dossier`` artifact rendered as Markdown; 409 while the job has none."""
    h.check_job_id(job_id)
    scope = h.reader(request, container.settings)
    job = await container.service.get(job_id, scope)
    if job is None:
        raise NotFoundException("job not found")
    item = await container.service.artifact(job_id, scope, "dossier")
    if item is None:
        message = f"the job is {job.status} and has no dossier yet"
        return Response(
            {"error": "no_dossier", "message": message}, status_code=409, media_type=MediaType.JSON
        )
    filename = f"{slug(item['data'].get('title'))}.md"
    return Response(
        render_markdown(item["data"]),
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


@post("/api/jobs/{job_id:str}/cancel", status_code=200, summary="Cancel a job", tags=["jobs"])
async def cancel_job(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> Response[JSONDict]:
    """Idempotent. Queued -> cancelled now; running -> the worker stops; finished -> unchanged."""
    h.check_job_id(job_id)
    job = await container.service.cancel(job_id, h.reader(request, container.settings))
    if job is None:
        raise NotFoundException("job not found")
    finished = job.status in TERMINAL_STATUSES
    message = (
        "job cancelled"
        if job.status == "cancelled"
        else f"job already {job.status}"
        if finished
        else "cancellation requested"
    )
    return Response(
        {"jobId": job.id, "status": job.status, "message": message},
        status_code=200 if finished else 202,
    )


@get("/api/jobs/{job_id:str}/trace", summary="Every LLM call of a job", tags=["jobs"])
async def get_trace(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> JSONDict:
    h.check_job_id(job_id)
    trace = await container.service.trace(job_id, h.reader(request, container.settings))
    if trace is None:
        raise NotFoundException("job not found")
    result: JSONDict = trace
    return result


ROUTES = [
    create_job,
    list_jobs,
    get_job,
    stream_job,
    list_artifacts,
    get_artifact,
    get_dossier_markdown,
    cancel_job,
    get_trace,
]
