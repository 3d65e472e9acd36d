"""Who is calling (API keys -> tenant) and how often they may submit.

With ``API_KEYS`` unset every caller is the default tenant. Keys come in
``Authorization: Bearer <key>`` or ``X-API-Key``; EventSource cannot set headers,
so GET requests also accept ``?api_key=``.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException

from handlers.settings import Settings
from pipeline.vocabulary import DEFAULT_TENANT


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    auth = connection.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = connection.headers.get("x-api-key", "").strip()
    if key:
        return key
    if connection.scope.get("method") == "GET":
        return connection.query_params.get("api_key") or None
    return None


def resolve_tenant(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> str:
    """The caller's tenant; raises 401 when keys are configured and none matches."""
    if not settings.auth_required:
        return DEFAULT_TENANT
    presented = _presented_key(connection)
    if presented:
        for key, tenant in settings.api_keys.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                return tenant
    raise NotAuthorizedException("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")


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
