"""One JobStore contract, run against every backend's store (Litestar store-test style)."""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import AsyncIterator

import pytest

from adapters.sqlite_store import SqliteStore
from pipeline.model import Artifact, Job
from pipeline.ports import JobStore
from pipeline.vocabulary import JobStatus


def _support(name: str) -> bool:
    return importlib.util.find_spec(f"tests.support.{name}") is not None


async def _make_store(kind: str, tmp_path: object) -> JobStore:
    if kind == "sqlite":
        return SqliteStore(f"{tmp_path}/store.db")
    if kind == "redis":
        from adapters.redis_store import RedisStore
        from tests.support.redis_server import redis_url

        return RedisStore.from_url(redis_url(), prefix=f"t{uuid.uuid4().hex[:8]}", ttl_s=3600)
    import boto3

    from adapters.s3_store import S3Store
    from tests.support.moto_server import moto_endpoint

    bucket = f"store-{uuid.uuid4().hex[:10]}"
    endpoint = moto_endpoint()
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    return S3Store(bucket=bucket, prefix="p", endpoint_url=endpoint, region="us-east-1")


@pytest.fixture(params=["sqlite", "redis", "aws"])
async def store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[JobStore]:
    kind = request.param
    needed = {"redis": "redis_server", "aws": "moto_server"}.get(kind)
    if needed and not _support(needed):
        pytest.skip(f"{kind} backend support not present")
    if kind == "aws":
        import os

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    made = await _make_store(kind, tmp_path)
    await made.open()
    yield made
    await made.close()


def _job(tenant: str = "t1", key: str | None = None) -> Job:
    return Job(id=uuid.uuid4().hex, tenant=tenant, request={"project_title": "x"}, idempotency_key=key)


def _artifact(name: str) -> Artifact:
    return Artifact(name=name, type="section", data={"n": name}, hash="0" * 64, timestamp=1, size=10)


async def test_create_then_get_returns_the_same_job(store: JobStore) -> None:
    """A created job reads back with its fields intact."""
    job, created = await store.create(_job())
    assert created
    got = await store.get(job.id)
    assert got is not None and got.to_dict() == job.to_dict()
    assert await store.get("nope") is None


async def test_idempotency_key_returns_the_first_job_per_tenant(store: JobStore) -> None:
    """The same Idempotency-Key from the same tenant yields the first job; another tenant gets its own."""
    first, _ = await store.create(_job("a", "k1"))
    again, created = await store.create(_job("a", "k1"))
    other, other_created = await store.create(_job("b", "k1"))
    assert (again.id, created) == (first.id, False)
    assert other_created and other.id != first.id


async def test_update_is_a_compare_and_set_on_status(store: JobStore) -> None:
    """An update whose expected status does not match changes nothing."""
    job, _ = await store.create(_job())
    assert await store.update(job.id, expect={JobStatus.RUNNING}, status=JobStatus.CANCELLED) is None
    moved = await store.update(job.id, expect={JobStatus.QUEUED}, status=JobStatus.RUNNING, attempts=1)
    assert moved is not None and moved.status == JobStatus.RUNNING and moved.attempts == 1
    again = await store.get(job.id)
    assert again is not None and again.status == JobStatus.RUNNING
    assert await store.update("missing", status=JobStatus.RUNNING) is None


async def test_concurrent_cas_lets_exactly_one_writer_win(store: JobStore) -> None:
    """Two racing transitions out of 'queued': one wins, one sees None."""
    job, _ = await store.create(_job())
    results = await asyncio.gather(
        store.update(job.id, expect={JobStatus.QUEUED}, status=JobStatus.RUNNING),
        store.update(job.id, expect={JobStatus.QUEUED}, status=JobStatus.CANCELLED),
    )
    assert sum(r is not None for r in results) == 1


async def test_event_ids_increase_by_one_and_read_after_resumes(store: JobStore) -> None:
    """Event ids are 1..n per job, and reading after id k returns exactly k+1..n."""
    job, _ = await store.create(_job())
    for n in range(5):
        await store.append_event(job.id, "status", {"n": n})
    events = await store.read_events(job.id)
    assert [e.id for e in events] == [1, 2, 3, 4, 5]
    assert [e.data["n"] for e in await store.read_events(job.id, after=3)] == [3, 4]


async def test_concurrent_appends_get_distinct_consecutive_ids(store: JobStore) -> None:
    """Racing appends never share or skip an id."""
    job, _ = await store.create(_job())
    await asyncio.gather(*(store.append_event(job.id, "status", {"n": n}) for n in range(8)))
    assert [e.id for e in await store.read_events(job.id)] == list(range(1, 9))


