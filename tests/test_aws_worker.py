"""The SQS Lambda handler and ``jobq worker`` on the aws backend, over moto's server mode.

Events are built from messages really received from SQS, in the shape Lambda's
SQS event source delivers; jobs run the real pipeline with the offline provider.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from handlers import aws
from handlers.bootstrap import bootstrap
from handlers.settings import Settings
from pipeline.model import Job, LLMReply, LLMRequest, StoreUnavailable
from pipeline.offline import OfflineProvider
from pipeline.ports import TextSink
from pipeline.vocabulary import JobStatus
from tests.support.moto_server import TEST_MAX_RECEIVE_COUNT, aws_backend_env

ROOT = Path(__file__).resolve().parents[1]


class LambdaContext:
    """The fields of Lambda's context object the handler reads."""

    def __init__(self, remaining_ms: int = 120_000) -> None:
        self.ends_at = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = "jobq-dev-worker"

    def get_remaining_time_in_millis(self) -> int:
        return int((self.ends_at - time.monotonic()) * 1000)


CRASH_MARKER = "CRASH-ME"


class OutageForMarkedJobs:
    """The offline provider, except that jobs whose title holds ``CRASH_MARKER`` meet a
    store outage mid-step. The runner lets ``StoreUnavailable`` escape (the delivery
    must be retried, not the job failed), so such a delivery crashes on every attempt."""

    name = "offline"

    def __init__(self) -> None:
        self.inner = OfflineProvider()

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        if CRASH_MARKER in json.dumps(request.context):
            raise StoreUnavailable("s3: connection reset (injected for this job)")
        return await self.inner.complete(request, on_text)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A fresh bucket, queue and DLQ; the process environment points at them. The worker
    runtime (as a Lambda instance would build it) runs :class:`OutageForMarkedJobs`."""
    values = aws_backend_env(f"w{uuid.uuid4().hex[:10]}", visibility_timeout_s=30)
    for key in list(os.environ):
        if key.startswith(("LLM_", "OPENAI_", "ANTHROPIC_", "REDIS")):
            monkeypatch.delenv(key)
    for key, value in {**values, "SQS_RETRY_DELAY_S": "0", "LOG_LEVEL": "warning"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(aws, "_worker", None)
    loop = asyncio.new_event_loop()
    container = bootstrap(Settings.from_env(), llm=OutageForMarkedJobs())
    loop.run_until_complete(container.open())
    monkeypatch.setattr(aws, "_worker", aws._WorkerRuntime(container, loop))
    yield values
    if aws._worker is not None:
        aws._worker.loop.run_until_complete(aws._worker.container.close())
        aws._worker.loop.close()


def _run(coro: Any) -> Any:
    return aws._worker_runtime().loop.run_until_complete(coro)


def _body(tag: str) -> dict[str, Any]:
    return {"project_title": f"Test {tag} {uuid.uuid4().hex[:8]}", "elevator_pitch": "A pitch."}


def _submit(body: dict[str, Any]) -> str:
    job, created = _run(aws._worker_runtime().container.service.submit(body, "public"))
    assert created
    return str(job.id)


def _submit_broken() -> str:
    """A job whose every run crashes (see :class:`OutageForMarkedJobs`)."""
    return _submit(_body(CRASH_MARKER))


def _receive(expect: int) -> dict[str, Any]:
    """Receive ``expect`` messages and shape them like Lambda's SQS event."""
    runtime = aws._worker_runtime()
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(messages) < expect and time.monotonic() < deadline:
        messages += _run(runtime.queue.receive(expect - len(messages), 1))
    assert len(messages) == expect
    return aws.sqs_event(messages, _run(runtime.queue.arn()), "us-east-1")


def _job(job_id: str) -> Job:
    job: Job | None = _run(aws._worker_runtime().container.store.get(job_id))
    assert job is not None
    return job


def _job_of(record: dict[str, Any]) -> str:
    return str(json.loads(record["body"])["job_id"])


def test_sqs_handler_completes_the_jobs_of_an_event(env: dict[str, str]) -> None:
    """A batch of two deliveries runs both jobs to completion and reports no failure."""
    ids = {_submit(_body("a")), _submit(_body("b"))}
    event = _receive(2)
    assert {_job_of(r) for r in event["Records"]} == ids
    assert event["Records"][0]["attributes"]["ApproximateReceiveCount"] == "1"
    reply = aws.sqs_handler(event, LambdaContext())
    assert reply == {"batchItemFailures": []}
    for job_id in ids:
        job = _job(job_id)
        assert job.status == JobStatus.COMPLETED and job.attempts == 1
        assert job.result is not None and job.result["success"] is True
        events = _run(aws._worker_runtime().container.store.read_events(job_id))
        assert events[-1].type == "done" and events[-1].data == {"status": JobStatus.COMPLETED}


