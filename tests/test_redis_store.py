"""RedisStore semantics on a real Redis, beyond the shared store contract."""

from __future__ import annotations

import asyncio
import math
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from adapters.redis_store import RedisStore
from adapters.saq_queue import SaqQueue
from pipeline import cancel_watch
from pipeline.model import Artifact, Job, StoreUnavailable
from pipeline.vocabulary import JobStatus
from tests.support.redis_server import (
    RedisServer,
    free_port,
    redis_url,
    start_redis,
    stop_redis,
    unique_prefix,
)


@pytest.fixture
async def store() -> AsyncIterator[RedisStore]:
    made = RedisStore.from_url(redis_url(), prefix=unique_prefix(), ttl_s=3600)
    await made.open()
    yield made
    await made.close()


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url())
    yield client
    await client.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis(persistent=False)
    yield server
    stop_redis(server)


def _job(tenant: str = "t1", key: str | None = None) -> Job:
    return Job(id=uuid.uuid4().hex, tenant=tenant, request={"pitch": "p"}, idempotency_key=key)


def _artifact(name: str) -> Artifact:
    return Artifact(name=name, type="section", data={"bullets": []}, hash="0" * 64, timestamp=1, size=2)


async def test_updates_of_different_fields_do_not_lose_each_other(store: RedisStore) -> None:
    """Racing updates of different fields (same status) both land: the merge is atomic."""
    job, _ = await store.create(_job())
    await asyncio.gather(
        *(store.update(job.id, expect={JobStatus.QUEUED}, progress={"n": n}) for n in range(10)),
        store.update(job.id, expect={JobStatus.QUEUED}, steps={"input": "completed"}),
        store.update(job.id, expect={JobStatus.QUEUED}, attempts=2),
    )
    got = await store.get(job.id)
    assert got is not None
    assert got.steps == {"input": "completed"} and got.attempts == 2 and "n" in got.progress


async def test_empty_lists_and_nested_values_survive_an_update(store: RedisStore) -> None:
    """JSON values (empty lists, nested dicts, None) read back exactly after a CAS update."""
    job, _ = await store.create(_job())
    result = {"success": True, "data": {"bullets": [], "nested": {"x": [1, {}]}}, "meta": None}
    updated = await store.update(job.id, expect={JobStatus.QUEUED}, status=JobStatus.COMPLETED, result=result)
    assert updated is not None and updated.result == result
    again = await store.get(job.id)
    assert again is not None and again.result == result and again.status == JobStatus.COMPLETED


async def test_exactly_one_of_many_racing_transitions_wins(store: RedisStore) -> None:
    """Twenty concurrent queued->X transitions from two clients: exactly one succeeds."""
    other = RedisStore.from_url(store.url, prefix=store.prefix, ttl_s=3600)
    job, _ = await store.create(_job())
    results = await asyncio.gather(
        *(
            (store if n % 2 else other).update(
                job.id, expect={JobStatus.QUEUED}, status=JobStatus.RUNNING, attempts=n
            )
            for n in range(20)
        )
    )
    await other.close()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    got = await store.get(job.id)
    assert got is not None and got.attempts == winners[0].attempts


async def test_idempotency_key_lives_24h_and_is_per_tenant(store: RedisStore, raw: aioredis.Redis) -> None:
    """The idempotency key is stored with a 24 h expiry; a deleted first job frees it."""
    first, created = await store.create(_job("a", "key-1"))
    again, created_again = await store.create(_job("a", "key-1"))
    assert created and not created_again and again.id == first.id
    keys = [k async for k in raw.scan_iter(match=f"{store.prefix}:idem:*")]
    assert len(keys) == 1
    assert 23 * 3600 < await raw.ttl(keys[0]) <= 24 * 3600
    await store.delete(first.id)
    fresh, fresh_created = await store.create(_job("a", "key-1"))
    assert fresh_created and fresh.id != first.id