async def test_read_events_waits_for_the_next_event(store: JobStore) -> None:
    """A reader blocked on an empty log wakes with the event appended meanwhile."""
    job, _ = await store.create(_job())
    reader = asyncio.create_task(store.read_events(job.id, after=0, wait_s=5))
    await asyncio.sleep(0.2)
    assert not reader.done()
    await store.append_event(job.id, "done", {"status": "completed"})
    events = await asyncio.wait_for(reader, 5)
    assert [(e.id, e.type) for e in events] == [(1, "done")]


@pytest.mark.parametrize("wait_s", [0.001, 0.05, 5.0])
async def test_a_waiting_read_returns_what_the_log_already_holds(store: JobStore, wait_s: float) -> None:
    """A read that may wait, on a job nobody has watched yet, returns the events the log
    already holds after ``after``, whether its wait is shorter or longer than it takes
    to start watching the job."""
    job, _ = await store.create(_job())
    for n in range(3):
        await store.append_event(job.id, "status", {"n": n})
    events = await asyncio.wait_for(store.read_events(job.id, after=1, wait_s=wait_s), 10)
    assert [e.id for e in events] == [2, 3]


async def test_artifacts_keep_write_order_and_reject_bad_names(store: JobStore) -> None:
    """Artifacts list in write order; a path-like name is never stored or found."""
    job, _ = await store.create(_job())
    for name in ("pitch", "sources", "brief"):
        await store.put_artifact(job.id, _artifact(name))
    assert [a.name for a in await store.list_artifacts(job.id)] == ["pitch", "sources", "brief"]
    got = await store.get_artifact(job.id, "brief")
    assert got is not None and got.data == {"n": "brief"}
    assert await store.get_artifact(job.id, "../brief") is None
    with pytest.raises(ValueError):
        await store.put_artifact(job.id, _artifact("../x"))


async def test_cache_trace_and_cancel_flag_round_trip(store: JobStore) -> None:
    """Cache entries, trace records and the cancel flag read back as written."""
    job, _ = await store.create(_job())
    key = uuid.uuid4().hex
    assert await store.cache_get(key) is None
    await store.cache_put(key, _artifact("brief"))
    cached = await store.cache_get(key)
    assert cached is not None and cached.name == "brief"
    await store.add_trace(job.id, {"step": "brief", "attempt": 1})
    await store.add_trace(job.id, {"step": "brief", "attempt": 2})
    assert [r["attempt"] for r in await store.get_trace(job.id)] == [1, 2]
    assert not await store.cancel_requested(job.id)
    await store.request_cancel(job.id)
    assert await store.cancel_requested(job.id)


async def test_update_appends_its_events_only_when_it_holds(store: JobStore) -> None:
    """Events given to update are appended after the change, with the next ids, and only
    when the compare-and-set held."""
    job, _ = await store.create(_job(), events=[("status", {"n": 0})])
    failed = await store.update(
        job.id, expect={JobStatus.RUNNING}, events=[("status", {"n": -1})], attempts=9
    )
    assert failed is None
    moved = await store.update(
        job.id,
        expect={JobStatus.QUEUED},
        events=[("status", {"n": 1}), ("error", {"n": 2})],
        status=JobStatus.RUNNING,
    )
    assert moved is not None and moved.status == JobStatus.RUNNING
    events = await store.read_events(job.id)
    assert [(e.id, e.type, e.data["n"]) for e in events] == [
        (1, "status", 0), (2, "status", 1), (3, "error", 2)
    ]
    stored = await store.get(job.id)
    assert stored is not None and stored.attempts == 0


async def test_create_with_events_appends_them_only_for_a_new_job(store: JobStore) -> None:
    """A create that returns an existing job (same Idempotency-Key) appends nothing."""
    first, created = await store.create(_job(key="k"), events=[("status", {"n": 1})])
    again, created_again = await store.create(_job(key="k"), events=[("status", {"n": 2})])
    assert created and not created_again and again.id == first.id
    assert [e.data["n"] for e in await store.read_events(first.id)] == [1]


