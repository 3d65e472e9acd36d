"""Live model output (SPEC 7.1): ``delta`` events in the job's one id sequence."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

from tests.conftest import ServiceFactory
from tests.contract.helpers import SseEvent, read_stream, submit

SLOW_CALLS = {"LLM_OFFLINE_LATENCY_MS": "1200"}


def _attempts(events: list[SseEvent]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    by_attempt: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event.event == "delta":
            by_attempt[(event.data["step"], event.data["attempt"])].append(event.data)
    return by_attempt


def test_running_steps_stream_contiguous_deltas_that_a_replay_repeats(
    service_factory: ServiceFactory,
) -> None:
    """A live reader sees each step's text as deltas with contiguous offsets before its
    artifact; a reader after the end sees the same sequence; ?deltas=0 every other event."""
    service = service_factory(SLOW_CALLS)
    with service.client() as client:
        job_id = submit(client, parallel_limit=4)
        live = read_stream(client, job_id)
        late = read_stream(client, job_id)
        quiet = read_stream(client, job_id, params={"deltas": "0"})
    attempts = _attempts(live.events)
    assert len({step for step, _ in attempts}) >= 6, attempts.keys()
    for deltas in attempts.values():
        assert deltas[0]["offset"] == 0
        for before, after in itertools.pairwise(deltas):
            assert after["offset"] == before["offset"] + len(before["text"]), (before, after)
    kinds = [(e.event, e.data.get("step") if e.event == "delta" else e.data.get("name")) for e in live.events]
    for step, _ in attempts:
        artifact = "section_" + step if step not in ("evidence", "brief", "investor_score") else None
        if artifact is not None:
            last_delta = max(i for i, k in enumerate(kinds) if k == ("delta", step))
            assert last_delta < kinds.index(("artifact_written", artifact))
    live_ids = [e.id for e in live.events if e.id is not None]
    assert live_ids == sorted(set(live_ids))
    others = [(e.id, e.event, e.data) for e in live.events if e.event != "delta"]
    assert [(e.id, e.event, e.data) for e in quiet.events] == others
    assert [(e.id, e.event, e.data) for e in late.events] == [(e.id, e.event, e.data) for e in live.events]


def _first_delta(client: Any, job_id: str) -> SseEvent:
    """Read the stream until its first ``delta`` event, then hang up."""
    with client.stream("GET", f"/api/jobs/{job_id}/stream", timeout=60) as response:
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
                continue
            if fields.get("event") == "delta":
                return SseEvent(int(fields["id"]), "delta", json.loads(fields["data"]))
            fields = {}
    raise AssertionError("the stream ended without a delta")


def test_resume_inside_a_running_step_continues_with_the_next_delta(
    service_factory: ServiceFactory,
) -> None:
    """Reconnecting with Last-Event-ID of a delta resumes right after it: the step's
    next delta starts where that one ended (no gap, no duplicate), ids go on rising."""
    service = service_factory(SLOW_CALLS)
    with service.client() as client:
        job_id = submit(client, parallel_limit=1)
        seen = _first_delta(client, job_id)
        rest = read_stream(client, job_id, last_event_id=seen.id)
    assert rest.events and all(e.id is None or e.id > (seen.id or 0) for e in rest.events)
    where = (seen.data["step"], seen.data["attempt"])
    same = [
        e.data for e in rest.events if e.event == "delta" and (e.data["step"], e.data["attempt"]) == where
    ]
    assert same, "the step wrote no further delta"
    assert same[0]["offset"] == seen.data["offset"] + len(seen.data["text"])
