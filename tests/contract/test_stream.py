"""The SSE stream (SPEC §4): order, ids, resume without gap or duplicate, replay."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import ServiceFactory
from tests.contract.helpers import (
    ARTIFACT_NAMES,
    SseEvent,
    get_job,
    read_stream,
    submit,
    wait_for,
)
from tests.support.service import Service


def test_stream_of_a_job_is_complete_ordered_and_ends_with_done(service: Service) -> None:
    """retry first; ids 1..n; status, 15 artifact_written, result, and done last, then the end."""
    with service.client() as client:
        job_id = submit(client)
        stream = read_stream(client, job_id)
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.first_field == "retry" and stream.retry and stream.retry > 0
    assert stream.ids == list(range(1, len(stream.events) + 1))
    kinds = [e.event for e in stream.events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert stream.events[-1].data == {"status": "completed"}
    assert sorted(a["name"] for a in stream.of("artifact_written")) == sorted(ARTIFACT_NAMES)
    assert len(stream.of("result")) == 1 and stream.of("result")[0]["success"] is True
    assert kinds.index("result") < kinds.index("done")
    statuses = stream.of("status")
    assert statuses[0]["status"] == "queued" and statuses[-1]["status"] == "completed"
    assert all("result" not in s and "artifacts" not in s for s in statuses)
    assert not stream.of("error")


def test_progress_never_goes_down(slow_service: Service) -> None:
    """Across every status event, percentage and currentStep never decrease; with LLM
    calls slower than a store write, the stream moves step by step."""
    with slow_service.client() as client:
        job_id = submit(client, parallel_limit=1)
        stream = read_stream(client, job_id)
    progress = [s["progress"] for s in stream.of("status")]
    # Not vacuous: one step at a time, 200 ms each, and each step's end is its own
    # write (steps finishing faster than the store writes share a write).
    assert len({p["percentage"] for p in progress}) >= 12
    for before, after in itertools.pairwise(progress):
        assert after["percentage"] >= before["percentage"], (before, after)
        assert after["currentStep"] >= before["currentStep"], (before, after)
    assert progress[-1]["percentage"] == 100 and progress[-1]["currentStep"] == 15


@pytest.mark.parametrize("via", ["header", "query"])
def test_reconnect_with_last_event_id_continues_without_gap_or_duplicate(service: Service, via: str) -> None:
    """Resuming after id k (Last-Event-ID header or ?lastEventId=) yields exactly events k+1..n."""
    with service.client() as client:
        job_id = submit(client)
        full = read_stream(client, job_id)
        n = len(full.events)
        for k in (1, n // 2, n - 1):
            rest = read_stream(client, job_id, last_event_id=k, via=via)
            assert rest.ids == list(range(k + 1, n + 1))
            assert [(e.event, e.data) for e in rest.events] == [(e.event, e.data) for e in full.events[k:]]


def test_reconnect_while_running_joins_the_same_sequence(slow_service: Service) -> None:
    """Dropping the stream mid-job, then resuming after the last seen id, loses or repeats none."""
    with slow_service.client() as client:
        job_id = submit(client, parallel_limit=1)
        seen: list[tuple[int, str]] = []
        with client.stream("GET", f"/api/jobs/{job_id}/stream") as response:
            for line in response.iter_lines():
                if line.startswith("id:"):
                    seen.append((int(line[3:].strip()), ""))
                elif line.startswith("event:") and seen:
                    seen[-1] = (seen[-1][0], line[6:].strip())
                if len(seen) >= 6 and seen[-1][1]:
                    break
        assert get_job(client, job_id)["status"] in ("queued", "running")
        rest = read_stream(client, job_id, last_event_id=seen[-1][0])
        whole = read_stream(client, job_id)
    joined = seen + [(e.id, e.event) for e in rest.events]
    assert joined == [(e.id, e.event) for e in whole.events]
    assert joined[-1][1] == "done"


def test_heartbeat_comments_keep_an_idle_stream_alive(slow_service: Service) -> None:
    """While a slow job runs the stream carries comment heartbeats between events."""
    with slow_service.client() as client:
        job_id = submit(client, parallel_limit=1)
        stream = read_stream(client, job_id)
    assert stream.comments, "no heartbeat comment seen"
    assert stream.events[-1].event == "done"


def test_finished_job_replays_final_status_result_and_done(service: Service) -> None:
    """A stream opened after the job finished replays the log through done."""
    with service.client() as client:
        job_id = submit(client)
        wait_for(client, job_id)
        stream = read_stream(client, job_id)
    kinds = [e.event for e in stream.events]
    assert kinds[-3:] == ["status", "result", "done"] or kinds[-2:] == ["result", "done"]
    assert stream.of("status")[-1]["status"] == "completed"


@pytest.mark.parametrize(
    "junk",
    ["\u00b2", "99999999999999999999999", pytest.param("1" * 5000, id="5000-digits"), "-3", "1e3"],
)
def test_a_junk_last_event_id_replays_from_the_start(service: Service, junk: str) -> None:
    """An id the log never issued (other scripts' digits, out of range, signed, float)
    counts as none: the whole log, through done, instead of an error or a broken stream."""
    with service.client() as client:
        job_id = submit(client)
        wait_for(client, job_id)
        whole = read_stream(client, job_id)
        for again in (
            read_stream(client, job_id, headers={"Last-Event-ID": junk.encode()}),  # type: ignore[dict-item]  # httpx sends bytes as they are
            read_stream(client, job_id, params={"lastEventId": junk}),
        ):
            assert again.status_code == 200
            assert [(e.id, e.event) for e in again.events] == [(e.id, e.event) for e in whole.events]


def test_a_reconnect_after_done_is_told_done_at_once(service_factory: ServiceFactory) -> None:
    """A client that saw done and reconnects with its id gets one id-less done right away,
    not a wait for the next heartbeat (here a minute, past the read deadline)."""
    deployment = service_factory({"SSE_HEARTBEAT_S": "60"})
    with deployment.client() as client:
        job_id = submit(client)
        wait_for(client, job_id)
        whole = read_stream(client, job_id)
        again = read_stream(client, job_id, last_event_id=whole.ids[-1], timeout_s=20)
    assert [(e.id, e.event, e.data) for e in again.events] == [(None, "done", {"status": "completed"})]


def test_stream_of_unknown_job_is_404_json(service: Service) -> None:
    """An unknown job id answers 404 with an error body, not an empty stream."""
    with service.client() as client:
        response = client.get("/api/jobs/00000000-0000-0000-0000-000000000000/stream")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_bounded_window_ends_the_response_and_reconnects_see_the_same_sequence(
    service_factory: ServiceFactory,
) -> None:
    """With SSE_WINDOW_S (Lambda) each response ends early; chained reconnects add up to the log."""
    deployment = service_factory(
        {"SSE_WINDOW_S": "0.4", "LLM_OFFLINE_LATENCY_MS": "150", "SSE_HEARTBEAT_S": "0.2"}
    )
    with deployment.client() as client:
        job_id = submit(client, parallel_limit=1)
        collected: list[SseEvent] = []
        last = 0
        responses = 0
        while not collected or collected[-1].event != "done":
            part = read_stream(client, job_id, last_event_id=last)
            assert part.status_code == 200 and part.retry
            responses += 1
            collected += part.events
            last = (collected[-1].id or 0) if collected else 0
            assert responses < 500
        whole = read_stream(client, job_id)
    assert responses > 1, "the window never cut a response short"
    assert [(e.id, e.event, e.data) for e in collected] == [(e.id, e.event, e.data) for e in whole.events]