async def test_commit_stores_everything_and_gates_job_and_events_on_the_status(
    store: JobStore,
) -> None:
    """A commit stores artifacts, cache entries and trace records, then changes the job
    and appends events only if its status matched; the artifacts are written either way."""
    job, _ = await store.create(_job())
    key = uuid.uuid4().hex
    held = await store.commit(
        job.id,
        expect={JobStatus.QUEUED},
        changes={"progress": {"percentage": 7}, "steps": {"input": "completed"}},
        events=[("artifact_written", {"name": "pitch"}), ("status", {"n": 1})],
        artifacts=[_artifact("pitch"), _artifact("brief")],
        cache=[(key, _artifact("brief"))],
        traces=[{"attempt": 1}, {"attempt": 2}],
    )
    assert held
    stored = await store.get(job.id)
    assert stored is not None and stored.progress == {"percentage": 7}
    assert stored.steps == {"input": "completed"} and stored.status == JobStatus.QUEUED
    assert [a.name for a in await store.list_artifacts(job.id)] == ["pitch", "brief"]
    cached = await store.cache_get(key)
    assert cached is not None and cached.name == "brief"
    assert [r["attempt"] for r in await store.get_trace(job.id)] == [1, 2]
    assert [e.type for e in await store.read_events(job.id)] == ["artifact_written", "status"]

    lost = await store.commit(
        job.id,
        expect={JobStatus.RUNNING},
        changes={"progress": {"percentage": 50}},
        events=[("status", {"n": 2})],
        artifacts=[_artifact("sources")],
    )
    assert not lost
    stored = await store.get(job.id)
    assert stored is not None and stored.progress == {"percentage": 7}
    assert len(await store.read_events(job.id)) == 2
    assert "sources" in {a.name for a in await store.list_artifacts(job.id)}
    with pytest.raises(ValueError):
        await store.commit(job.id, artifacts=[_artifact("../x")])


async def test_writes_of_an_earlier_delivery_change_nothing(store: JobStore) -> None:
    """Once a later delivery has counted its attempt, a commit or update made for the
    earlier attempt writes nothing at all: no artifact, cache entry, trace, event or change."""
    job, _ = await store.create(_job())
    taken = await store.update(
        job.id, expect={JobStatus.QUEUED}, expect_attempts=0, status=JobStatus.RUNNING, attempts=1
    )
    assert taken is not None and taken.attempts == 1
    assert await store.update(job.id, expect={JobStatus.RUNNING}, expect_attempts=0, attempts=1) is None
    again = await store.update(job.id, expect={JobStatus.RUNNING}, expect_attempts=1, attempts=2)
    assert again is not None and again.attempts == 2
    key = uuid.uuid4().hex
    stale = await store.commit(
        job.id,
        expect={JobStatus.RUNNING},
        expect_attempts=1,
        changes={"progress": {"percentage": 60}},
        events=[("status", {"n": 1})],
        artifacts=[_artifact("brief")],
        cache=[(key, _artifact("brief"))],
        traces=[{"attempt": 1}],
    )
    assert not stale
    stored = await store.get(job.id)
    assert stored is not None and stored.progress == {} and stored.attempts == 2
    assert await store.list_artifacts(job.id) == []
    assert await store.cache_get(key) is None
    assert await store.get_trace(job.id) == []
    assert await store.read_events(job.id) == []
    assert await store.commit(
        job.id, expect={JobStatus.RUNNING}, expect_attempts=2, artifacts=[_artifact("brief")]
    )
    assert [a.name for a in await store.list_artifacts(job.id)] == ["brief"]


async def test_many_reads_of_cache_and_cancel_flags_match_single_reads(store: JobStore) -> None:
    """cache_get_many answers in key order with None for misses; cancel_requested_many
    names exactly the flagged jobs."""
    keys = [uuid.uuid4().hex for _ in range(3)]
    await store.cache_put(keys[0], _artifact("brief"))
    await store.cache_put(keys[2], _artifact("sources"))
    found = await store.cache_get_many(keys)
    assert [a.name if a else None for a in found] == ["brief", None, "sources"]
    assert await store.cache_get_many([]) == []
    jobs = [(await store.create(_job()))[0] for _ in range(3)]
    await store.request_cancel(jobs[1].id)
    assert await store.cancel_requested_many([j.id for j in jobs]) == {jobs[1].id}
    assert await store.cancel_requested_many([]) == set()


async def test_tenant_of_names_the_owner_and_none_for_an_unknown_job(store: JobStore) -> None:
    """``tenant_of`` answers as ``get`` would: the job's tenant, or None when unknown
    or deleted."""
    job, _ = await store.create(_job("acme"))
    assert await store.tenant_of(job.id) == "acme"
    assert await store.tenant_of(uuid.uuid4().hex) is None
    await store.delete(job.id)
    assert await store.tenant_of(job.id) is None


async def test_the_cancel_mark_moves_when_a_flag_is_raised(store: JobStore) -> None:
    """A store that keeps a cancel mark gives a new one after every cancel request, so a
    poller that saw the old mark knows to read the flags again."""
    job, _ = await store.create(_job())
    before = await store.cancel_mark()
    assert await store.cancel_mark() == before
    await store.request_cancel(job.id)
    after = await store.cancel_mark()
    assert (before, after) == (None, None) or after != before


