"""AWS Lambda entry points, and the SQS worker behind ``jobq worker`` on the aws backend.

- ``http_handler``: Mangum around the same Litestar app as everywhere else. The
  container (S3 store, SQS queue, LLM provider) is built once per Lambda instance,
  on first use, and reused by every request that instance serves.
- ``sqs_handler``: runs the jobs of an SQS event concurrently and answers
  ``{"batchItemFailures": [...]}`` naming only the messages to deliver again.
- ``run_sqs_worker``: long-polls SQS and runs the same handler code, so the aws
  backend works locally (against moto) without Lambda.

A delivery fails (is retried) when the run crashed and left the job active, or
when another delivery runs the job; a job the pipeline ended as failed is a
successful delivery. The last
delivery SQS allows (``ApproximateReceiveCount >= JOB_MAX_ATTEMPTS``, the redrive
policy's ``maxReceiveCount``) that fails marks the job ``failed`` with code
``worker_lost``, so a poison message lands in the DLQ with its job ended.

No job outlives its invocation: ``deliver``'s ``deadline_cap`` is the invocation's
remaining time less ``DEADLINE_MARGIN_S``; when the cap bites, the pipeline fails
the job with code ``timeout`` and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from adapters.sqs_queue import SqsQueue
from handlers.bootstrap import Container, bootstrap
from handlers.settings import Settings
from pipeline.delivery import Outcome
from pipeline.model import JSON, StoreUnavailable

log = structlog.get_logger("jobq.aws")

SSE_WINDOW_DEFAULT_S = "25"
"""API Gateway cuts responses at 30 s and Lambda buffers them: SSE answers in windows."""
DEADLINE_MARGIN_S = 5.0
"""Kept free at the end of an invocation to record the outcome and answer SQS."""
"""First back-off of a failed delivery (doubles per receive, capped at ``RETRY_DELAY_MAX_S``)."""
RETRY_DELAY_MAX_S = 900
LOCAL_SLICE_S = 3600.0 + 120.0
"""``jobq worker`` has no invocation limit: this covers the longest ``timeout_ms``."""

# -- the HTTP function ---------------------------------------------------------


@dataclass
class _HttpRuntime:
    container: Container
    loop: asyncio.AbstractEventLoop
    handler: Callable[[JSON, Any], JSON]


_http: _HttpRuntime | None = None


def _http_runtime() -> _HttpRuntime:
    """Build the app once per Lambda instance (module state survives between invocations)."""
    global _http
    if _http is None:
        os.environ.setdefault("SSE_WINDOW_S", SSE_WINDOW_DEFAULT_S)
        from mangum import Mangum

        from handlers.app import create_app

        settings = _settings()
        container = bootstrap(settings)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(container.open())
        # lifespan="off": Mangum would otherwise run the app's startup and shutdown
        # (open and close the container) around every single invocation.
        mangum = Mangum(create_app(container), lifespan="off")  # type: ignore[arg-type]  # Litestar is an ASGI app; Mangum's protocol type is narrower than Litestar's signature
        _http = _HttpRuntime(container, loop, mangum)
        log.info("lambda_http_ready", backend=settings.backend)
    return _http


def http_handler(event: JSON, context: Any) -> JSON:
    """API Gateway (HTTP API, payload 2.0) -> the Litestar app."""
    runtime = _http_runtime()
    asyncio.set_event_loop(runtime.loop)
    return runtime.handler(event, context)


# -- the SQS worker ------------------------------------------------------------


@dataclass
class _WorkerRuntime:
    container: Container
    loop: asyncio.AbstractEventLoop
    in_flight: dict[str, str] = field(default_factory=dict)
    """messageId -> receiptHandle of the records being run (for ``jobq worker``'s heartbeat)."""

    @property
    def settings(self) -> Settings:
        return self.container.settings

    @property
    def queue(self) -> SqsQueue:
        queue = self.container.queue
        if not isinstance(queue, SqsQueue):
            raise RuntimeError("the SQS worker needs JOBS_QUEUE_URL=sqs://...")
        return queue


_worker: _WorkerRuntime | None = None


def _settings() -> Settings:
    from handlers.logging import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_json)
    return settings


