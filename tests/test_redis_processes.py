"""The redis backend as deployed: real `jobq serve` and `jobq worker` processes on real Redis.

Waits carry deadlines only as a safety net; nothing here asserts on speed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract.helpers import (
    LLM_STEPS,
    get_job,
    llm_calls,
    read_stream,
    submit,
    trace,
    wait_for,
    wait_until,
)
from tests.support.redis_server import (
    RedisServer,
    redis_backend_env,
    start_redis,
    stop_redis,
    unique_prefix,
)
from tests.support.service import Service, base_env

TAKE_UP_S = 60.0
"""SPEC: a killed worker's job is taken up within 60 s (seconds with the test timers)."""


class Deployment:
    """Services sharing one Redis and key prefix, stopped at the end of the test."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest, url: str | None) -> None:
        self.tmp_path = tmp_path
        self.request = request
        self.prefix = unique_prefix("p")
        self.url = url
        self.services: list[Service] = []

    def start(self, workers: int = 1, **env: str) -> Service:
        full = {
            **base_env(),
            **redis_backend_env(self.prefix, self.url),
            "LOG_JSON": "true",
            "SUBMIT_RATE_PER_MIN": "0",
            **env,
        }
        log_dir = self.tmp_path / f"svc{len(self.services)}"
        log_dir.mkdir()
        service = Service(backend="redis", env=full, log_dir=log_dir, workers=workers)
        self.services.append(service)
        self.request.node.jobq_services = list(self.services)
        return service.start()

    def stop(self) -> None:
        for service in self.services:
            service.stop()


@pytest.fixture
def deploy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path, request, None)
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis(persistent=True)
    try:
        yield server
    finally:
        stop_redis(server)


def worker_log(service: Service, name: str) -> list[dict[str, Any]]:
    lines = []
    for raw in (service.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return lines


def events_of(service: Service, name: str, event: str, job_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in worker_log(service, name)
        if line.get("event") == event and line.get("job_id") == job_id
    ]


def worker_holding(service: Service, job_id: str) -> str:
    """The worker process whose log says it picked ``job_id`` up."""
    name: str = wait_until(
        lambda: next(
            (n for n in service.worker_names() if events_of(service, n, "job_picked_up", job_id)),
            None,
        ),
        f"a worker picking up {job_id}",
    )
    return name


def completed_steps(view: dict[str, Any]) -> set[str]:
    return {step for step, state in view["steps"].items() if state == "completed"}


def wait_steps(client: httpx.Client, job_id: str, count: int) -> dict[str, Any]:
    """The job's view once at least ``count`` steps have finished."""

    def probe() -> dict[str, Any] | None:
        view = get_job(client, job_id)
        return view if len(completed_steps(view)) >= count else None

    view: dict[str, Any] = wait_until(probe, f"{count} finished steps of {job_id}")
    return view