async def test_a_cancel_watch_sees_every_flag_of_the_jobs_it_watches(store: JobStore) -> None:
    """One poller for many jobs resolves exactly the flagged jobs: one flagged while it
    watches, and one flagged before it was watched (while the mark stood still)."""
    from pipeline.cancel_watch import CancelWatch

    watch = CancelWatch(store)
    jobs = [(await store.create(_job()))[0].id for _ in range(4)]
    futures = {job_id: watch.add(job_id, 0.05) for job_id in jobs[:3]}
    await store.request_cancel(jobs[3])  # not watched yet
    await asyncio.sleep(0.3)  # polls that take in the mark's move
    futures[jobs[3]] = watch.add(jobs[3], 0.05)
    async with asyncio.timeout(2):  # below FULL_READ_S: not the safety net's read
        await futures[jobs[3]]
    await store.request_cancel(jobs[1])
    async with asyncio.timeout(2):
        await futures[jobs[1]]
    await asyncio.sleep(0.2)
    assert {job_id for job_id, future in futures.items() if future.done()} == {jobs[1], jobs[3]}
    for job_id in jobs:
        watch.remove(job_id)


async def test_list_pages_newest_first_per_tenant(store: JobStore) -> None:
    """Listing is newest first, paged by cursor, and shows only the tenant's jobs."""
    tenant = uuid.uuid4().hex[:8]
    made = []
    for n in range(5):
        job = _job(tenant)
        job.created_at += n
        made.append((await store.create(job))[0].id)
    await store.create(_job("someone-else"))
    page1, cursor = await store.list_jobs(tenant, limit=3)
    assert cursor is not None
    page2, end = await store.list_jobs(tenant, limit=3, cursor=cursor)
    assert [j.id for j in page1 + page2] == made[::-1]
    assert end is None


async def test_counts_and_unfinished_follow_status_changes(store: JobStore) -> None:
    """Status counts and the unfinished list track transitions."""
    before = await store.count_by_status()
    job, _ = await store.create(_job())
    assert job.id in await store.unfinished_job_ids()
    await store.update(job.id, status=JobStatus.CANCELLED)
    after = await store.count_by_status()
    assert after[JobStatus.CANCELLED] == before[JobStatus.CANCELLED] + 1
    assert after[JobStatus.QUEUED] == before[JobStatus.QUEUED]
    assert job.id not in await store.unfinished_job_ids()


async def test_delete_removes_the_job_and_what_it_owns(store: JobStore) -> None:
    """After delete the job, its artifacts and its events are gone."""
    job, _ = await store.create(_job())
    await store.put_artifact(job.id, _artifact("pitch"))
    await store.append_event(job.id, "status", {})
    await store.delete(job.id)
    assert await store.get(job.id) is None
    assert await store.list_artifacts(job.id) == []
    assert await store.read_events(job.id) == []


async def test_spend_counter_adds_within_its_cap_and_refuses_past_it(store: JobStore) -> None:
    """add_spend adds up to the cap, refuses an amount past it (counter unchanged), gives back."""
    counter = f"tenant/t{uuid.uuid4().hex[:8]}/2026-01-01"
    assert await store.spent(counter) == 0
    assert await store.add_spend(counter, 600, cap=1000, ttl_s=3600) == 600
    assert await store.add_spend(counter, 401, cap=1000, ttl_s=3600) is None
    assert await store.spent(counter) == 600
    assert await store.add_spend(counter, 400, cap=1000, ttl_s=3600) == 1000
    assert await store.add_spend(counter, -250, ttl_s=3600) == 750
    assert await store.add_spend(counter, 5000, ttl_s=3600) == 5750  # no cap: always added
    assert await store.add_spend(f"job/{uuid.uuid4().hex}", 1001, cap=1000, ttl_s=60) is None
    with pytest.raises(ValueError):
        await store.add_spend("tenant/a b", 1, ttl_s=60)


async def test_concurrent_reservations_never_pass_the_cap(store: JobStore) -> None:
    """Twenty concurrent adds of 10 against a cap of 100: exactly ten land, the total is 100."""
    counter = f"job/{uuid.uuid4().hex}"
    results = await asyncio.gather(
        *(store.add_spend(counter, 10, cap=100, ttl_s=3600) for _ in range(20))
    )
    accepted = [r for r in results if r is not None]
    assert len(accepted) == 10
    assert sorted(accepted) == list(range(10, 101, 10))
    assert await store.spent(counter) == 100


async def test_spend_counter_expires_after_its_ttl(store: JobStore) -> None:
    """A counter reads 0 once ttl_s has passed since its last write, and starts over."""
    counter = f"tenant/t{uuid.uuid4().hex[:8]}/2026-01-02"
    assert await store.add_spend(counter, 70, cap=100, ttl_s=1) == 70
    await asyncio.sleep(2.1)
    assert await store.spent(counter) == 0
    assert await store.add_spend(counter, 70, cap=100, ttl_s=60) == 70
