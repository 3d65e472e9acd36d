"""Client-side helpers for the contract tests: submit, wait, read SSE raw."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

LLM_STEPS = (
    "evidence",
    "brief",
    "problem",
    "solution",
    "team",
    "market",
    "status_quo",
    "business_model",
    "competition",
    "gtm",
    "financial_plan",
    "investor_score",
)
ARTIFACT_NAMES = (
    "pitch",
    "sources",
    "brief",
    "section_problem",
    "section_solution",
    "section_team",
    "section_market",
    "section_status_quo",
    "section_business_model",
    "section_competition",
    "section_gtm",
    "section_financial_plan",
    "validation",
    "investor_score",
    "dossier",
)
TERMINAL = ("completed", "failed", "cancelled")
WAIT_S = 90.0
"""Safety net for waits (never an assertion about speed)."""


def canonical_hash(value: Any) -> str:
    raw = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def body(**overrides: Any) -> dict[str, Any]:
    """A valid job body with a title no other test uses (so no cache crosstalk)."""
    tag = uuid.uuid4().hex[:8]
    return {
        "project_title": f"Solar Mesh {tag}",
        "elevator_pitch": f"Community solar micro-grids for rural schools ({tag}). "
        "We lease panels and batteries and sell power by the kWh.",
        "language": "en",
        **overrides,
    }


def submit(client: httpx.Client, headers: dict[str, str] | None = None, **overrides: Any) -> str:
    response = client.post("/api/jobs", json=body(**overrides), headers=headers or {})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["jobId"]
    return job_id


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def wait_for(
    client: httpx.Client,
    job_id: str,
    statuses: tuple[str, ...] = TERMINAL,
    timeout_s: float = WAIT_S,
) -> dict[str, Any]:
    """Poll until the job's status is one of ``statuses``."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = get_job(client, job_id)
        if view["status"] in statuses:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {view['status']}, wanted {statuses}")
        time.sleep(0.05)


def wait_until(predicate: Any, what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def job_count(client: httpx.Client) -> int:
    """Every job the deployment holds (all tenants), from the stats endpoint."""
    response = client.get("/api/jobs/stats")
    assert response.status_code == 200, response.text
    return sum(response.json()["jobs"].values())


@dataclass
class SseEvent:
    id: int | None
    event: str
    data: Any


@dataclass
class SseStream:
    """Everything one SSE response carried, in order."""

    status_code: int
    headers: httpx.Headers
    retry: int | None = None
    first_field: str | None = None
    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[Any]:
        return [e.data for e in self.events if e.event == kind]

    @property
    def ids(self) -> list[int | None]:
        return [e.id for e in self.events]


def read_stream(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: int | None = None,
    via: str = "header",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = WAIT_S,
) -> SseStream:
    """Read ``/stream`` until the server ends it, parsing the wire format by hand."""
    headers = dict(headers or {})
    params = dict(params or {})
    if last_event_id is not None:
        if via == "header":
            headers["Last-Event-ID"] = str(last_event_id)
        else:
            params["lastEventId"] = str(last_event_id)
    url = f"/api/jobs/{job_id}/stream"
    with client.stream("GET", url, headers=headers, params=params, timeout=timeout_s) as response:
        result = SseStream(response.status_code, response.headers)
        if response.status_code != 200:
            response.read()
            return result
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if "event" in fields or "data" in fields:
                    raw = fields.get("data")
                    result.events.append(
                        SseEvent(
                            int(fields["id"]) if "id" in fields else None,
                            fields.get("event", "message"),
                            json.loads(raw) if raw else None,
                        )
                    )
                fields = {}
                continue
            if line.startswith(":"):
                result.comments.append(line[1:].strip())
                result.first_field = result.first_field or "comment"
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            result.first_field = result.first_field or name
            if name == "retry":
                result.retry = int(value)
            elif name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            else:
                fields[name] = value
    return result


def trace(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/jobs/{job_id}/trace")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def llm_calls(trace_body: dict[str, Any]) -> list[dict[str, Any]]:
    """Trace records of real provider calls (cache hits excluded)."""
    return [c for c in trace_body["calls"] if not c.get("cache_hit")]


def max_overlap(calls: list[dict[str, Any]], slack_ms: float = 2.0) -> int:
    """Most provider calls in flight at once, from each record's end ``ts`` and
    ``duration_ms`` (shrunk by ``slack_ms`` at both ends for clock rounding)."""
    edges: list[tuple[float, int]] = []
    for c in calls:
        end = float(c["ts"])
        start = end - float(c["duration_ms"])
        if end - start > 2 * slack_ms:
            edges += [(start + slack_ms, 1), (end - slack_ms, -1)]
    edges.sort(key=lambda e: (e[0], e[1]))
    best = running = 0
    for _, delta in edges:
        running += delta
        best = max(best, running)
    return best
