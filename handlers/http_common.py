"""Shared bits of the HTTP handlers: the app-wide objects they receive by dependency
injection, caller identity, the checks before a submitted body is read and the error body shape
``{"error": code, "message", ...}``."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.exceptions import ClientException, HTTPException, NotFoundException
from litestar.params import HeaderParameter, SkipValidation

from handlers.auth import SubmitRateLimiter, read_scope, resolve_tenant
from handlers.bootstrap import Container
from handlers.metrics import Metrics
from handlers.settings import Settings
from pipeline.model import ARTIFACT_NAME_RE


class HttpErrorCode(StrEnum):
    """``error`` of an HTTP error answer (the README's table of HTTP error codes). A
    failed job's own codes are ``pipeline.vocabulary.ErrorCode``."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NO_DOSSIER = "no_dossier"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    RATE_LIMITED = "rate_limited"
    HTTP_ERROR = "http_error"
    """Any other 4xx Litestar raises."""
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"


HTTP_ERROR_CODES = {
    400: HttpErrorCode.INVALID_REQUEST,
    401: HttpErrorCode.UNAUTHORIZED,
    403: HttpErrorCode.FORBIDDEN,
    404: HttpErrorCode.NOT_FOUND,
    405: HttpErrorCode.METHOD_NOT_ALLOWED,
    413: HttpErrorCode.PAYLOAD_TOO_LARGE,
    415: HttpErrorCode.UNSUPPORTED_MEDIA_TYPE,
    429: HttpErrorCode.RATE_LIMITED,
    503: HttpErrorCode.UNAVAILABLE,
}

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_SUBMITTER = "jobq.submitter"
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


class InvalidBody(ClientException):
    """A 400 whose ``extra`` is the ``details`` list of ``{field, message}``."""


class TooManyRequests(HTTPException):
    status_code = 429


class UnsupportedMediaType(HTTPException):
    status_code = 415


IdempotencyKeyHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        min_length=1,
        max_length=255,
        pattern=IDEMPOTENCY_KEY_RE.pattern,
        description="The same key from the same tenant within 24 h returns the same job",
    ),
]
"""Documents the header; ``submit_checks`` has checked it before the handler runs."""

# Handlers declare these by name; the objects are built once by ``create_app`` and are
# trusted (no validation of the injected value).
ContainerDep = NamedDependency[SkipValidation[Container]]
MetricsDep = NamedDependency[SkipValidation[Metrics]]


def dependencies(container: Container, metrics: Metrics) -> dict[str, Provide]:
    """The app-level ``dependencies`` of ``create_app``: one object each, for every request."""

    def constant(value: object) -> Provide:
        return Provide(lambda: value, use_cache=True, sync_to_thread=False)

    return {"container": constant(container), "metrics": constant(metrics)}


# The caller's identity is no dependency: dependencies resolve before the handler's own
# parameters are validated, so a 401 would then come before a 400 for a bad query.
def tenant(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> str:
    return resolve_tenant(connection, settings)


def reader(request: Request[Any, Any, Any], settings: Settings) -> str | None:
    """The tenant filter for reads (``None`` = all jobs, when auth is off)."""
    return read_scope(settings, tenant(request, settings))


def raw_header(connection: ASGIConnection[Any, Any, Any, Any], name: bytes) -> str | None:
    """A request header (``name`` lower case) read from the ASGI scope, without building
    Litestar's parsed headers, which the scope keeps for as long as the connection (an
    SSE stream's, for as long as it is open)."""
    for key, value in connection.scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def check_job_id(job_id: str) -> str:
    """Ids that could never have been issued are 404 before they reach a key or path."""
    if not JOB_ID_RE.match(job_id):
        raise NotFoundException("job not found")
    return job_id


def check_artifact(name: str) -> str:
    if not ARTIFACT_NAME_RE.match(name):
        raise NotFoundException("artifact not found")
    return name


def rate_limit(limiter: SubmitRateLimiter, caller: str) -> None:
    retry_after = limiter.check(caller)
    if retry_after is not None:
        raise TooManyRequests(
            f"more than {limiter.per_minute} submissions per minute",
            headers={"Retry-After": str(int(retry_after))},
        )


def idempotency_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    raw = connection.headers.get("idempotency-key")
    if raw is None:
        return None
    if not IDEMPOTENCY_KEY_RE.match(raw):
        raise InvalidBody(
            "invalid Idempotency-Key",
            extra=[{"field": "Idempotency-Key", "message": "1-255 visible ASCII characters"}],
        )
    return raw


async def submit_checks(request: Request[Any, Any, Any]) -> None:
    """The checks of a job submission that come before its body is read, in SPEC order:
    401, 429, a bad ``Idempotency-Key`` (400), a body that is not JSON (415). Leaves the
    caller and the key for the handler (:func:`submitter`).

    A ``before_request`` hook rather than a guard: it runs before the body is decoded just
    the same, and Litestar copies the route handler for every guard call (~50 us a request)."""
    container: Container = request.app.state["container"]
    caller = tenant(request, container.settings)
    rate_limit(request.app.state["limiter"], caller)
    key = idempotency_key(request)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"content type {media_type!r} is not supported; send application/json"
        )
    # the scope's state dict itself: ``request.state`` builds a wrapper at each access
    request.scope.setdefault("state", {})[_SUBMITTER] = (caller, key)


def submitter(request: Request[Any, Any, Any]) -> tuple[str, str | None]:
    """(caller, Idempotency-Key) as ``submit_checks`` left them."""
    found: tuple[str, str | None] = request.scope["state"][_SUBMITTER]
    return found


def error_response(
    status: int, code: HttpErrorCode, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response[dict[str, Any]]:
    return Response(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )
