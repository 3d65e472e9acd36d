"""Turn provider SDK exceptions into :class:`LLMError` codes both providers share.

The mapping (SPEC §5: transient errors are retried inside the job's deadline):

=====================================  ======================  =========
cause                                  code                    transient
=====================================  ======================  =========
429                                    ``llm_rate_limited``    yes
401, 403                               ``llm_auth``            no
400, 404, 413, 422, other 4xx          ``llm_bad_request``     no
408, 409, 5xx, 529                     ``llm_unavailable``     yes
connection refused / reset / closed    ``llm_unavailable``     yes
stream cut before its final chunk      ``llm_unavailable``     yes
error event mid-stream                 as its type's status    as above
per-call timeout                       ``timeout``             yes
body that is not the wire format       ``llm_invalid_output``  no
=====================================  ======================  =========

``retry_after`` comes from ``retry-after-ms`` or ``Retry-After`` (seconds or an
HTTP date) on any status that carries it.

Once a stream has begun (status 200) a failure can no longer be a status: it is an
error event (Anthropic ``event: error``, OpenAI a ``{"error": ...}`` chunk) whose
``type`` names the status it stands for (``overloaded_error`` is 529,
``rate_limit_error`` 429, ...; an unknown type counts as a 500), or the connection
failing while the body is read, which some SDK versions pass on as the transport's
own exception (``httpx`` / ``httpx2``), not wrapped.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping

import anthropic
import httpx
import openai

from pipeline.model import LLMError
from pipeline.vocabulary import ErrorCode

RATE_LIMITED = ErrorCode.LLM_RATE_LIMITED
AUTH = ErrorCode.LLM_AUTH
BAD_REQUEST = ErrorCode.LLM_BAD_REQUEST
UNAVAILABLE = ErrorCode.LLM_UNAVAILABLE
INVALID_OUTPUT = ErrorCode.LLM_INVALID_OUTPUT
TIMEOUT = ErrorCode.TIMEOUT

MAX_RETRY_AFTER_S = 3600.0
"""A longer ``Retry-After`` is clamped: the job's deadline ends the wait anyway."""

_TRANSIENT_4XX = frozenset({408, 409, 429})

_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    openai.APITimeoutError,
    anthropic.APITimeoutError,
    TimeoutError,
)
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,
    anthropic.APIConnectionError,
    ConnectionError,
)
try:
    import httpx2
except ImportError:  # pragma: no cover - SDK versions from before httpx2
    pass
else:
    _TIMEOUT_ERRORS += (httpx2.TimeoutException,)
    _CONNECTION_ERRORS += (httpx2.TransportError,)
_TIMEOUT_ERRORS += (httpx.TimeoutException,)
_CONNECTION_ERRORS += (httpx.TransportError,)
_STATUS_ERRORS: tuple[type[BaseException], ...] = (openai.APIStatusError, anthropic.APIStatusError)
_INVALID_BODY_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIResponseValidationError,
    anthropic.APIResponseValidationError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)
_API_ERRORS: tuple[type[BaseException], ...] = (openai.APIError, anthropic.APIError)

STREAM_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "api_error": 500,
    "server_error": 500,
    "overloaded_error": 529,
}
"""HTTP status an error event's ``type`` stands for; any other type counts as 500."""


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta seconds or an
    HTTP date), clamped to ``[0, MAX_RETRY_AFTER_S]``; ``None`` when absent or unreadable.
    ``headers`` must look keys up case-insensitively (httpx headers do) or be lower-case."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw.strip()) / divisor
        except ValueError:
            continue
        if math.isnan(seconds):
            continue
        return _clamp(seconds)
    raw_date = headers.get("retry-after")
    if not raw_date:
        return None
    try:
        parsed = email.utils.parsedate_tz(raw_date)
        if parsed is None:
            return None
        when = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError):
        return None
    return _clamp(when - (time.time() if now is None else now))


