"""Streams at scale (SPEC §7.2): one shared reader per web process, slow clients cut
off, a reader that survives a Redis restart, one S3 poller per job."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvloop
from redis.asyncio import Redis

from adapters import redis_feed
from adapters.redis_store import RedisStore
from bench.fanout_parts import tcp_to_port
from tests.support.redis_server import RedisServer, redis_backend_env, redis_url, unique_prefix
from tests.support.service import Service, base_env, running

BODY = {
    "project_title": "Fanout",
    "elevator_pitch": "A neighbourhood solar mesh with shared batteries and a local power market.",
    "language": "en",
}


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Service]:
    """``jobq serve`` on the redis backend with no worker: submitted jobs stay queued."""
    env = {**base_env(), **redis_backend_env(unique_prefix("fan")), "SUBMIT_RATE_PER_MIN": "0"}
    env["SSE_HEARTBEAT_S"] = "0.5"
    service = Service(backend="redis", env=env, log_dir=tmp_path)
    with running(_web_only(service)) as started:
        yield started


def _web_only(service: Service) -> Service:
    service.workers = 0
    return service


def _submit(service: Service, count: int) -> list[str]:
    with service.client() as client:
        ids = []
        for n in range(count):
            reply = client.post("/api/jobs", json={**BODY, "project_title": f"Fanout {n} {time.time()}"})
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["jobId"])
        return ids


async def _open_stream(
    port: int, job_id: str, last_id: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
    writer.write(f"GET /api/jobs/{job_id}/stream HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def _events_until_end(reader: asyncio.StreamReader) -> tuple[list[tuple[int, str]], bool]:
    """(id, type) of every event until the body ends; whether the body ended cleanly
    (chunked terminator) rather than by the connection closing."""
    events: list[tuple[int, str]] = []
    buf = b""
    while True:
        size_line = await reader.readline()
        if not size_line:
            return events, False
        size = int(size_line.strip(), 16)
        if size == 0:
            return events, True
        buf += (await reader.readexactly(size + 2))[:-2]
        while b"\r\n\r\n" in buf:
            message, _, buf = buf.partition(b"\r\n\r\n")
            fields = dict(line.split(b": ", 1) for line in message.split(b"\r\n") if b": " in line)
            if b"event" in fields:
                events.append((int(fields.get(b"id", b"-1")), fields[b"event"].decode()))


def test_open_streams_do_not_add_tcp_to_port(web: Service) -> None:
    """300 open streams (some jobs watched by three clients) leave the web process's
    Redis connections where 10 streams had them, and every stream still gets its
    job's events up to ``done`` when the jobs are cancelled."""
    redis_port = int(redis_url().rsplit(":", 1)[1])
    assert web._web is not None and web._web.popen is not None
    pid = web._web.popen.pid
    ids = _submit(web, 150)
    watched = [*ids, *ids[:100], *ids[:50]]  # jobs 0-49: three streams, 50-99: two, 100-149: one

    async def scenario() -> tuple[int, int, list[list[tuple[int, str]]]]:
        first = [await _open_stream(web.port, job_id) for job_id in watched[:10]]
        await asyncio.sleep(1.5)  # a few heartbeats: every stream waiting on the reader
        few = tcp_to_port(pid, redis_port)
        rest = await asyncio.gather(*(_open_stream(web.port, job_id) for job_id in watched[10:]))
        await asyncio.sleep(1.5)
        many = tcp_to_port(pid, redis_port)
        streams = [*first, *rest]
        async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as client:
            for job_id in ids:
                assert (await client.post(f"/api/jobs/{job_id}/cancel")).status_code == 200
        results = await asyncio.wait_for(asyncio.gather(*(_events_until_end(r) for r, _ in streams)), 60)
        for _, writer in streams:
            writer.close()
        return few, many, [events for events, _ in results]

    few, many, received = asyncio.run(scenario())
    assert len(watched) == 300
    assert many == few, f"{few} Redis connections with 10 streams, {many} with 300"
    assert many <= 16
    for events in received:
        assert events[-1][1] == "done"
        ids_seen = [event_id for event_id, _ in events]
        assert ids_seen == list(range(ids_seen[0], ids_seen[0] + len(ids_seen)))