async def test_event_ids_are_consecutive_across_clients_and_match_stream_ids(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    """Appends from two clients get ids 1..n, stored as stream entry ids '<n>-0'."""
    other = RedisStore.from_url(store.url, prefix=store.prefix, ttl_s=3600)
    job, _ = await store.create(_job())
    await asyncio.gather(
        *((store if n % 2 else other).append_event(job.id, "status", {"n": n}) for n in range(30))
    )
    await other.close()
    events = await store.read_events(job.id)
    assert [e.id for e in events] == list(range(1, 31))
    entries: list[tuple[bytes, object]] = await raw.xrange(f"{store.prefix}:events:{job.id}")  # type: ignore[assignment]  # redis-py's union return type
    assert [entry_id.decode() for entry_id, _ in entries] == [f"{n}-0" for n in range(1, 31)]


async def test_waiting_read_is_subscribed_in_redis_and_woken_by_another_client(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    """A waiting reader is subscribed, inside Redis, to its job's stream and wakes on
    another client's append long before its wait ends (no polling)."""
    writer = RedisStore.from_url(store.url, prefix=store.prefix, ttl_s=3600)
    job, _ = await store.create(_job())
    await store.append_event(job.id, "status", {"n": 1})
    reader = asyncio.create_task(store.read_events(job.id, after=1, wait_s=30))
    channel = f"{store.prefix}:events:{job.id}"
    subscribers = 0
    for _ in range(200):
        subscribers = dict(await raw.pubsub_numsub(channel)).get(channel.encode(), 0)
        if subscribers:
            break
        await asyncio.sleep(0.01)
    assert subscribers == 1, "the reader should be subscribed inside Redis, not polling"
    await writer.append_event(job.id, "done", {"status": "completed"})
    events = await asyncio.wait_for(reader, 10)
    await writer.close()
    assert [(e.id, e.type, e.data) for e in events] == [(2, "done", {"status": "completed"})]


async def test_event_data_an_older_writer_wrote_reads_back_as_json_loads_reads_it(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    """Event data written by ``json.dumps`` (NaN, Infinity, 1e400, huge integers) reads back
    from the log and from the channel as ``json.loads`` reads it, not as an error."""
    written = '{"nan": NaN, "inf": Infinity, "big": 1e400, "huge": 123456789012345678901234567890}'
    job, _ = await store.create(_job())
    await store.append_event(job.id, "status", {"n": 1})
    key = f"{store.prefix}:events:{job.id}"
    waiting = asyncio.create_task(store.read_events(job.id, after=1, wait_s=30))
    for _ in range(200):
        if dict(await raw.pubsub_numsub(key)).get(key.encode(), 0):
            break
        await asyncio.sleep(0.01)
    await raw.xadd(key, {"type": "status", "data": written}, id="2-0")
    await raw.publish(key, f"2 status {written}")
    published = await asyncio.wait_for(waiting, 10)
    logged = await store.read_events(job.id, after=1)
    for events in (published, logged):
        assert [(e.id, e.type) for e in events] == [(2, "status")]
        data = events[0].data
        assert isinstance(data, dict)
        assert math.isnan(data["nan"])
        assert data["inf"] == data["big"] == math.inf
        assert data["huge"] == 123456789012345678901234567890


async def test_a_flag_raised_without_the_cancel_mark_is_seen_at_the_next_full_read(
    store: RedisStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel flag an older web process raised (it does not move the mark) still
    cancels the job, within ``FULL_READ_S``."""
    monkeypatch.setattr(cancel_watch, "FULL_READ_S", 0.5)
    watch = cancel_watch.CancelWatch(store)
    job, _ = await store.create(_job())
    flagged = watch.add(job.id, 0.05)
    await asyncio.sleep(0.2)
    mark = await store.cancel_mark()
    await raw.set(f"{store.prefix}:cancel:{job.id}", b"1")
    async with asyncio.timeout(3):
        await flagged
    assert await store.cancel_mark() == mark
    watch.remove(job.id)


async def test_read_with_nothing_new_returns_empty_after_the_wait(store: RedisStore) -> None:
    """Reading past the last event with a short wait returns an empty list, not an error."""
    job, _ = await store.create(_job())
    await store.append_event(job.id, "status", {})
    assert await store.read_events(job.id, after=1, wait_s=0.05) == []
    assert await store.read_events(job.id, after=1) == []


async def test_list_filters_by_status_and_pages_all_tenants(store: RedisStore) -> None:
    """Listing by status and across tenants pages newest first with no gap or repeat."""
    ids = []
    for n in range(7):
        job = _job(tenant=f"tenant{n % 2}")
        job.created_at += n
        ids.append((await store.create(job))[0].id)
    for job_id in ids[::2]:
        await store.update(job_id, status=JobStatus.RUNNING)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await store.list_jobs(None, status=JobStatus.RUNNING, limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == ids[::2][::-1]
    tenant0, _ = await store.list_jobs("tenant0", status=JobStatus.QUEUED, limit=50)
    assert [j.id for j in tenant0] == []
    tenant1, _ = await store.list_jobs("tenant1", status=JobStatus.QUEUED, limit=50)
    assert [j.id for j in tenant1] == [ids[5], ids[3], ids[1]]


async def test_equal_timestamps_page_without_gaps(store: RedisStore) -> None:
    """Jobs created at the same instant are still paged completely by the cursor."""
    stamp = 1_700_000_000.5
    made = set()
    for _ in range(5):
        job = _job("same")
        job.created_at = stamp
        made.add((await store.create(job))[0].id)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await store.list_jobs("same", limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5


async def test_every_key_of_a_job_expires_and_updates_refresh_it(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    """Job, artifacts, events, trace, cancel flag and cache carry the TTL; an update renews it."""
    job, _ = await store.create(_job())
    await store.put_artifact(job.id, _artifact("pitch"))
    await store.append_event(job.id, "status", {})
    await store.add_trace(job.id, {"step": "brief"})
    await store.request_cancel(job.id)
    await store.cache_put("k1", _artifact("brief"))
    keys = [k async for k in raw.scan_iter(match=f"{store.prefix}:*")]
    per_job = [k for k in keys if b":index:" not in k]
    assert len(per_job) >= 7
    for key in per_job:
        assert 0 < await raw.ttl(key) <= 3600, key
    await raw.expire(f"{store.prefix}:artifacts:{job.id}", 10)
    await store.update(job.id, status=JobStatus.RUNNING)
    assert await raw.ttl(f"{store.prefix}:artifacts:{job.id}") > 3000


async def test_counts_follow_transitions_and_drop_expired_jobs(raw: aioredis.Redis) -> None:
    """Status counts track CAS transitions, and jobs that expired stop being counted and listed."""
    store = RedisStore.from_url(redis_url(), prefix=unique_prefix(), ttl_s=1)
    first, _ = await store.create(_job())
    second, _ = await store.create(_job())
    await store.update(first.id, expect={JobStatus.QUEUED}, status=JobStatus.RUNNING)
    await store.update(second.id, expect={JobStatus.QUEUED}, status=JobStatus.CANCELLED)
    counts = await store.count_by_status()
    assert (counts[JobStatus.QUEUED], counts[JobStatus.RUNNING], counts[JobStatus.CANCELLED]) == (0, 1, 1)
    await raw.pexpire(f"{store.prefix}:job:{first.id}", 1)
    await raw.pexpire(f"{store.prefix}:job:{second.id}", 1)
    await asyncio.sleep(1.1)  # expired, and old enough (> TTL) to be pruned from the indexes
    assert sum((await store.count_by_status()).values()) == 0
    assert (await store.list_jobs("t1"))[0] == []
    assert await raw.zcard(f"{store.prefix}:index:all") == 0
    await store.close()


async def test_ping_fails_fast_where_nothing_listens() -> None:
    """ping raises StoreUnavailable within 1 s when no Redis listens on the port."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}", prefix=unique_prefix())
    async with asyncio.timeout(1.0):
        with pytest.raises(StoreUnavailable):
            await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get("any")
    await store.close()


def _pause(server: RedisServer, millis: int) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"CLIENT PAUSE {millis} ALL\r\n".encode())
        assert sock.recv(16).startswith(b"+OK")


async def _until_ping_ok(store: RedisStore, limit_s: float = 15.0) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            try:
                await store.ping()
                return
            except StoreUnavailable:
                await asyncio.sleep(0.1)


async def test_ping_fails_fast_on_a_hung_redis_and_recovers(own_redis: RedisServer) -> None:
    """A paused Redis makes ping raise within 1 s; when it resumes, the same store answers again."""
    store = RedisStore.from_url(own_redis.url, prefix=unique_prefix())
    await store.ping()
    _pause(own_redis, 1500)
    async with asyncio.timeout(1.0):
        with pytest.raises(StoreUnavailable):
            await store.ping()
    await _until_ping_ok(store)
    job, _ = await store.create(_job())
    assert await store.get(job.id) is not None
    await store.close()


async def test_store_recovers_after_redis_restarts(own_redis: RedisServer) -> None:
    """With Redis down ping and reads raise StoreUnavailable; after a restart they work again."""
    store = RedisStore.from_url(own_redis.url, prefix=unique_prefix())
    job, _ = await store.create(_job())
    own_redis.stop()
    async with asyncio.timeout(1.0):
        with pytest.raises(StoreUnavailable):
            await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get(job.id)
    own_redis.resume()
    await _until_ping_ok(store)
    await store.create(_job())
    assert (await store.count_by_status())[JobStatus.QUEUED] >= 1
    await store.close()


async def test_the_first_reads_after_a_restart_reconnect(own_redis: RedisServer) -> None:
    """After Redis restarted under idle pooled connections, the first health check and the
    first blocking event read (an SSE stream) connect again instead of failing once per
    dead connection."""
    store = RedisStore.from_url(own_redis.url, prefix=unique_prefix())
    queue = SaqQueue.from_url(own_redis.url, prefix=unique_prefix())
    await queue.open()
    job, _ = await store.create(_job())
    await store.ping()
    await queue.ping()
    assert await store.read_events(job.id, 10**6, wait_s=0.05) == []  # a blocking read
    own_redis.restart()
    await store.ping()
    await queue.ping()
    assert await store.read_events(job.id, 10**6, wait_s=0.05) == []
    await queue.close()
    await store.close()


async def test_a_task_polling_the_store_always_stops_when_cancelled(store: RedisStore) -> None:
    """Cancelling a task mid store call always ends it (redis-py's socket-timeout path on
    Python 3.11 could swallow the cancel and leave such a task, e.g. a cancel watcher, running)."""
    job, _ = await store.create(_job())

    async def poll() -> None:
        while True:
            await store.cancel_requested(job.id)
            await asyncio.sleep(0)

    survivors = 0
    for n in range(200):
        task = asyncio.create_task(poll())
        await asyncio.sleep((n % 7) * 0.0003)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            survivors += 1
            task.cancel()
    assert survivors == 0


async def test_batched_writes_survive_a_script_cache_flush(own_redis: RedisServer) -> None:
    """Writes sent together in one turn each get their own answer, and a Redis that
    forgot its scripts (restart, SCRIPT FLUSH) has them loaded again on the next write."""
    store = RedisStore.from_url(own_redis.url, prefix=unique_prefix(), ttl_s=3600)
    raw = aioredis.Redis.from_url(own_redis.url)
    try:
        jobs = [job for job, _ in await asyncio.gather(*(store.create(_job()) for _ in range(20)))]
        await raw.script_flush()
        moved = await asyncio.gather(
            *(
                store.update(
                    job.id,
                    expect={JobStatus.QUEUED} if n % 2 else {JobStatus.RUNNING},
                    status=JobStatus.RUNNING,
                )
                for n, job in enumerate(jobs)
            )
        )
        assert [m is not None for m in moved] == [n % 2 == 1 for n in range(20)]
        await raw.script_flush()
        held = await store.commit(
            jobs[1].id,
            expect={JobStatus.RUNNING},
            events=[("status", {"n": 1})],
            artifacts=[_artifact("brief")],
        )
        assert held
        assert [e.data for e in await store.read_events(jobs[1].id)] == [{"n": 1}]
        assert [a.name for a in await store.list_artifacts(jobs[1].id)] == ["brief"]
    finally:
        await raw.aclose()
        await store.close()
