"""Fair scheduling across tenants on real deployments: `jobq serve` (local: with its
in-process worker; redis: with a real `jobq worker` process on real Redis).

Order, not speed: the assertions compare the jobs' own start and completion times.
SQS has no such scheduling (README: what the Lambda deployment gives instead).
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.contract.helpers import submit, wait_for
from tests.support.service import Service
from tests.test_redis_processes import worker_holding

KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}
FAIR_ENV = {
    "API_KEYS": ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items()),
    "STREAM_TOKEN_SECRET": "fairness-test-secret",
    "SUBMIT_RATE_PER_MIN": "0",
    "WORKER_CONCURRENCY": "2",
    "LLM_OFFLINE_LATENCY_MS": "150",
}
A_JOBS = 8


def as_tenant(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def fair_service(backend: str, service_factory: Callable[..., Service], **env: str) -> Service:
    if backend == "aws":
        pytest.skip("SQS: Lambda's concurrency stands in for fair scheduling (README)")
    return service_factory(env={**FAIR_ENV, **env})


def finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    view = wait_for(client, job_id)
    assert view["status"] == "completed", view
    return view


def run_backlog_then_one(service: Service) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tenant A submits ``A_JOBS`` jobs, then tenant B one: the views once all finished."""
    with (
        service.client(headers=as_tenant("tenant-a")) as a,
        service.client(headers=as_tenant("tenant-b")) as b,
    ):
        a_ids = [submit(a) for _ in range(A_JOBS)]
        b_id = submit(b)
        a_views = [finished(a, job_id) for job_id in a_ids]
        b_view = finished(b, b_id)
    return a_views, b_view


def test_a_tenant_backlog_does_not_hold_back_another_tenant(
    backend: str, service_factory: Callable[..., Service]
) -> None:
    """B's job, submitted behind A's backlog, starts at the next free slot: at most one of A's
    queued jobs (A's turn) starts between B's submit and B's start."""
    a_views, b_view = run_backlog_then_one(fair_service(backend, service_factory))
    a_queued_at_b_submit = [v for v in a_views if v["startedAt"] >= b_view["createdAt"]]
    assert len(a_queued_at_b_submit) >= 3, "the backlog should still be queued when B submits"
    ahead_of_b = [v for v in a_queued_at_b_submit if v["startedAt"] < b_view["startedAt"]]
    assert len(ahead_of_b) <= 1, (b_view, sorted(v["startedAt"] for v in a_views))


def test_fair_scheduling_off_queues_first_in_first_out(
    backend: str, service_factory: Callable[..., Service]
) -> None:
    """With FAIR_SCHEDULING=0, B's job waits behind every queued job of A (the comparison
    that shows the test above can fail)."""
    service = fair_service(backend, service_factory, FAIR_SCHEDULING="0")
    a_views, b_view = run_backlog_then_one(service)
    a_queued_at_b_submit = [v for v in a_views if v["startedAt"] >= b_view["createdAt"]]
    assert len(a_queued_at_b_submit) >= 3
    assert all(v["startedAt"] <= b_view["startedAt"] for v in a_queued_at_b_submit)


def test_tenant_max_running_caps_one_tenant(backend: str, service_factory: Callable[..., Service]) -> None:
    """With TENANT_MAX_RUNNING=1 and three slots, A's jobs run one after another while B's
    job runs beside them."""
    service = fair_service(
        backend, service_factory, TENANT_MAX_RUNNING="1", WORKER_CONCURRENCY="3", LLM_OFFLINE_LATENCY_MS="50"
    )
    with (
        service.client(headers=as_tenant("tenant-a")) as a,
        service.client(headers=as_tenant("tenant-b")) as b,
    ):
        a_ids = [submit(a) for _ in range(3)]
        b_id = submit(b)
        a_views = sorted((finished(a, job_id) for job_id in a_ids), key=lambda v: v["startedAt"])
        b_view = finished(b, b_id)
    for earlier, later in itertools.pairwise(a_views):
        assert earlier["completedAt"] <= later["startedAt"], a_views
    assert b_view["startedAt"] < a_views[-1]["startedAt"], "B should not wait for A's cap"


def test_a_killed_workers_job_frees_its_tenant_slot(
    backend: str, service_factory: Callable[..., Service]
) -> None:
    """Redis, TENANT_MAX_RUNNING=1: a SIGKILLed worker's job is swept and runs again on the
    other worker, and the tenant's next job runs too (the dead delivery's count is gone)."""
    if backend != "redis":
        pytest.skip("a separate worker process to kill: the redis backend")
    env = {**FAIR_ENV, "TENANT_MAX_RUNNING": "1", "LOG_JSON": "true", "LLM_OFFLINE_LATENCY_MS": "300"}
    service = service_factory(env=env, workers=2)
    with service.client(headers=as_tenant("tenant-a")) as a:
        first = submit(a, parallel_limit=1)
        second = submit(a)
        holder = worker_holding(service, first)
        wait_for(a, first, ("running",))
        service.kill_worker(holder, signal.SIGKILL)
        first_view = finished(a, first)
        second_view = finished(a, second)
    assert first_view["attempts"] == 2
    assert second_view["attempts"] == 1
