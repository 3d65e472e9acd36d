"""The Lambda HTTP handler (Mangum around the Litestar app) with API Gateway v2 events.

Events have the shape an HTTP API (payload format 2.0) sends; the store and queue
are S3 and SQS on moto's server mode, and jobs run through ``sqs_handler``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from handlers import aws
from pipeline.vocabulary import JobStatus
from tests.support.moto_server import aws_backend_env


class LambdaContext:
    def __init__(self, remaining_ms: int = 29_000) -> None:
        self.ends_at = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = "jobq-dev-api"

    def get_remaining_time_in_millis(self) -> int:
        return int((self.ends_at - time.monotonic()) * 1000)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    values = aws_backend_env(f"h{uuid.uuid4().hex[:10]}")
    for key in list(os.environ):
        if key.startswith(("LLM_", "OPENAI_", "ANTHROPIC_", "REDIS", "SSE_", "API_KEYS")):
            monkeypatch.delenv(key)
    for key, value in {**values, "LOG_LEVEL": "warning", "SUBMIT_RATE_PER_MIN": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(aws, "_http", None)
    monkeypatch.setattr(aws, "_worker", None)
    yield values
    for runtime in (aws._http, aws._worker):
        if runtime is not None:
            runtime.loop.run_until_complete(runtime.container.close())
            runtime.loop.close()
    asyncio.set_event_loop(None)


def api_event(
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    query: str = "",
) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event, as Lambda receives it."""
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {
            "host": "abc123.execute-api.us-east-1.amazonaws.com",
            "user-agent": "pytest",
            "x-forwarded-for": "198.51.100.7",
            "x-forwarded-port": "443",
            "x-forwarded-proto": "https",
            **(headers or {}),
        },
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "abc123",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "198.51.100.7",
                "userAgent": "pytest",
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if query:
        event["queryStringParameters"] = dict(p.split("=", 1) for p in query.split("&"))
    if body is not None:
        event["body"] = json.dumps(body)
        event["headers"]["content-type"] = "application/json"
    return event


def _call(event: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    reply = aws.http_handler(event, LambdaContext())
    body = reply.get("body", "")
    if reply.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return int(reply["statusCode"]), {k.lower(): v for k, v in reply["headers"].items()}, body


def _sse_ids_and_types(body: str) -> list[tuple[int, str]]:
    found = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
        )
        if "id" in fields and "event" in fields:
            found.append((int(fields["id"]), fields["event"]))
    return found


def _run_queued_jobs(count: int) -> None:
    runtime = aws._worker_runtime()
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        messages += runtime.loop.run_until_complete(runtime.queue.receive(count, 1))
    event = aws.sqs_event(messages, "arn:aws:sqs:us-east-1:123456789012:jobs", "us-east-1")
    assert aws.sqs_handler(event, LambdaContext(120_000)) == {"batchItemFailures": []}


def _pitch() -> dict[str, Any]:
    return {"project_title": f"Lambda {uuid.uuid4().hex[:8]}", "pitch": "Serverless pitch."}


def test_post_then_get_a_job_through_api_gateway_events(env: dict[str, str]) -> None:
    """POST /api/jobs answers 202 with a Location and a queued SQS message; GET shows the job."""
    status, headers, body = _call(api_event("POST", "/api/jobs", _pitch()))
    assert status == 202, body
    created = json.loads(body)
    job_id = created["jobId"]
    assert created["status"] == JobStatus.QUEUED
    assert headers["location"].endswith(f"/api/jobs/{job_id}")
    status, _, body = _call(api_event("GET", f"/api/jobs/{job_id}"))
    assert status == 200
    view = json.loads(body)
    assert (view["jobId"], view["status"]) == (job_id, JobStatus.QUEUED)
    _run_queued_jobs(1)
    status, _, body = _call(api_event("GET", f"/api/jobs/{job_id}"))
    done = json.loads(body)
    assert done["status"] == JobStatus.COMPLETED and done["result"]["success"] is True
    assert done["progress"]["percentage"] == 100 and "dossier" in done["artifacts"]


def test_bad_requests_and_unknown_jobs_get_json_errors(env: dict[str, str]) -> None:
    """A 400 carries field details and an unknown id is a JSON 404, through Mangum."""
    status, _, body = _call(api_event("POST", "/api/jobs", {"project_title": " "}))
    assert status == 400
    assert {d["field"] for d in json.loads(body)["details"]} >= {"project_title"}
    status, _, body = _call(api_event("GET", f"/api/jobs/{uuid.uuid4()}"))
    assert status == 404 and "error" in json.loads(body)


def test_adapters_are_built_once_per_instance(env: dict[str, str]) -> None:
    """Several invocations share one container: the store and queue are not rebuilt per request."""
    _call(api_event("GET", "/api/jobs/health"))
    first = aws._http
    status, _, body = _call(api_event("GET", "/api/jobs/health"))
    assert status == 200, body
    assert aws._http is first and first is not None
    assert first.container.queue.name == "aws"


def test_sse_defaults_to_a_25_second_window_on_lambda(env: dict[str, str]) -> None:
    """With SSE_WINDOW_S unset the Lambda app streams in bounded 25 s windows."""
    _call(api_event("GET", "/api/jobs/health"))
    assert aws._http is not None
    assert aws._http.container.settings.sse_window_s == 25.0


def test_sse_window_ends_an_unfinished_stream_and_reconnect_resumes(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffered SSE answer ends after its window; a Last-Event-ID reconnect gets the rest."""
    monkeypatch.setenv("SSE_WINDOW_S", "1")
    _, _, body = _call(api_event("POST", "/api/jobs", _pitch()))
    job_id = json.loads(body)["jobId"]
    status, headers, first = _call(api_event("GET", f"/api/jobs/{job_id}/stream"))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert first.startswith("retry:")
    seen = _sse_ids_and_types(first)
    assert seen and all(kind != "done" for _, kind in seen)
    _run_queued_jobs(1)
    last = seen[-1][0]
    _, _, rest = _call(
        api_event("GET", f"/api/jobs/{job_id}/stream", headers={"last-event-id": str(last)})
    )
    more = _sse_ids_and_types(rest)
    assert [i for i, _ in more] == list(range(last + 1, last + 1 + len(more)))
    assert more[-1][1] == "done"
    _, _, replay = _call(api_event("GET", f"/api/jobs/{job_id}/stream", query="lastEventId=0"))
    assert _sse_ids_and_types(replay) == seen + more