def test_client_that_does_not_read_is_cut_off_and_resumes(web: Service) -> None:
    """A client that stops reading while its job writes megabytes of events is cut
    off (warning with the job id and reason in the web log) instead of buffered for;
    it gets whole events up to the cut and resumes with Last-Event-ID, no gap."""
    job_id = _submit(web, 1)[0]
    total = 80
    blob = "x" * 100_000

    async def scenario() -> tuple[list[tuple[int, str]], bool, list[tuple[int, str]]]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", web.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET /api/jobs/{job_id}/stream HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await writer.drain()
        store = RedisStore.from_url(web.env["REDIS_URL"], prefix=web.env["JOBS_KEY_PREFIX"])
        try:
            for n in range(total - 1):
                await store.append_event(job_id, "note", {"n": n, "blob": blob})
            await store.append_event(job_id, "done", {"status": "cancelled"})
        finally:
            await store.close()
        deadline = time.monotonic() + 60
        while "client_not_reading" not in (web.log_dir / "web.log").read_text():
            assert time.monotonic() < deadline, web.log_tail()
            await asyncio.sleep(0.2)
        await reader.readuntil(b"\r\n\r\n")
        cut, clean = await _events_until_end(reader)
        writer.close()
        reader2, writer2 = await _open_stream(web.port, job_id, last_id=cut[-1][0])
        rest, _ = await _events_until_end(reader2)
        writer2.close()
        return cut, clean, rest

    cut, clean, rest = asyncio.run(scenario())
    assert not clean
    assert cut and cut[-1][1] != "done"
    ids_seen = [event_id for event_id, _ in cut + rest]
    assert ids_seen[-1] == rest[-1][0] and rest[-1][1] == "done"
    assert ids_seen == list(range(ids_seen[0], ids_seen[-1] + 1))
    line = next(x for x in (web.log_dir / "web.log").read_text().splitlines() if "client_not_reading" in x)
    assert "warning" in line and job_id in line


def test_client_that_leaves_mid_stream_frees_its_watch(web: Service) -> None:
    """A client that closes its connection mid-stream ends the server's stream: once the
    watch's linger passes, the web process unsubscribes the job's channel in Redis."""
    job_id = _submit(web, 1)[0]
    channel = f"{web.env['JOBS_KEY_PREFIX']}:events:{job_id}"

    async def subscribers_once(redis: Redis, want: int, within_s: float) -> int:
        """The channel's subscriber count once it is ``want``, or after ``within_s``."""
        for _ in range(int(within_s / 0.1)):
            count = int(dict(await redis.pubsub_numsub(channel)).get(channel.encode(), 0))
            if count == want:
                break
            await asyncio.sleep(0.1)
        return count

    async def scenario() -> tuple[int, int]:
        redis = Redis.from_url(web.env["REDIS_URL"])
        try:
            _, writer = await _open_stream(web.port, job_id)
            watching = await subscribers_once(redis, 1, 10)
            writer.close()
            return watching, await subscribers_once(redis, 0, redis_feed.LINGER_S + 10)
        finally:
            await redis.aclose()

    watching, after = asyncio.run(scenario())
    assert watching == 1
    assert after == 0, "the stream of a client that left still waits on its job"


