"""S3Store over moto's server mode: the races S3's conditional writes must settle.

Each test uses two ``S3Store`` instances on one bucket, like two Lambda instances,
so nothing can be settled by state kept inside one process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import boto3
import pytest

from adapters.s3_store import S3Store
from pipeline.model import Job, StoreUnavailable
from pipeline.vocabulary import JobStatus
from tests.support.moto_server import moto_endpoint


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    name = f"s3t-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=moto_endpoint(),
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
async def stores(bucket: str) -> AsyncIterator[tuple[S3Store, S3Store]]:
    pair = (
        S3Store(bucket, "jobs", endpoint_url=moto_endpoint()),
        S3Store(bucket, "jobs", endpoint_url=moto_endpoint()),
    )
    yield pair
    for store in pair:
        await store.close()


def _job(tenant: str = "t", key: str | None = None) -> Job:
    return Job(id=uuid.uuid4().hex, tenant=tenant, request={"n": 1}, idempotency_key=key)


async def test_racing_updaters_lose_no_write(stores: tuple[S3Store, S3Store]) -> None:
    """Two instances updating different fields of one job at once: both writes survive."""
    a, b = stores
    job, _ = await a.create(_job())
    for n in range(1, 11):
        await asyncio.gather(
            a.update(job.id, progress={"n": n}), b.update(job.id, steps={"input": f"v{n}"})
        )
        final = await a.get(job.id)
        assert final is not None
        assert (final.progress, final.steps) == ({"n": n}, {"input": f"v{n}"})


async def test_cas_lets_one_transition_win_across_instances(
    stores: tuple[S3Store, S3Store],
) -> None:
    """A cancel and a start racing from different instances: exactly one applies."""
    a, b = stores
    for _ in range(5):
        job, _ = await a.create(_job())
        started, cancelled = await asyncio.gather(
            a.update(job.id, expect={JobStatus.QUEUED}, status=JobStatus.RUNNING),
            b.update(job.id, expect={JobStatus.QUEUED}, status=JobStatus.CANCELLED),
        )
        assert (started is None) != (cancelled is None)
        final = await b.get(job.id)
        assert final is not None and final.status == (JobStatus.RUNNING if started else JobStatus.CANCELLED)


async def test_racing_creates_with_one_idempotency_key_make_one_job(
    stores: tuple[S3Store, S3Store],
) -> None:
    """Concurrent creates with the same key on two instances return the same job, stored once."""
    a, b = stores
    tenant = uuid.uuid4().hex[:8]
    (first, made_a), (second, made_b) = await asyncio.gather(
        a.create(_job(tenant, "same-key")), b.create(_job(tenant, "same-key"))
    )
    assert first.id == second.id
    assert sorted([made_a, made_b]) == [False, True]
    listed, _ = await a.list_jobs(tenant)
    assert [j.id for j in listed] == [first.id]


async def test_concurrent_appends_from_two_instances_number_events_without_gaps(
    stores: tuple[S3Store, S3Store],
) -> None:
    """Appends racing from two instances get ids 1..n, each event stored exactly once."""
    a, b = stores
    job, _ = await a.create(_job())
    await asyncio.gather(
        *(a.append_event(job.id, "status", {"from": "a", "n": n}) for n in range(6)),
        *(b.append_event(job.id, "status", {"from": "b", "n": n}) for n in range(6)),
    )
    events = await b.read_events(job.id)
    assert [e.id for e in events] == list(range(1, 13))
    assert sorted((e.data["from"], e.data["n"]) for e in events) == sorted(
        (w, n) for w in "ab" for n in range(6)
    )
    tail = await a.append_event(job.id, "done", {})
    assert tail.id == 13


async def test_read_events_waits_for_another_instance_to_append(
    stores: tuple[S3Store, S3Store],
) -> None:
    """A reader polling on one instance returns the event another instance appends meanwhile."""
    a, b = stores
    job, _ = await a.create(_job())
    await a.append_event(job.id, "status", {"n": 1})
    reader = asyncio.create_task(b.read_events(job.id, after=1, wait_s=10))
    await asyncio.sleep(0.6)
    assert not reader.done()
    await a.append_event(job.id, "done", {"status": JobStatus.COMPLETED})
    events = await asyncio.wait_for(reader, 10)
    assert [(e.id, e.type) for e in events] == [(2, "done")]
    assert await b.read_events(job.id, after=2, wait_s=0.3) == []


async def test_global_listing_pages_newest_first_and_filters_by_status(
    stores: tuple[S3Store, S3Store],
) -> None:
    """Listing every tenant is newest first across pages; a status filter keeps only matches."""
    a, b = stores
    made = []
    for n in range(5):
        job = _job(tenant=f"t{n}")
        job.created_at += n
        made.append((await a.create(job))[0].id)
    await b.update(made[1], status=JobStatus.CANCELLED)
    await b.update(made[3], status=JobStatus.CANCELLED)
    ids: list[str] = []
    cursor = None
    while True:
        page, cursor = await b.list_jobs(None, limit=2, cursor=cursor)
        ids += [j.id for j in page]
        if cursor is None:
            break
    assert ids == made[::-1]
    cancelled, end = await a.list_jobs(None, status=JobStatus.CANCELLED, limit=5)
    assert [j.id for j in cancelled] == [made[3], made[1]]
    assert end is None
    counts = await a.count_by_status()
    assert (counts[JobStatus.QUEUED], counts[JobStatus.CANCELLED]) == (3, 2)


async def test_cancel_flag_written_by_one_instance_is_seen_by_the_other(
    stores: tuple[S3Store, S3Store],
) -> None:
    """The cancel flag is its own object: raised by the web, read by the worker."""
    a, b = stores
    job, _ = await a.create(_job())
    assert not await b.cancel_requested(job.id)
    await a.request_cancel(job.id)
    await a.update(job.id, progress={"n": 2})
    assert await b.cancel_requested(job.id)


async def test_ping_reports_a_missing_bucket_and_an_unreachable_endpoint() -> None:
    """ping raises StoreUnavailable for a bucket that does not exist and for a dead endpoint."""
    missing = S3Store(f"nope-{uuid.uuid4().hex[:8]}", endpoint_url=moto_endpoint())
    with pytest.raises(StoreUnavailable):
        await missing.ping()
    dead = S3Store("any-bucket", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StoreUnavailable):
        await dead.ping()
    with pytest.raises(StoreUnavailable):
        await dead.get("x")