def _clamp(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def from_status(
    provider: str,
    step: str,
    status: int,
    headers: Mapping[str, str],
    detail: str = "",
) -> LLMError:
    """The :class:`LLMError` for an HTTP error status of a provider."""
    retry_after = parse_retry_after(headers)
    suffix = f": {detail}" if detail else ""
    if status == 429:
        code, what, transient = RATE_LIMITED, "rate limited", True
    elif status in (401, 403):
        code, what, transient = AUTH, "authentication failed", False
    elif status in _TRANSIENT_4XX or status >= 500:
        code, what, transient = UNAVAILABLE, "unavailable", True
    else:
        code, what, transient = BAD_REQUEST, "bad request", False
    return LLMError(
        code,
        f"{provider}: {what} on step '{step}' ({status}){suffix}",
        transient=transient,
        retry_after=retry_after if transient else None,
        status=status,
    )


def timeout_error(provider: str, step: str, timeout_s: float) -> LLMError:
    return LLMError(
        TIMEOUT,
        f"{provider}: no answer on step '{step}' within {timeout_s:g} s",
        transient=True,
    )


def cut_stream(provider: str, step: str, missing: str, received: int) -> LLMError:
    """A stream that ended without its final chunk (``missing`` names what did not
    come): the answer is incomplete, so it is no answer."""
    return LLMError(
        UNAVAILABLE,
        f"{provider}: stream on step '{step}' ended without its final chunk "
        f"(no {missing}; {received} characters received)",
        transient=True,
    )


def stream_error(provider: str, step: str, body: object) -> LLMError:
    """The :class:`LLMError` for an error event inside a stream that began with 200."""
    error = body.get("error", body) if isinstance(body, dict) else body
    kind = error.get("type") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    status = STREAM_ERROR_STATUS.get(str(kind), 500)
    detail = f"error event mid-stream: {kind or 'untyped'}" + (f": {message}" if message else "")
    mapped = from_status(provider, step, status, {}, detail[:200])
    mapped.status = None  # the HTTP status was 200; ``status`` only ever holds a real one
    return mapped


def invalid_output(provider: str, step: str, why: str) -> LLMError:
    return LLMError(INVALID_OUTPUT, f"{provider}: unreadable reply on step '{step}': {why}")


def classify(provider: str, step: str, exc: BaseException, timeout_s: float) -> LLMError:
    """Map an exception raised while calling a provider SDK to an :class:`LLMError`.

    ``asyncio.CancelledError`` is not an ``Exception`` and never reaches here: a
    cancelled call stays cancelled."""
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, _STATUS_ERRORS):
        response = exc.response  # type: ignore[attr-defined]  # both SDKs' APIStatusError have it
        if response.status_code < 400:  # an error event in a stream that began with 200
            return stream_error(provider, step, getattr(exc, "body", None))
        return from_status(provider, step, response.status_code, response.headers, _detail(exc))
    if isinstance(exc, _TIMEOUT_ERRORS):
        return timeout_error(provider, step, timeout_s)
    if isinstance(exc, _CONNECTION_ERRORS):
        cause = exc.__cause__ or exc.__context__
        reason = type(cause).__name__ if cause is not None else type(exc).__name__
        return LLMError(
            UNAVAILABLE,
            f"{provider}: connection failed on step '{step}' ({reason})",
            transient=True,
        )
    if isinstance(exc, _INVALID_BODY_ERRORS):
        return invalid_output(provider, step, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, _API_ERRORS) and isinstance(getattr(exc, "body", None), dict):
        return stream_error(provider, step, exc.body)  # type: ignore[attr-defined]  # checked above
    return LLMError(
        UNAVAILABLE,
        f"{provider}: unexpected {type(exc).__name__} on step '{step}': {exc}",
        transient=False,
    )


def _detail(exc: BaseException) -> str:
    """The provider's own error message from the body, if it sent one (short)."""
    body = getattr(exc, "body", None)
    message: object = None
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
    text = str(message) if message else ""
    return text[:200]