def test_stream_whose_store_fails_ends_cleanly_and_is_logged(tmp_path: Path) -> None:
    """When Redis goes away under an open stream, the server ends the stream with the
    chunked terminator after whole events (the client resumes with Last-Event-ID) and
    logs it at warning level with the job id and the reason."""
    server = RedisServer.start(persistent=False)
    env = {**base_env(), **redis_backend_env(unique_prefix("gone")), "SUBMIT_RATE_PER_MIN": "0"}
    env.update(REDIS_URL=server.url, SSE_HEARTBEAT_S="0.5")
    service = _web_only(Service(backend="redis", env=env, log_dir=tmp_path))
    try:
        with running(service) as web:
            job_id = _submit(web, 1)[0]

            async def scenario() -> tuple[bytes, list[tuple[int, str]], bool]:
                reader, writer = await _open_stream(web.port, job_id)
                first = b""
                while b"event: " not in first:  # whole chunks, up to the first with events
                    size = int(await reader.readline(), 16)
                    first += await reader.readexactly(size + 2)
                server.close()
                events, clean = await asyncio.wait_for(_events_until_end(reader), 30)
                writer.close()
                return first, events, clean

            first, _, clean = asyncio.run(scenario())
            log = (tmp_path / "web.log").read_text()
    finally:
        server.close()
    assert b"id: 1" in first
    assert clean, "the stream was cut, not ended"
    line = next(x for x in log.splitlines() if "sse_stream_ended" in x)
    assert "warning" in line and job_id in line and "error" in line


@pytest.mark.parametrize("read_path", ["takeover", "takeover on uvloop", "read_response"])
def test_reader_survives_redis_restart_without_gap_or_duplicate(
    read_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers waiting through the shared reader while Redis restarts (twice) each
    see every event of their job once, in order, on one reader connection; handled in
    the transport's read callback (on asyncio's loop and on uvloop's, which ``jobq
    serve`` runs on), or read through redis-py's ``read_response`` where the
    connection cannot be taken over."""
    if read_path == "read_response":
        monkeypatch.setattr(redis_feed, "_take_over", lambda conn, subscriber: None)
    server = RedisServer.start(persistent=True)

    async def scenario() -> dict[str, list[int]]:
        writer = RedisStore.from_url(server.url, prefix="r")
        reader = RedisStore.from_url(server.url, prefix="r")
        jobs = [f"job{n}" for n in range(20)]
        seen: dict[str, list[int]] = {}
        reads_after_restarts = 0

        async def follow(job_id: str, key: str) -> None:
            after, ids = 0, []
            while not ids or ids[-1] < 30:
                for event in await reader.read_events(job_id, after, wait_s=0.5):
                    ids.append(event.id)
                    after = event.id
            seen[key] = ids

        followers = [asyncio.create_task(follow(j, f"{j}/{c}")) for j in jobs for c in range(2)]
        await asyncio.sleep(0.5)
        first_task = reader._events.feed._reader.task
        subscriber = reader._events.feed._reader
        assert subscriber.conn is not None
        assert (subscriber.takeover is not None) == read_path.startswith("takeover")
        try:
            for n in range(30):
                for job_id in jobs:
                    await writer.append_event(job_id, "note", {"n": n})
                if n in (10, 20):
                    await asyncio.to_thread(server.restart, 0.5)
                    reads_after_restarts = reader._events.feed.reads
                await asyncio.sleep(0.02)
            await asyncio.wait_for(asyncio.gather(*followers), 60)
            feed = reader._events.feed
            # The same reader task delivers after both restarts (not a restarted one).
            assert first_task is not None and feed._reader.task is first_task and not first_task.done()
            assert feed.reads > reads_after_restarts
            assert feed.watched <= len(jobs)
        finally:
            for task in followers:
                task.cancel()
            await writer.close()
            await reader.close()
        return seen

    try:
        loop_factory = uvloop.new_event_loop if read_path.endswith("uvloop") else None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            seen = runner.run(scenario())
    finally:
        server.close()
    assert len(seen) == 40
    for key, ids in seen.items():
        assert ids == list(range(1, 31)), key


def test_s3_streams_of_one_job_share_one_poller(aws_env: dict[str, str]) -> None:
    """Twenty readers waiting on one job of the S3 store share one poller, and all of
    them get the events appended meanwhile, in order."""
    from adapters.s3_store import S3Store

    bucket, _, prefix = aws_env["JOBS_STORE_URL"].removeprefix("s3://").partition("/")

    endpoint, region = aws_env["AWS_ENDPOINT_URL"], aws_env["AWS_REGION"]

    async def scenario() -> tuple[int, list[list[int]]]:
        store = S3Store(bucket, prefix, endpoint_url=endpoint, region=region)
        writer = S3Store(bucket, prefix, endpoint_url=endpoint, region=region)
        polling = 0

        async def follow() -> list[int]:
            after, ids = 0, []
            while not ids or ids[-1] < 5:
                for event in await store.read_events("job-s3", after, wait_s=1.0):
                    ids.append(event.id)
                    after = event.id
            return ids

        try:
            followers = [asyncio.create_task(follow()) for _ in range(20)]
            await asyncio.sleep(0.5)
            polling = store._feed.polling
            for n in range(5):
                await writer.append_event("job-s3", "note", {"n": n})
                await asyncio.sleep(0.3)
            return polling, await asyncio.wait_for(asyncio.gather(*followers), 60)
        finally:
            await store.close()
            await writer.close()

    polling, seen = asyncio.run(scenario())
    assert polling == 1
    assert all(ids == [1, 2, 3, 4, 5] for ids in seen)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from tests.support.moto_server import aws_backend_env

    env = aws_backend_env("fan" + unique_prefix("s").lower())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, env[name])
    return env


def test_writer_that_does_not_publish_is_still_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event written without the PUBLISH (as an older worker during a rolling deploy
    would) reaches a waiting reader when its wait times out, not never."""
    monkeypatch.setattr(redis_feed, "QUIET_READ_S", 0.0)
    prefix = unique_prefix()

    async def scenario() -> list[tuple[int, str]]:
        reader = RedisStore.from_url(redis_url(), prefix=prefix)
        raw = Redis.from_url(redis_url())
        try:
            await reader.append_event("job", "status", {"n": 1})
            waiting = asyncio.create_task(reader.read_events("job", 1, wait_s=1.0))
            await asyncio.sleep(0.3)
            number = await raw.incr(f"{prefix}:evseq:job")
            await raw.xadd(f"{prefix}:events:job", {"type": "status", "data": '{"n": 2}'}, id=f"{number}-0")
            events = await asyncio.wait_for(waiting, 10)
            return [(event.id, event.type) for event in events]
        finally:
            await raw.aclose()
            await reader.close()

    assert asyncio.run(scenario()) == [(2, "status")]


