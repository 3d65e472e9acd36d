"""The job API (SPEC §4): thin handlers over ``JobService``."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import ServerSentEvent

from handlers import api_models as m
from handlers import http_common as h
from handlers.auth import job_stream_url, read_scope, resolve_stream_tenant
from handlers.sse import job_events, last_event_id, sse_response
from handlers.strict_body import StrictBody
from pipeline.dossier_markdown import render_markdown, slug
from pipeline.vocabulary import TERMINAL_STATUSES

JSONDict = dict[str, Any]


def job_location(job_id: str) -> str:
    return f"/api/jobs/{job_id}"


@post(
    "/api/jobs",
    status_code=202,
    summary="Create a job",
    tags=["jobs"],
    before_request=h.submit_checks,
    dto=StrictBody[m.JobRequest],
    return_dto=None,
    responses=m.responses(
        {202: (m.JobAccepted, "Accepted; `Location` is the job's status URL")}, 400, 401, 413, 415, 429, 503
    ),
)
async def create_job(
    request: Request[Any, Any, Any],
    data: JSONBody[m.JobRequest],
    container: h.ContainerDep,
    metrics: h.MetricsDep,
    idempotency_key: h.IdempotencyKeyHeader = None,
) -> Response[JSONDict]:
    """Accept a job at once; the worker runs it. Same ``Idempotency-Key`` -> same job."""
    caller, key = h.submitter(request)
    job, created = await container.service.submit(msgspec.structs.asdict(data), caller, key)
    if created:
        metrics.submitted.labels(endpoint="jobs").inc()
    message = "job accepted" if created else "job already exists for this Idempotency-Key"
    stream = job_stream_url(container.settings, job.id, caller)
    return Response(
        {"jobId": job.id, "status": job.status, "message": message, "streamUrl": stream},
        status_code=202,
        headers={"Location": job_location(job.id), "Idempotent-Replayed": str(not created).lower()},
    )


@get(
    "/api/jobs",
    summary="List the caller's recent jobs",
    tags=["jobs"],
    responses=m.responses({200: (m.JobList, "Newest first")}, 400, 401, 503),
)
async def list_jobs(
    request: Request[Any, Any, Any],
    container: h.ContainerDep,
    status: Annotated[
        m.StatusName | None, QueryParameter(description="Only jobs in this status")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200, description="Page size")] = 20,
    cursor: Annotated[
        str | None, QueryParameter(description="`nextCursor` of the previous page", max_length=200)
    ] = None,
) -> JSONDict:
    scope = h.reader(request, container.settings)
    try:
        page: JSONDict = await container.service.list(scope, status, limit, cursor)
    except ValueError:
        raise h.InvalidBody(
            "invalid query", extra=[{"field": "cursor", "message": "not a cursor this API issued"}]
        ) from None
    return page


@get(
    "/api/jobs/{job_id:str}",
    summary="Job status",
    tags=["jobs"],
    responses=m.responses({200: (m.Job, "The job")}, 400, 401, 404, 503),
)
async def get_job(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> JSONDict:
    h.check_job_id(job_id)
    caller = h.tenant(request, container.settings)
    view = await container.service.view(job_id, read_scope(container.settings, caller))
    if view is None:
        raise NotFoundException("job not found")
    view["streamUrl"] = job_stream_url(container.settings, job_id, caller)
    return view


@get(
    "/api/jobs/{job_id:str}/stream",
    summary="Job events (Server-Sent Events)",
    tags=["jobs"],
    responses={
        200: ResponseSpec(
            data_container=m.StreamEventData,
            media_type="text/event-stream",
            description=m.STREAM_DESCRIPTION,
            generate_examples=False,
        ),
        **m.responses({}, 400, 401, 404, 503),
    },
)
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
    if not await container.service.visible(job_id, scope):
        raise NotFoundException("job not found")

    async def load_job() -> Any:
        return await container.service.get(job_id, scope)

    after = last_event_id(h.raw_header(request, b"last-event-id"), last_event_id_query)
    heartbeat_s = settings.sse_heartbeat_s
    return sse_response(
        job_events(
            container.store,
            job_id,
            after,
            heartbeat_s=heartbeat_s,
            window_s=settings.sse_window_s,
            deltas=deltas != "0",
            load_job=load_job,
        ),
        job_id,
        heartbeat_s,
    )


@get(
    "/api/jobs/{job_id:str}/artifacts",
    summary="Artifact metadata of a job",
    tags=["artifacts"],
    responses=m.responses({200: (m.ArtifactList, "The job's artifacts")}, 400, 401, 404, 503),
)
async def list_artifacts(
    request: Request[Any, Any, Any], container: h.ContainerDep, job_id: FromPath[str]
) -> JSONDict:
    h.check_job_id(job_id)
    items = await container.service.artifacts(job_id, h.reader(request, container.settings))
    if items is None:
        raise NotFoundException("job not found")
    return {"jobId": job_id, "artifacts": items, "count": len(items)}


@get(
    "/api/jobs/{job_id:str}/artifacts/{name:str}",
    summary="One artifact",
    tags=["artifacts"],
    responses=m.responses({200: (m.ArtifactData, "The artifact with its data")}, 400, 401, 404, 503),
)
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
    responses={
        200: ResponseSpec(
            data_container=str, media_type="text/markdown", description="The dossier", generate_examples=False
        ),
        **m.responses({}, 400, 401, 404, 409, 503),
    },
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
        body = {"error": h.HttpErrorCode.NO_DOSSIER, "message": message}
        return Response(body, status_code=409, media_type=MediaType.JSON)
    filename = f"{slug(item['data'].get('title'))}.md"
    return Response(
        render_markdown(item["data"]),
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


@post(
    "/api/jobs/{job_id:str}/cancel",
    status_code=200,
    summary="Cancel a job",
    tags=["jobs"],
    responses=m.responses(
        {
            200: (m.CancelResult, "The job is finished (cancelled now or before)"),
            202: (m.CancelResult, "Cancellation requested; the worker stops the job"),
        },
        400,
        401,
        404,
        503,
    ),
)
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


@get(
    "/api/jobs/{job_id:str}/trace",
    summary="Every LLM call of a job",
    tags=["jobs"],
    responses=m.responses({200: (m.Trace, "The calls and their totals")}, 400, 401, 404, 503),
)
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