def _worker_runtime(settings: Settings | None = None) -> _WorkerRuntime:
    global _worker
    if _worker is None:
        container = bootstrap(settings or _settings())
        loop = asyncio.new_event_loop()
        loop.run_until_complete(container.open())
        _worker = _WorkerRuntime(container, loop)
    return _worker


def _remaining_s(context: Any) -> float | None:
    getter = getattr(context, "get_remaining_time_in_millis", None)
    return None if getter is None else float(getter()) / 1000.0


async def _run_record(runtime: _WorkerRuntime, record: JSON, limit_at: float | None) -> bool:
    """Run one delivery. True: done with the message (delete it); False: deliver again."""
    container = runtime.container
    message_id = str(record.get("messageId", ""))
    receives = int(record.get("attributes", {}).get("ApproximateReceiveCount", "1"))
    last_delivery = receives >= container.settings.job_max_attempts
    try:
        job_id = str(json.loads(record["body"])["job_id"])
    except (KeyError, TypeError, ValueError):
        body = str(record.get("body"))[:200]
        log.error("sqs_message_malformed", message_id=message_id, body=body)
        return False
    bound = log.bind(job_id=job_id, message_id=message_id, receive_count=receives)
    bound.info("delivery_started", last_delivery=last_delivery)
    done = await container.deliver(job_id, last_delivery=last_delivery, deadline_cap=limit_at)
    to_dlq = done.outcome is Outcome.LOST and done.error is not None  # its last delivery crashed
    if not to_dlq and done.outcome in (Outcome.COMPLETED, Outcome.FAILED, Outcome.LOST, Outcome.UNKNOWN):
        bound.info("delivery_finished", outcome=done.outcome)
        return True  # ended (completed, failed, cancelled) or gone, however the run went
    if done.error is not None:
        bound.error("delivery_crashed", exc_info=done.error)
    reason = repr(done.error) if done.error is not None else "another delivery runs the job"
    bound.warning("delivery_failed", outcome=done.outcome, reason=reason, last_delivery=last_delivery)
    return False


def _retry_delay(receives: int, last_delivery: bool, base: float) -> int:
    if last_delivery:
        return 0  # straight on to the DLQ
    return int(min(RETRY_DELAY_MAX_S, base * 2 ** max(0, receives - 1)))


async def handle_sqs_event(runtime: _WorkerRuntime, event: JSON, context: Any) -> JSON:
    """The body of ``sqs_handler``: run every record concurrently, report failures."""
    remaining = _remaining_s(context)
    limit_at = None if remaining is None else time.time() + remaining - DEADLINE_MARGIN_S
    records: list[JSON] = list(event.get("Records", []))

    async def one(record: JSON) -> bool:
        message_id = str(record.get("messageId", ""))
        runtime.in_flight[message_id] = str(record.get("receiptHandle", ""))
        try:
            ok = await _run_record(runtime, record, limit_at)
        except Exception:
            log.exception("delivery_crashed", message_id=message_id)
            ok = False
        finally:
            runtime.in_flight.pop(message_id, None)
        if not ok and record.get("receiptHandle"):
            receives = int(record.get("attributes", {}).get("ApproximateReceiveCount", "1"))
            last = receives >= runtime.settings.job_max_attempts
            with contextlib.suppress(StoreUnavailable):
                delay = _retry_delay(receives, last, runtime.settings.sqs_retry_delay_s)
                await runtime.queue.change_visibility(str(record["receiptHandle"]), delay)
        return ok

    outcomes = await asyncio.gather(*(one(r) for r in records))
    failures = [
        {"itemIdentifier": str(r.get("messageId", ""))}
        for r, ok in zip(records, outcomes, strict=True)
        if not ok
    ]
    return {"batchItemFailures": failures}