def test_subscriber_reconnects_when_redis_stops_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that stops answering without closing the connection (frozen here) is
    given up after DEAD_S of silence: the subscriber reconnects, and a reader waiting
    through it gets the events written after Redis came back."""
    monkeypatch.setattr(redis_feed, "PRUNE_S", 0.1)
    monkeypatch.setattr(redis_feed, "PING_S", 0.2)
    monkeypatch.setattr(redis_feed, "DEAD_S", 1.0)
    server = RedisServer.start(persistent=False)

    async def scenario() -> tuple[int, list[int]]:
        writer = RedisStore.from_url(server.url, prefix="s")
        reader = RedisStore.from_url(server.url, prefix="s")
        try:
            await writer.append_event("job", "status", {"n": 1})
            waiting = asyncio.create_task(reader.read_events("job", 1, wait_s=30))
            await asyncio.sleep(0.5)
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(2.0)
            server.process.send_signal(signal.SIGCONT)
            subscriber = reader._events.feed._reader
            for _ in range(100):
                if subscriber.connects >= 2 and subscriber.live:
                    break
                await asyncio.sleep(0.05)
            await writer.append_event("job", "status", {"n": 2})
            events = await asyncio.wait_for(waiting, 10)
            return subscriber.connects, [event.id for event in events]
        finally:
            await writer.close()
            await reader.close()

    try:
        connects, ids = asyncio.run(scenario())
    finally:
        server.close()
    assert connects >= 2, "the subscriber kept its silent connection"
    assert ids == [2]
