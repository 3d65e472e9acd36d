"""Pieces of ``bench/fanout.py`` that run apart or stand alone: the load client (its
own process: ``python bench/fanout_parts.py --client SPEC OUT``), the floor app
(``--floor-app PORT``: events on a timer, or at planned times), the web process's
meters and the write-time probe, and the counting proxy in front of moto."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.throughput import rss_kib  # noqa: E402 - after sys.path

PARTS = Path(__file__).resolve()
PREFIX = "bench-f"
CONNECT_PARALLEL = 100
"""Streams the client opens at once (the rest wait for a slot until headers arrived)."""

# -- the load client (its own process) -----------------------------------------------


@dataclass
class Followed:
    path: str
    opened: float = 0.0
    done: bool = False
    cut: str = ""
    events: list[tuple[int, str, float, float]] = field(default_factory=list)
    """(id or -1, type, receipt time, send time carried by a floor event or 0)."""


_T_RE = re.compile(rb'"t": ?([0-9.]+)')


async def _follow(host: str, port: int, rec: Followed, slots: asyncio.Semaphore, floor: bool) -> None:
    try:
        async with slots:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {rec.path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            rec.opened = time.time()
        if not head.startswith(b"HTTP/1.1 200"):
            rec.cut = head.split(b"\r\n", 1)[0].decode()
            return
        buf = b""
        while True:
            size_line = await reader.readline()
            if not size_line:
                rec.cut = "eof"
                return
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                rec.cut = "" if rec.done else "ended without done"
                return
            chunk = await reader.readexactly(size + 2)
            now = time.time()
            buf += chunk[:-2]
            while b"\r\n\r\n" in buf:  # Litestar ends lines with CRLF
                message, _, buf = buf.partition(b"\r\n\r\n")
                event_id, kind, sent = -1, "", 0.0
                for line in message.split(b"\r\n"):
                    if line.startswith(b"id: "):
                        event_id = int(line[4:])
                    elif line.startswith(b"event: "):
                        kind = line[7:].decode()
                if not kind:
                    continue  # retry: or a heartbeat
                if floor:
                    found = _T_RE.search(message)
                    sent = float(found.group(1)) if found else 0.0
                rec.events.append((event_id, kind, now, sent))
                if kind == "done":
                    rec.done = True
        writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        rec.cut = repr(exc)


async def client_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())  # noqa: ASYNC240 - before any stream opens
    slots = asyncio.Semaphore(CONNECT_PARALLEL)
    recs = [Followed(path) for path in spec["paths"]]
    started = time.process_time()
    tasks = [
        asyncio.ensure_future(_follow(spec["host"], spec["port"], r, slots, spec["floor"])) for r in recs
    ]
    _, pending = await asyncio.wait(tasks, timeout=spec["limit_s"])
    for task in pending:
        task.cancel()
    for rec, task in zip(recs, tasks, strict=True):
        if task in pending and not rec.done:
            rec.cut = rec.cut or "client limit reached"
    out = {
        "cpu_s": time.process_time() - started,
        "streams": [
            {"path": r.path, "opened": r.opened, "done": r.done, "cut": r.cut, "events": r.events}
            for r in recs
        ],
    }
    Path(out_path).write_text(json.dumps(out))  # noqa: ASYNC240 - after every stream ended


# -- the floor: a bare Litestar SSE endpoint ------------------------------------------


def floor_app(port: int) -> None:
    import uvicorn
    from litestar import Litestar, get
    from litestar.response import ServerSentEvent, ServerSentEventMessage

    pad = "x" * 300  # about the size of a status event

    @get("/s/{n:int}")
    async def stream(n: int, events: int, interval: float) -> ServerSentEvent:
        async def messages() -> Any:
            yield ServerSentEventMessage(data=None, retry=2000)
            await asyncio.sleep(random.uniform(0, interval))
            for i in range(1, events + 1):
                yield ServerSentEventMessage(
                    id=i, event="status", data=json.dumps({"t": time.time(), "p": pad})
                )
                await asyncio.sleep(interval)
            yield ServerSentEventMessage(id=events + 1, event="done", data=json.dumps({"t": time.time()}))

        return ServerSentEvent(messages())

    @get("/p/{n:int}")
    async def planned(n: int, start: float, at: str) -> ServerSentEvent:
        """Events at planned times: ``start`` (epoch s) plus each of ``at`` (s). An event
        carries its planned time, as a jobq event's lag counts from its write: a timer
        that fires late (a busy loop) is part of the lag."""
        times = [float(t) for t in at.split(",") if t]

        async def messages() -> Any:
            yield ServerSentEventMessage(data=None, retry=2000)
            for i, t in enumerate(times, 1):
                delay = start + t - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield ServerSentEventMessage(
                    id=i, event="status", data=json.dumps({"t": start + t, "p": pad})
                )
            yield ServerSentEventMessage(id=len(times) + 1, event="done", data=json.dumps({"t": time.time()}))

        return ServerSentEvent(messages())

    app = Litestar(
        [stream, planned], logging_config=None, signature_namespace={"ServerSentEvent": ServerSentEvent}
    )
    # As ``jobq serve`` runs uvicorn (handlers/cli.py).
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        timeout_graceful_shutdown=5,
        proxy_headers=True,
        backlog=4096,
    )


# -- measuring the web process ----------------------------------------------------------


def tcp_to_port(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    remote = f":{port:04X} 01 "  # the remote address's port, then the state ESTABLISHED
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            if remote in line and line.split()[9] in inodes:
                count += 1
    return count


@dataclass
class Sampler:
    pid: int
    redis_port: int | None
    conns: int = 0
    rss_peak: int = 0
    series: list[int] = field(default_factory=list)
    redis: Any = None
    clients_peak: int = 0
    """Every client connected to Redis (``INFO clients``), web, worker and this bench."""
    task: asyncio.Task[None] | None = None

    CONNS_EVERY = 5
    """Connections are counted every this many RSS samples (1 s apart): the kernel
    writes out every TCP socket of the machine for each count (``/proc/net/tcp``, some
    6,000 at 2,000 streams), CPU taken from the web process being measured."""

    async def run(self) -> None:
        for tick in itertools.count():
            self.rss_peak = max(self.rss_peak, rss_kib(self.pid))
            if tick % self.CONNS_EVERY == 0:
                await self._count_connections()
            await asyncio.sleep(1.0)

    async def _count_connections(self) -> None:
        if self.redis_port is not None:
            self.series.append(tcp_to_port(self.pid, self.redis_port))
            self.conns = max(self.conns, self.series[-1])
        if self.redis is not None:
            # Not CLIENT LIST: with thousands of clients it blocks Redis, and parsing its
            # reply here takes CPU from the web process being measured.
            clients = (await self.redis.info("clients"))["connected_clients"]
            self.clients_peak = max(self.clients_peak, clients)

    def start(self) -> Sampler:
        self.task = asyncio.ensure_future(self.run())
        return self

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class WriteProbe:
    """Stamps every XADD on a job's event stream as Redis announces it (keyspace
    notifications). The notifications are read off a raw socket and matched with one
    regular expression per received chunk, every message of a chunk stamped with the
    chunk's arrival: the probe shares the machine's cores with the web process it
    measures, and a full client parsing tens of thousands of messages in the same
    bursts as the web process would take CPU from it exactly then."""

    MESSAGE = re.compile(
        rb"\*4\r\n\$8\r\npmessage\r\n"  # RESP2: [pmessage, pattern, channel, event]
        rb"\$\d+\r\n[^\r]*\r\n\$\d+\r\n([^\r]*)\r\n\$\d+\r\n([^\r]*)\r\n"
    )

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis

        self.url = url
        self.redis = Redis.from_url(url)
        self.counts: dict[bytes, int] = defaultdict(int)
        self.stamps: dict[tuple[bytes, int], float] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def times(self) -> dict[tuple[str, int], float]:
        """Write time (epoch s) of each (job id, event id)."""
        return {(job.decode(), n): at for (job, n), at in self.stamps.items()}

    async def start(self) -> None:
        from urllib.parse import urlparse

        await self.redis.config_set("notify-keyspace-events", "Kt")
        marker = f"__keyspace@0__:{PREFIX}:events:".encode()
        where = urlparse(self.url)
        reader, self.writer = await asyncio.open_connection(where.hostname, where.port)
        pattern = marker + b"*"
        self.writer.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pattern), pattern))
        confirmed = await reader.readuntil(pattern + b"\r\n:1\r\n")
        assert b"psubscribe" in confirmed

        async def listen() -> None:
            pending = b""
            while chunk := await reader.read(1 << 20):
                at = time.time()
                pending += chunk
                end = 0
                for match in self.MESSAGE.finditer(pending):
                    end = match.end()
                    channel, event = match.groups()
                    if event == b"xadd" and channel.startswith(marker):
                        job = channel[len(marker) :]
                        self.counts[job] += 1
                        self.stamps[(job, self.counts[job])] = at
                pending = pending[end:]

        self.task = asyncio.ensure_future(listen())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()
        await self.redis.aclose()


# -- aws ----------------------------------------------------------------------------


class CountingProxy:
    """TCP proxy to moto that counts the HTTP requests going through it (LIST apart)."""

    REQUEST = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (\S*) HTTP/1\.1\r\n")

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.counts: dict[str, int] = defaultdict(int)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def reset(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), defaultdict(int)
        return counts

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        handler.add_done_callback(self.handlers.discard)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        for method, path in self.REQUEST.findall(data):
                            kind = "LIST" if b"list-type=2" in path else method.decode()
                            self.counts[kind] += 1
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()
                self.writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def close(self) -> None:
        """Stop listening and end the connections still open (each pipe then reads its
        end), so none is left for ``asyncio.run`` to cancel at exit."""
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=5)


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        asyncio.run(client_main(sys.argv[2], sys.argv[3]))
    elif sys.argv[1] == "--floor-app":
        floor_app(int(sys.argv[2]))