def test_a_crashing_job_is_the_only_failure_reported(env: dict[str, str]) -> None:
    """In a batch with a good and a crashing job, only the crash's messageId comes back."""
    good = _submit(_body("good"))
    bad = _submit_broken()
    event = _receive(2)
    bad_message = next(r["messageId"] for r in event["Records"] if _job_of(r) == bad)
    reply = aws.sqs_handler(event, LambdaContext())
    assert reply == {"batchItemFailures": [{"itemIdentifier": bad_message}]}
    assert _job(good).status == JobStatus.COMPLETED
    assert _job(bad).status == JobStatus.RUNNING  # handed back for another delivery, not ended
    again = _receive(1)["Records"][0]
    assert _job_of(again) == bad and again["attributes"]["ApproximateReceiveCount"] == "2"


def test_a_poison_message_goes_to_the_dlq_and_fails_its_job(env: dict[str, str]) -> None:
    """A job crashing on every delivery ends failed (worker_lost); its message is in the DLQ."""
    bad = _submit_broken()
    for delivery in range(1, TEST_MAX_RECEIVE_COUNT + 1):
        event = _receive(1)
        record = event["Records"][0]
        assert record["attributes"]["ApproximateReceiveCount"] == str(delivery)
        reply = aws.sqs_handler(event, LambdaContext())
        assert reply == {"batchItemFailures": [{"itemIdentifier": record["messageId"]}]}
        expected = JobStatus.FAILED if delivery == TEST_MAX_RECEIVE_COUNT else JobStatus.RUNNING
        assert _job(bad).status == expected
    job = _job(bad)
    assert job.error is not None and job.error["code"] == "worker_lost"
    assert _run(aws._worker_runtime().queue.receive(1, 1)) == []
    sqs = boto3.client("sqs", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    dlq = sqs.get_queue_url(QueueName=env["JOBS_QUEUE_URL"][6:].replace("-jobs", "-dlq"))
    dead = sqs.receive_message(QueueUrl=dlq["QueueUrl"], WaitTimeSeconds=1)["Messages"]
    assert [json.loads(m["Body"])["job_id"] for m in dead] == [bad]
    events = _run(aws._worker_runtime().container.store.read_events(bad))
    assert [e.type for e in events[-2:]] == ["error", "done"]
    assert events[-2].data["code"] == "worker_lost"


def test_a_job_never_outlives_the_invocation(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With little Lambda time left, the job fails with 'timeout' (a normal end, not a retry)."""
    monkeypatch.setenv("LLM_OFFLINE_LATENCY_MS", "400")
    assert aws._worker is not None
    aws._worker.loop.run_until_complete(aws._worker.container.close())
    aws._worker.loop.close()
    monkeypatch.setattr(aws, "_worker", None)  # rebuilt from the environment, as on Lambda
    job_id = _submit(_body("slow"))  # its own deadline is the default 300 s
    event = _receive(1)
    context = LambdaContext(remaining_ms=int(aws.DEADLINE_MARGIN_S * 1000) + 1200)
    reply = aws.sqs_handler(event, context)
    assert reply == {"batchItemFailures": []}
    job = _job(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "timeout"
    assert "Lambda timeout" in job.error["message"]
    assert context.get_remaining_time_in_millis() > 0


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, **env}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "handlers.cli", "worker"],
            cwd=ROOT,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait(predicate: Any, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{log.read_text()[-3000:]}")


def test_a_job_whose_worker_dies_is_redelivered_and_resumed(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Kill -9 a `jobq worker` mid-job: SQS redelivers; a new worker resumes, redoing no step."""
    worker_env = {
        **env,
        "SQS_VISIBILITY_TIMEOUT_S": "3",
        "LLM_OFFLINE_LATENCY_MS": "150",
        "LOG_LEVEL": "info",
    }
    log = tmp_path / "worker.log"
    store = aws._worker_runtime().container.store
    job_id = _submit({**_body("resume"), "parallel_limit": 1})
    first = _worker(worker_env, log)
    try:
        _wait(lambda: len(_run(store.list_artifacts(job_id))) >= 3, 30, "3 artifacts", log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    done_before = {a.name for a in _run(store.list_artifacts(job_id))}
    assert _job(job_id).status == JobStatus.RUNNING
    second = _worker(worker_env, log)
    try:
        _wait(lambda: _job(job_id).status == JobStatus.COMPLETED, 60, "completion", log)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    job = _job(job_id)
    assert job.attempts == 2
    trace = _run(store.get_trace(job_id))
    llm_calls: dict[str, int] = {}
    for record in trace:
        if not record.get("cache_hit"):
            llm_calls[record["step"]] = llm_calls.get(record["step"], 0) + 1
    artifacts_of = {"sources": "evidence", "brief": "brief"}
    for name in done_before:
        step = artifacts_of.get(name, name.removeprefix("section_"))
        assert llm_calls.get(step, 0) <= 1, f"{step} ran again after resuming"
    events = _run(store.read_events(job_id))
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events].count("done") == 1


def test_worker_stats_report_queue_depths_honestly(env: dict[str, str]) -> None:
    """stats() counts waiting messages, has no worker count (Lambda scales) and sees the DLQ."""
    _submit(_body("stats"))
    _submit(_body("stats"))
    stats = _run(aws._worker_runtime().queue.stats())
    assert stats["queued"] == 2 and stats["in_flight"] == 0
    assert stats["workers"] is None and stats["worker_kind"] == "lambda"
    assert stats["dead_letter"] == 0
    assert _job(_submit(_body("stats"))).status == JobStatus.QUEUED
