"""Prometheus metrics on a registry of their own (one per app, so tests can build
several apps in one process without duplicate-metric errors)."""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.vocabulary import STATUSES


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "jobq_http_requests_total",
            "HTTP requests by method, route and status code.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "jobq_http_request_duration_seconds",
            "Time to the response head, by method and route (SSE streams count until headers).",
            ("method", "route"),
            registry=self.registry,
        )
        self.submitted = Counter(
            "jobq_jobs_submitted_total",
            "Jobs accepted (new jobs only, idempotent replays excluded).",
            ("endpoint",),
            registry=self.registry,
        )
        self.jobs = Gauge("jobq_jobs", "Jobs in the store by status.", ("status",), registry=self.registry)
        self.workers = Gauge("jobq_workers", "Live workers seen by the queue.", registry=self.registry)

    def render(self, counts: dict[str, int], workers: int | None) -> bytes:
        for status in STATUSES:
            self.jobs.labels(status=status).set(counts.get(status, 0))
        if workers is not None:
            self.workers.set(workers)
        return generate_latest(self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Count requests and time them until the response head is sent."""

        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            method = scope["method"]
            start = time.perf_counter()
            status: dict[str, Any] = {"code": 500}

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    self.latency.labels(method, _route(scope)).observe(time.perf_counter() - start)
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            finally:
                self.requests.labels(method, _route(scope), str(status["code"])).inc()

        return wrapped


def _route(scope: Scope) -> str:
    """The route template (``/api/jobs/{job_id:str}``), never the raw path: bounded labels."""
    return str(scope.get("path_template") or "unmatched")