def ok_calls_per_step(client: httpx.Client, job_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in llm_calls(trace(client, job_id)):
        if call["outcome"] == "ok":
            counts[call["step"]] = counts.get(call["step"], 0) + 1
    return counts


def test_two_workers_share_the_jobs(deploy: Deployment) -> None:
    """Jobs submitted to one web process are spread over two worker processes and all complete."""
    service = deploy.start(workers=2, WORKER_CONCURRENCY="2", LLM_OFFLINE_LATENCY_MS="50")
    with service.client() as client:
        wait_until(lambda: client.get("/api/jobs/stats").json()["workers"] == 2, "two live workers")
        ids = [submit(client) for _ in range(8)]
        for job_id in ids:
            assert wait_for(client, job_id)["status"] == "completed"
    ran_by = {
        name: {line["job_id"] for line in worker_log(service, name) if line.get("event") == "job_picked_up"}
        for name in service.worker_names()
    }
    assert all(ran_by.values()), ran_by
    assert set().union(*ran_by.values()) == set(ids)


def test_sigkilled_worker_job_resumes_on_another_without_repeating_steps(
    deploy: Deployment,
) -> None:
    """kill -9 of the worker mid-job: another worker takes it up, finished steps are not called again."""
    service = deploy.start(workers=2, LLM_OFFLINE_LATENCY_MS="300")
    with service.client() as client:
        job_id = submit(client, parallel_limit=1)
        holder = worker_holding(service, job_id)
        view = wait_steps(client, job_id, 4)
        done_before = completed_steps(view) & set(LLM_STEPS)
        service.kill_worker(holder, signal.SIGKILL)
        final = wait_for(client, job_id, timeout_s=TAKE_UP_S + 30)
        assert final["status"] == "completed", final
        assert final["attempts"] == 2
        calls = ok_calls_per_step(client, job_id)
    survivor = next(n for n in service.worker_names() if n != holder)
    assert events_of(service, survivor, "job_picked_up", job_id)
    assert done_before, "the kill should land after some LLM steps finished"
    assert {step: calls[step] for step in done_before} == dict.fromkeys(done_before, 1)
    assert set(calls) == set(LLM_STEPS)


def test_a_stalled_worker_thawed_after_a_takeover_writes_nothing(deploy: Deployment) -> None:
    """A worker frozen past its heartbeat loses its job to another; thawed, it writes nothing
    more: every artifact is announced once, progress never goes down, the job completes once."""
    service = deploy.start(workers=2, LLM_OFFLINE_LATENCY_MS="300")
    with service.client() as client:
        job_id = submit(client, parallel_limit=1)
        holder = worker_holding(service, job_id)
        survivor = next(n for n in service.worker_names() if n != holder)
        wait_steps(client, job_id, 3)
        service.kill_worker(holder, signal.SIGSTOP)
        try:
            wait_until(
                lambda: events_of(service, survivor, "job_picked_up", job_id),
                "the other worker taking the job over",
                TAKE_UP_S,
            )
            wait_steps(client, job_id, 6)
        finally:
            service.kill_worker(holder, signal.SIGCONT)
        final = wait_for(client, job_id, timeout_s=TAKE_UP_S)
        stream = read_stream(client, job_id)
    assert final["status"] == "completed" and final["attempts"] == 2, final
    announced = [event["name"] for event in stream.of("artifact_written")]
    assert sorted(announced) == sorted(set(announced)) and len(announced) == 15, announced
    percentages = [event["progress"]["percentage"] for event in stream.of("status")]
    assert percentages == sorted(percentages), percentages
    assert len(stream.of("result")) == 1


def test_worker_lost_after_max_attempts(deploy: Deployment) -> None:
    """With JOB_MAX_ATTEMPTS=1, a job whose worker dies is failed with worker_lost, not rerun."""
    service = deploy.start(workers=2, LLM_OFFLINE_LATENCY_MS="300", JOB_MAX_ATTEMPTS="1")
    with service.client() as client:
        job_id = submit(client, parallel_limit=1)
        holder = worker_holding(service, job_id)
        wait_steps(client, job_id, 2)
        service.kill_worker(holder, signal.SIGKILL)
        final = wait_for(client, job_id, timeout_s=TAKE_UP_S + 30)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "worker_lost"


def test_sigterm_lets_a_running_job_finish_and_takes_no_new_one(deploy: Deployment) -> None:
    """On SIGTERM the worker finishes its job within the grace period and leaves new jobs queued."""
    service = deploy.start(workers=1, LLM_OFFLINE_LATENCY_MS="150", WORKER_GRACE_S="30")
    with service.client() as client:
        running = submit(client, parallel_limit=1)
        wait_steps(client, running, 2)
        service.kill_worker("worker0", signal.SIGTERM)  # waits for the process to exit
        late = submit(client)
        finished = get_job(client, running)
        assert finished["status"] == "completed" and finished["attempts"] == 1
        assert get_job(client, late)["status"] == "queued"
        assert events_of(service, "worker0", "job_finished", running)
        assert not events_of(service, "worker0", "job_picked_up", late)
        service.start_worker("worker0")
        assert wait_for(client, late)["status"] == "completed"


def test_sigterm_hands_back_a_job_that_outlives_the_grace(deploy: Deployment) -> None:
    """A job still running when the grace period ends goes back to the queue, stays
    'running', and the next worker resumes it without repeating finished steps. A
    hand-back is not a lost worker: with JOB_MAX_ATTEMPTS=1 the job still completes."""
    service = deploy.start(
        workers=1, LLM_OFFLINE_LATENCY_MS="400", WORKER_GRACE_S="1", JOB_MAX_ATTEMPTS="1"
    )
    with service.client() as client:
        job_id = submit(client, parallel_limit=1)
        view = wait_steps(client, job_id, 3)
        service.kill_worker("worker0", signal.SIGTERM)
        assert get_job(client, job_id)["status"] == "running"
        assert events_of(service, "worker0", "job_handed_back", job_id)
        done_before = completed_steps(view) & set(LLM_STEPS)
        service.start_worker("worker0")
        final = wait_for(client, job_id)
        assert final["status"] == "completed" and final["attempts"] == 2
        calls = ok_calls_per_step(client, job_id)
    assert {step: calls[step] for step in done_before} == dict.fromkeys(done_before, 1)


def test_sse_and_cancel_work_through_a_second_web_process(deploy: Deployment) -> None:
    """A job submitted on web A streams from web B (resumable by Last-Event-ID on A),
    and a cancel sent to web B stops a job running on the worker."""
    first = deploy.start(workers=1, LLM_OFFLINE_LATENCY_MS="100")
    second = deploy.start(workers=0)
    with first.client() as a, second.client() as b:
        job_id = submit(a)
        streamed = read_stream(b, job_id)
        assert streamed.status_code == 200
        ids = streamed.ids
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > 5
        assert streamed.events[-1].event == "done"
        assert streamed.of("result") and streamed.of("result")[0]["success"] is True
        middle = ids[len(ids) // 2]
        resumed = read_stream(a, job_id, last_event_id=middle)
        assert resumed.ids == ids[middle:]
        assert [e.event for e in resumed.events] == [e.event for e in streamed.events[middle:]]

        slow = submit(a, parallel_limit=1)
        wait_until(lambda: get_job(b, slow)["status"] == "running", "the job to start")
        assert b.post(f"/api/jobs/{slow}/cancel").status_code in (200, 202)
        final = wait_for(a, slow)
        assert final["status"] == "cancelled"
        assert len(completed_steps(final)) < 15


def test_redis_restart_during_a_run(
    own_redis: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Redis goes down mid-job: health turns 503 and back to 200 by itself, and the job completes."""
    deployment = Deployment(tmp_path, request, own_redis.url)
    try:
        service = deployment.start(workers=1, LLM_OFFLINE_LATENCY_MS="200")
        with service.client(timeout=10.0) as client:
            job_id = submit(client, parallel_limit=1)
            wait_steps(client, job_id, 3)
            own_redis.stop()
            health = client.get("/api/jobs/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            own_redis.resume()
            wait_until(lambda: client.get("/api/jobs/health").status_code == 200, "health to recover")
            final = wait_for(client, job_id, timeout_s=TAKE_UP_S + 30)
            assert final["status"] == "completed", final
            stats = client.get("/api/jobs/stats").json()
            assert stats["jobs"]["completed"] >= 1
    finally:
        deployment.stop()


def test_an_outage_longer_than_the_write_retries_loses_no_job(
    own_redis: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With Redis away for longer than a store write retries, the deliveries it cut off
    are run again once it is back and every job completes; the worker logs each failure
    as a line of its own, not as an unread task error or a traceback."""
    deployment = Deployment(tmp_path, request, own_redis.url)
    try:
        service = deployment.start(workers=1, LLM_OFFLINE_LATENCY_MS="300", WORKER_CONCURRENCY="4")
        with service.client(timeout=10.0) as client:
            ids = [submit(client, parallel_limit=1) for _ in range(3)]
            for job_id in ids:
                wait_steps(client, job_id, 2)
            own_redis.restart(down_s=8)
            finals = [wait_for(client, job_id, timeout_s=TAKE_UP_S + 30) for job_id in ids]
        assert [f["status"] for f in finals] == ["completed"] * 3, finals
        log_text = (service.log_dir / "worker0.log").read_text()
        assert "never retrieved" not in log_text and "Traceback" not in log_text
    finally:
        deployment.stop()
