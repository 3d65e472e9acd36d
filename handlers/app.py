"""The Litestar application: ``create_app(container)``.

Handlers live in ``routes_jobs`` and ``routes_ops``; this module wires them with
the container's lifecycle, CORS, OpenAPI, metrics and the error shape
``{"error": code, "message": ...}`` for every failure, Litestar's own included.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from handlers.auth import SubmitRateLimiter
from handlers.bootstrap import Container, bootstrap
from handlers.http_common import (
    HTTP_ERROR_CODES,
    HttpErrorCode,
    InvalidBody,
    dependencies,
    error_response,
)
from handlers.metrics import Metrics
from handlers.routes_jobs import ROUTES as JOB_ROUTES
from handlers.routes_ops import ROUTES as OPS_ROUTES
from pipeline.model import StoreUnavailable
from pipeline.request import RequestInvalid

log = structlog.get_logger("jobq.http")



def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status >= 500:
        log.error("http_error", path=request.url.path, status=status, detail=exc.detail)
        code = HTTP_ERROR_CODES.get(status, HttpErrorCode.INTERNAL_ERROR)
        return error_response(status, code, "server error")
    extra: dict[str, Any] = {}
    if isinstance(exc, InvalidBody) and isinstance(exc.extra, list):
        extra["details"] = exc.extra
    elif isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        extra["details"] = [_detail(e) for e in exc.extra if isinstance(e, dict)]
    headers = dict(exc.headers or {})
    code = HTTP_ERROR_CODES.get(status, HttpErrorCode.HTTP_ERROR)
    return error_response(status, code, str(exc.detail), headers=headers, **extra)


def _detail(error: dict[str, Any]) -> dict[str, str]:
    """``{field, message}`` of one of Litestar's validation errors; a missing body is ``body``."""
    field = str(error.get("key", ""))
    message = str(error.get("message", ""))
    if field == "data":  # decoding errors are InvalidBody: what fails here is a missing body
        return {"field": "body", "message": "required"}
    return {"field": field, "message": message}


def _request_invalid(_: Request[Any, Any, Any], exc: RequestInvalid) -> Response[dict[str, Any]]:
    message = "the job request is invalid"
    return error_response(400, HttpErrorCode.INVALID_REQUEST, message, details=exc.details)


def _unavailable(
    request: Request[Any, Any, Any], exc: StoreUnavailable
) -> Response[dict[str, Any]]:
    log.warning("backend_unavailable", path=request.url.path, error=str(exc))
    return error_response(
        503, HttpErrorCode.UNAVAILABLE, "the job store or queue is unreachable", headers={"Retry-After": "5"}
    )


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled_error", path=request.url.path, exc_info=exc)
    return error_response(
        HTTP_500_INTERNAL_SERVER_ERROR, HttpErrorCode.INTERNAL_ERROR, "internal server error"
    )


def create_app(container: Container | None = None) -> Litestar:
    """The web app. ``None`` builds the container from the environment."""
    container = container or bootstrap()
    settings = container.settings
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await container.open()
        # Long-lived start-up objects leave the GC's generations: full collections
        # over them cost ~30 ms pauses that showed as the p99 of POST /api/jobs.
        gc.freeze()
        log.info("web_started", backend=settings.backend, auth=settings.auth_required)
        try:
            yield
        finally:
            await container.close()

    cors = (
        CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Idempotency-Key",
                "Last-Event-ID",
            ],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
            max_age=600,
        )
        if settings.cors_origins
        else None
    )
    limiter = SubmitRateLimiter(settings.submit_rate_per_min)
    return Litestar(
        route_handlers=[*JOB_ROUTES, *OPS_ROUTES],
        lifespan=[lifespan],
        # ``state`` serves the guards, which run before dependencies are resolved.
        state=State({"container": container, "limiter": limiter}),
        dependencies=dependencies(container, metrics),
        exception_handlers={
            HTTPException: _http_error,
            RequestInvalid: _request_invalid,
            StoreUnavailable: _unavailable,
            Exception: _internal,
        },
        cors_config=cors,
        openapi_config=OpenAPIConfig(
            title="jobq",
            version="1.0.0",
            description="Async job API for long LLM pipelines (SPEC §4).",
            path="/schema",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin()],
        ),
        request_max_body_size=settings.max_body_bytes,
        middleware=[metrics.middleware],
        logging_config=None,
        debug=False,
    )