def sqs_handler(event: JSON, context: Any) -> JSON:
    """Lambda on the jobs queue (``functionResponseType: ReportBatchItemFailures``)."""
    runtime = _worker_runtime()
    return runtime.loop.run_until_complete(handle_sqs_event(runtime, event, context))


# -- jobq worker ---------------------------------------------------------------


class LocalContext:
    """The part of Lambda's context object the handler uses."""

    def __init__(self, slice_s: float = LOCAL_SLICE_S) -> None:
        self.ends_at = time.monotonic() + slice_s
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = "jobq-worker"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.ends_at - time.monotonic()) * 1000))


def sqs_event(messages: list[JSON], source_arn: str, region: str) -> JSON:
    """What Lambda's SQS event source hands the function for ``messages``."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": dict(m.get("Attributes", {})),
                "messageAttributes": {},
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": source_arn,
                "awsRegion": region,
            }
            for m in messages
        ]
    }


async def _visibility(queue: SqsQueue, configured: int) -> int:
    return configured if configured > 0 else await queue.visibility_timeout()


async def _heartbeat(runtime: _WorkerRuntime, visibility: int) -> None:
    """Keep the messages being run hidden: a live worker is never raced by a redelivery,
    a dead one's messages reappear ``visibility`` seconds after its last beat."""
    while True:
        await asyncio.sleep(max(0.5, visibility / 3))
        for receipt in list(runtime.in_flight.values()):
            with contextlib.suppress(StoreUnavailable):
                await runtime.queue.change_visibility(receipt, visibility)


async def _poll(
    runtime: _WorkerRuntime, stop: asyncio.Event, batch: int, wait_s: int, visibility: int
) -> None:
    queue = runtime.queue
    arn = await queue.arn()
    while not stop.is_set():
        try:
            messages = await queue.receive(batch, wait_s, visibility)
        except StoreUnavailable as exc:
            log.warning("sqs_receive_failed", error=str(exc))
            await asyncio.sleep(1.0)
            continue
        if not messages:
            continue
        if stop.is_set():  # received while stopping: hand them straight back
            for m in messages:
                with contextlib.suppress(StoreUnavailable):
                    await queue.change_visibility(m["ReceiptHandle"], 0)
            return
        event = sqs_event(messages, arn, runtime.settings.aws_region)
        reply = await handle_sqs_event(runtime, event, LocalContext())
        failed = {f["itemIdentifier"] for f in reply["batchItemFailures"]}
        for m in messages:
            if m["MessageId"] not in failed:
                with contextlib.suppress(StoreUnavailable):
                    await queue.delete(m["ReceiptHandle"])


async def _serve(runtime: _WorkerRuntime, pollers: int, batch: int, wait_s: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    visibility = await _visibility(runtime.queue, runtime.settings.sqs_visibility_timeout_s)
    beat = asyncio.create_task(_heartbeat(runtime, visibility))
    log.info(
        "worker_started",
        backend="aws",
        queue=runtime.queue.queue_name,
        pollers=pollers,
        batch=batch,
        visibility_s=visibility,
    )
    try:
        await asyncio.gather(
            *(_poll(runtime, stop, batch, wait_s, visibility) for _ in range(pollers))
        )
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        log.info("worker_stopped", backend="aws")


def run_sqs_worker(settings: Settings) -> None:
    """``jobq worker`` on the aws backend. Blocks until SIGTERM/SIGINT, after which each
    poller finishes the batch it is running and exits (within ``SQS_WAIT_S`` when idle)."""
    runtime = _worker_runtime(settings)
    pollers = max(1, min(settings.worker_concurrency, 8))
    batch, wait_s = settings.sqs_batch_size, settings.sqs_wait_s
    try:
        runtime.loop.run_until_complete(_serve(runtime, pollers, batch, wait_s))
    finally:
        runtime.loop.run_until_complete(runtime.container.close())
