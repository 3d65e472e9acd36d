"""Shared bits of the HTTP handlers: the container from app state, caller identity,
the JSON body reader and the error body shape ``{"error": code, "message", ...}``."""

from __future__ import annotations

import json
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import ClientException, HTTPException, NotFoundException

from handlers.auth import SubmitRateLimiter, read_scope, resolve_tenant
from handlers.bootstrap import Container
from handlers.metrics import Metrics
from pipeline.model import ARTIFACT_NAME_RE

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


class InvalidBody(ClientException):
    """A 400 whose ``extra`` is the ``details`` list of ``{field, message}``."""


class TooManyRequests(HTTPException):
    status_code = 429


class UnsupportedMediaType(HTTPException):
    status_code = 415


def container(request: Request[Any, Any, Any]) -> Container:
    c: Container = request.app.state.container
    return c


def metrics(request: Request[Any, Any, Any]) -> Metrics:
    m: Metrics = request.app.state.metrics
    return m


def tenant(request: Request[Any, Any, Any]) -> str:
    return resolve_tenant(request, container(request).settings)


def reader(request: Request[Any, Any, Any]) -> str | None:
    """The tenant filter for reads (``None`` = all jobs, when auth is off)."""
    return read_scope(container(request).settings, tenant(request))


def check_job_id(job_id: str) -> str:
    """Ids that could never have been issued are 404 before they reach a key or path."""
    if not JOB_ID_RE.match(job_id):
        raise NotFoundException("job not found")
    return job_id


def check_artifact(name: str) -> str:
    if not ARTIFACT_NAME_RE.match(name):
        raise NotFoundException("artifact not found")
    return name


def rate_limit(request: Request[Any, Any, Any], caller: str) -> None:
    limiter: SubmitRateLimiter = request.app.state.limiter
    retry_after = limiter.check(caller)
    if retry_after is not None:
        raise TooManyRequests(
            f"more than {limiter.per_minute} submissions per minute",
            headers={"Retry-After": str(int(retry_after))},
        )


def idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    if not IDEMPOTENCY_KEY_RE.match(raw):
        raise InvalidBody(
            "invalid Idempotency-Key",
            extra=[{"field": "Idempotency-Key", "message": "1-255 visible ASCII characters"}],
        )
    return raw


async def json_body(request: Request[Any, Any, Any]) -> object:
    """The parsed JSON body. Size limits are enforced by Litestar's
    ``request_max_body_size`` (Content-Length and the bytes actually received)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"content type {media_type!r} is not supported; send application/json"
        )
    raw = await request.body()
    if not raw.strip():
        raise InvalidBody("request body is empty", extra=[{"field": "body", "message": "required"}])
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidBody(
            "request body is not valid JSON",
            extra=[{"field": "body", "message": f"invalid JSON: {exc}"}],
        ) from None
    except RecursionError:
        raise InvalidBody(
            "request body is nested too deeply",
            extra=[{"field": "body", "message": "JSON nested too deeply"}],
        ) from None


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response[dict[str, Any]]:
    return Response(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )
