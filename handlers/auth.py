"""Who is calling (API keys -> tenant; operator keys) and how often they may submit.

With ``API_KEYS`` unset every caller is the default tenant. Keys come in
``Authorization: Bearer <key>`` or ``X-API-Key``, never in a URL (a URL ends up in
access logs, browser history and proxies): ``?api_key=`` is refused. EventSource,
which cannot set headers, opens the job's ``streamUrl`` with its short-lived token
(:mod:`handlers.stream_tokens`). ``/metrics`` and ``/api/jobs/stats`` take a key of
``OPERATOR_KEYS`` instead of a tenant's.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from handlers.settings import Settings
from handlers.stream_tokens import StreamTokens, stream_url
from pipeline.vocabulary import DEFAULT_TENANT


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    auth = connection.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = connection.headers.get("x-api-key", "").strip()
    return key or None


def _matches(presented: str, keys: Iterable[str]) -> str | None:
    """The key of ``keys`` equal to ``presented`` (each compared in constant time), if any."""
    found = None
    for key in keys:
        if hmac.compare_digest(key.encode(), presented.encode()):
            found = key
    return found


def _refuse_key_in_url(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    if "api_key" in connection.query_params:
        raise NotAuthorizedException(
            "API keys are not accepted in URLs; send Authorization: Bearer <key> or X-API-Key, "
            "or open the job's streamUrl"
        )


def resolve_tenant(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> str:
    """The caller's tenant; raises 401 when keys are configured and none matches."""
    if not settings.auth_required:
        return DEFAULT_TENANT
    _refuse_key_in_url(connection)
    presented = _presented_key(connection)
    if presented:
        key = _matches(presented, settings.api_keys)
        if key is not None:
            return settings.api_keys[key]
    raise NotAuthorizedException("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")


def stream_tokens(settings: Settings) -> StreamTokens | None:
    """The signer of stream tokens; ``None`` without ``API_KEYS`` (every stream is open
    then, and ``streamUrl`` is the bare path)."""
    secret = settings.stream_token_secret
    if not (settings.auth_required and secret):
        return None
    return StreamTokens(secret.encode(), settings.stream_token_ttl_s)


def job_stream_url(settings: Settings, job_id: str, tenant: str) -> str:
    """The job's ``streamUrl`` for ``tenant``: with a token when ``API_KEYS`` is set."""
    return stream_url(stream_tokens(settings), job_id, tenant)


def resolve_stream_tenant(
    connection: ASGIConnection[Any, Any, Any, Any], settings: Settings, job_id: str, token: str | None
) -> str:
    """The tenant of a stream request: from ``?token=`` (the job's ``streamUrl``) when
    given, else from the key headers. A token of another job, or an expired one, is 401."""
    if not settings.auth_required:
        return DEFAULT_TENANT
    _refuse_key_in_url(connection)
    if token is None:
        return resolve_tenant(connection, settings)
    tokens = stream_tokens(settings)
    tenant = tokens.verify(token, job_id) if tokens is not None else None
    if tenant is None:
        raise NotAuthorizedException(
            "the stream token is invalid, expired or for another job; fetch the job again for a new streamUrl"
        )
    return tenant


def require_operator(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> None:
    """Operator routes: open without ``API_KEYS``; else a key of ``OPERATOR_KEYS``
    (401 without a known key, 403 for a tenant's key)."""
    if not settings.auth_required:
        return
    _refuse_key_in_url(connection)
    presented = _presented_key(connection)
    if presented and _matches(presented, settings.operator_keys) is not None:
        return
    if presented and _matches(presented, settings.api_keys) is not None:
        raise PermissionDeniedException("this route needs an operator key (OPERATOR_KEYS)")
    raise NotAuthorizedException(
        "an operator key is required (Authorization: Bearer <key> or X-API-Key, from OPERATOR_KEYS)"
    )


def read_scope(settings: Settings, tenant: str) -> str | None:
    """The tenant filter for reads: without auth there is no identity, everyone sees every job."""
    return tenant if settings.auth_required else None


class SubmitRateLimiter:
    """A sliding one-minute window per tenant, in process memory.

    With several web processes each enforces the limit on its own share of the
    traffic; that is a soft limit on purpose (no extra round trip per submit).
    """

    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}

    def check(self, tenant: str) -> float | None:
        """Record a submit; return ``None`` if allowed, else seconds until one is."""
        if self.per_minute <= 0:
            return None
        now = time.monotonic()
        hits = self._hits.setdefault(tenant, deque())
        while hits and now - hits[0] >= self.window_s:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return max(1.0, math.ceil(self.window_s - (now - hits[0])))
        hits.append(now)
        return None
