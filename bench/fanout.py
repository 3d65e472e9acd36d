"""Streams at scale (issue 13): thousands of SSE clients on one web process.

redis backend, per N (500, 1,000, 2,000): a private ``redis-server``, a real ``jobq
serve`` and one real ``jobq worker`` (``WORKER_CONCURRENCY`` N, ``LIVE_DELTAS=0``,
offline provider at ``--latency-ms`` per call, so each job runs for minutes), N jobs
submitted at once and N streams, each following its own job, opened by the load
client (this file with ``--client``: its own process, asyncio raw sockets, parses
only the chunk framing and the ``id:``/``event:`` lines). Per N:

- streams that reached ``done``, and streams cut (the connection ended before it);
- delivery lag p50/p99: an event's write time to the client's receipt, counting
  only events written after the stream opened. The write time is taken from
  Redis itself: the bench enables keyspace notifications for streams on its private
  Redis and a subscriber in this process stamps each ``xadd`` on a job's event
  stream as it arrives (ids are consecutive per job, so the n-th ``xadd`` of a job
  is event n);
- Redis connections held by the web process (its TCP sockets to Redis's port, read
  from ``/proc``; the maximum of 1 s samples), its RSS (peak, and peak minus the RSS
  before the streams opened, per stream) and its CPU (seconds, % of one core);
- the floor in the same run: a bare Litestar SSE endpoint under the same uvicorn
  settings as ``jobq serve``, sending each stream the same number of events over the
  same time from an in-process timer (each event carries its send time), followed by
  the same client.

aws backend: moto server (in this process), ``jobq serve`` and ``jobq worker`` on
the aws backend; the web process reaches S3 through a counting proxy here, so its S3
requests are counted apart from the worker's. (a) 200 streams, each following its
own running job; (b) 10 queued jobs nobody runs (idle), 20 streams each, for 60 s:
S3 requests per stream-minute and per idle job per second.

Usage: ``python bench/fanout.py [--quick] [--ns 500,1000,2000] [--latency-ms 4000]``
(``--quick``: N=100 and a short aws run, BENCHMARKS.md left alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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

from bench.report import write_section  # noqa: E402 - after sys.path
from bench.throughput import (  # noqa: E402 - after sys.path
    Child,
    child_env,
    cpu_s,
    http_ok,
    loop_ms,
    rss_kib,
    start_worker,
    submit_jobs,
    wait_until,
)

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
    spec = json.loads(Path(spec_path).read_text())
    slots = asyncio.Semaphore(CONNECT_PARALLEL)
    recs = [Followed(path) for path in spec["paths"]]
    started = time.process_time()
    tasks = [
        asyncio.ensure_future(_follow(spec["host"], spec["port"], r, slots, spec["floor"])) for r in recs
    ]
    done, pending = await asyncio.wait(tasks, timeout=spec["limit_s"])
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
    Path(out_path).write_text(json.dumps(out))


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

    app = Litestar([stream], logging_config=None, signature_namespace={"ServerSentEvent": ServerSentEvent})
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=5, proxy_headers=True
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
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port and parts[9] in inodes:
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
    """Every client connected to Redis (CLIENT LIST), web, worker and this bench."""
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            self.rss_peak = max(self.rss_peak, rss_kib(self.pid))
            if self.redis_port is not None:
                self.series.append(tcp_to_port(self.pid, self.redis_port))
                self.conns = max(self.conns, self.series[-1])
            if self.redis is not None:
                self.clients_peak = max(self.clients_peak, len(await self.redis.client_list()))
            await asyncio.sleep(1.0)

    def start(self) -> Sampler:
        self.task = asyncio.ensure_future(self.run())
        return self

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class WriteProbe:
    """Stamps every XADD on a job's event stream as Redis announces it."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url)
        self.counts: dict[str, int] = defaultdict(int)
        self.times: dict[tuple[str, int], float] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.redis.config_set("notify-keyspace-events", "Kt")
        pubsub = self.redis.pubsub()
        marker = f"__keyspace@0__:{PREFIX}:events:"
        await pubsub.psubscribe(marker + "*")

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] != "pmessage" or message["data"] != b"xadd":
                    continue
                job = message["channel"].decode()[len(marker) :]
                self.counts[job] += 1
                self.times[(job, self.counts[job])] = time.time()

        self.task = asyncio.ensure_future(listen())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.redis.aclose()


# -- one run -------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def run_client(
    logs: Path, name: str, port: int, paths: list[str], floor: bool, limit_s: float
) -> dict[str, Any]:
    spec = logs / f"{name}-spec.json"
    out = logs / f"{name}-out.json"
    spec.write_text(
        json.dumps({"host": "127.0.0.1", "port": port, "paths": paths, "floor": floor, "limit_s": limit_s})
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", str(spec), str(out))
    await proc.wait()
    return dict(json.loads(out.read_text()))


def summarize(result: dict[str, Any], write_times: dict[tuple[str, int], float] | None) -> dict[str, Any]:
    lags: list[float] = []
    streams = result["streams"]
    for s in streams:
        job = s["path"].split("/")[3] if write_times is not None else ""
        for event_id, _kind, received, sent in s["events"]:
            written = sent if write_times is None else write_times.get((job, event_id))
            if written and written >= s["opened"]:
                lags.append((received - written) * 1000)
    cuts: dict[str, int] = defaultdict(int)
    for s in streams:
        if not s["done"]:
            cuts[s["cut"] or "?"] += 1
    return {
        "n": len(streams),
        "done": sum(s["done"] for s in streams),
        "cuts": dict(cuts),
        "events": sum(len(s["events"]) for s in streams),
        "lag_n": len(lags),
        "p50": _pct(lags, 0.5),
        "p99": _pct(lags, 0.99),
        "client_cpu_s": result["cpu_s"],
    }


async def jobq_run(n: int, logs: Path, latency_ms: int, tree: Path | None = None) -> dict[str, Any]:
    from tests.support.redis_server import RedisServer, free_port

    server = RedisServer.start(persistent=False)
    port = free_port()
    in_tree = {} if tree is None else {"PYTHONPATH": str(tree)}
    env = child_env(server.url, PREFIX, LIVE_DELTAS="0", SSE_HEARTBEAT_S="15", **in_tree)
    serve = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)]
    web = Child(f"fanout-web-{n}", serve, env, logs, cwd=tree or ROOT)
    worker = start_worker(
        server.url,
        PREFIX,
        logs,
        f"fanout-worker-{n}",
        tree=tree,
        LLM_OFFLINE_LATENCY_MS=str(latency_ms),
        LIVE_DELTAS="0",
        WORKER_CONCURRENCY=str(n + 10),
        LOG_LEVEL="warning",
    )
    probe = WriteProbe(server.url)
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/api/jobs/health"), "jobq serve")
        await probe.start()
        rss_before = rss_kib(web.pid)
        sampler = Sampler(web.pid, server.port, redis=probe.redis).start()
        ids = await submit_jobs(server.url, PREFIX, n)
        cpu_before, began = cpu_s(web.pid), time.monotonic()
        result = await run_client(
            logs, f"fanout-jobq-{n}", port, [f"/api/jobs/{i}/stream" for i in ids], False, 900
        )
        wall = time.monotonic() - began
        cpu = cpu_s(web.pid) - cpu_before
        sampler.stop()
        summary = summarize(result, probe.times)
        summary.update(
            conns=sampler.conns,
            rss_mib=sampler.rss_peak / 1024,
            rss_per_stream_kib=(sampler.rss_peak - rss_before) / n,
            cpu_s=cpu,
            cpu_pct=100 * cpu / wall,
            wall_s=wall,
            web_warnings=_warnings(web.log),
            conns_series=sampler.series,
            redis_clients_all=sampler.clients_peak,
        )
        return summary
    finally:
        await probe.stop()
        worker.stop()
        web.stop()
        server.close()


def _warnings(log: Path) -> int:
    return sum(
        1 for line in log.read_text(errors="replace").splitlines() if "warning" in line or "error" in line
    )


async def floor_run(n: int, logs: Path, events: int, interval: float) -> dict[str, Any]:
    from tests.support.redis_server import free_port

    port = free_port()
    app = Child(
        f"fanout-floor-{n}", [sys.executable, __file__, "--floor-app", str(port)], dict(os.environ), logs
    )
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/schema"), "floor app")
        rss_before = rss_kib(app.pid)
        sampler = Sampler(app.pid, None).start()
        cpu_before, began = cpu_s(app.pid), time.monotonic()
        paths = [f"/s/{i}?events={events}&interval={interval:.3f}" for i in range(n)]
        result = await run_client(logs, f"fanout-floor-{n}", port, paths, True, 900)
        wall = time.monotonic() - began
        cpu = cpu_s(app.pid) - cpu_before
        sampler.stop()
        summary = summarize(result, None)
        summary.update(
            conns=0,
            rss_mib=sampler.rss_peak / 1024,
            rss_per_stream_kib=(sampler.rss_peak - rss_before) / n,
            cpu_s=cpu,
            cpu_pct=100 * cpu / wall,
            wall_s=wall,
        )
        return summary
    finally:
        app.stop()


# -- aws ------------------------------------------------------------------------------


class CountingProxy:
    """TCP proxy to moto that counts the HTTP requests going through it (LIST apart)."""

    REQUEST = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (\S*) HTTP/1\.1\r\n")

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.counts: dict[str, int] = defaultdict(int)
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def reset(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), defaultdict(int)
        return counts

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

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

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def aws_run(
    logs: Path, streams: int, idle_jobs: int, per_idle: int, idle_s: float, latency_ms: int
) -> dict[str, Any]:
    from tests.support.moto_server import aws_backend_env
    from tests.support.redis_server import free_port

    env_aws = aws_backend_env(f"fanout{random.randrange(10**6)}", visibility_timeout_s=600)
    moto_port = int(env_aws["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = CountingProxy(moto_port)
    proxy_port = await proxy.start()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "LLM_", "AWS_", "REDIS_"))}
    common = {**base, **env_aws, "LOG_LEVEL": "warning", "SUBMIT_RATE_PER_MIN": "0", "LIVE_DELTAS": "0"}
    web_env = {**common, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}"}
    port = free_port()
    web = Child(
        "fanout-aws-web", [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)], web_env, logs
    )
    worker: Child | None = None
    out: dict[str, Any] = {}
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/api/jobs/health"), "jobq serve (aws)")
        # (b) idle jobs: queued, no worker yet.
        idle_ids = await _submit_aws(common, idle_jobs)
        paths = [f"/api/jobs/{i}/stream" for i in idle_ids for _ in range(per_idle)]
        proxy.reset()
        await run_client(logs, "fanout-aws-idle", port, paths, False, idle_s)
        counts = proxy.reset()
        total = sum(counts.values())
        out["idle"] = {
            "jobs": idle_jobs,
            "streams": len(paths),
            "seconds": idle_s,
            "counts": counts,
            "per_job_s": total / idle_jobs / idle_s,
            "per_stream_min": total / len(paths) / (idle_s / 60),
        }
        # (a) running jobs, one stream each.
        worker = Child(
            "fanout-aws-worker",
            [sys.executable, "-m", "handlers.cli", "worker"],
            {
                **common,
                "LLM_OFFLINE_LATENCY_MS": str(latency_ms),
                "WORKER_CONCURRENCY": str(streams + idle_jobs + 10),
            },
            logs,
        )
        ids = await _submit_aws(common, streams)
        proxy.reset()
        cpu_before, began = cpu_s(web.pid), time.monotonic()
        result = await run_client(
            logs, "fanout-aws-run", port, [f"/api/jobs/{i}/stream" for i in ids], False, 900
        )
        wall = time.monotonic() - began
        counts = proxy.reset()
        total = sum(counts.values())
        summary = summarize(result, None)
        stream_min = sum(
            (s["events"][-1][2] - s["opened"]) / 60 for s in result["streams"] if s["events"] and s["opened"]
        )
        summary.update(
            counts=counts,
            per_stream_min=total / stream_min if stream_min else float("nan"),
            cpu_pct=100 * (cpu_s(web.pid) - cpu_before) / wall,
            wall_s=wall,
        )
        out["run"] = summary
        return out
    finally:
        if worker is not None:
            worker.stop()
        web.stop()
        proxy.close()


async def _submit_aws(env: dict[str, str], count: int) -> list[str]:
    import uuid

    from bench.throughput import BODY
    from handlers.bootstrap import bootstrap
    from handlers.settings import Settings

    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(("JOBS_", "AWS_", "JOB_"))})
    container = bootstrap(settings)
    await container.open()
    try:
        jobs = await asyncio.gather(
            *(
                container.service.submit(
                    {**BODY, "project_title": f"Solar Mesh {uuid.uuid4().hex[:10]}"}, "bench"
                )
                for _ in range(count)
            )
        )
        return [job.id for job, _ in jobs]
    finally:
        await container.close()


# -- report -----------------------------------------------------------------------------


def table(
    rows: list[tuple[int, dict[str, Any], dict[str, Any]]], aws: dict[str, Any] | None, meta: dict[str, Any]
) -> str:
    lines = [
        "| N streams | server | reached `done` | cut | lag p50 ms | lag p99 ms | p99 / floor | "
        "Redis conns (web) | RSS MiB (per stream KiB) | web CPU s (% core) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, jobq, floor in rows:
        ratio = jobq["p99"] / floor["p99"] if floor["p99"] else float("nan")
        for name, r in (("jobq serve", jobq), ("floor", floor)):
            lines.append(
                f"| {n} | {name} | {r['done']}/{r['n']} | {sum(r['cuts'].values())} | {r['p50']:.0f} | "
                f"{r['p99']:.0f} | {f'{ratio:.2f}' if name == 'jobq serve' else ''} | "
                f"{r['conns'] if name == 'jobq serve' else '-'} | {r['rss_mib']:.0f} ({r['rss_per_stream_kib']:.1f}) | "
                f"{r['cpu_s']:.0f} ({r['cpu_pct']:.0f}%) |"
            )
    text = "\n".join(lines) + "\n"
    text += (
        "\nToday (before this change, from the issue): 500 streams: 1,165 Redis connections in all, p99 622 ms; "
        "1,000 streams: 1,126-1,140 Redis connections held by the web process, p99 404-875 ms, "
        "1-30 streams cut in four runs.\n"
    )
    details = [
        f"- N={n}: lag samples {j['lag_n']} (floor {f['lag_n']}), cuts {j['cuts'] or 'none'}, "
        f"client CPU {j['client_cpu_s']:.0f} s (floor {f['client_cpu_s']:.0f} s), "
        f"web log warning/error lines {j['web_warnings']}, run {j['wall_s']:.0f} s"
        for n, j, f in rows
    ]
    text += "\n" + "\n".join(details) + "\n"
    if aws:
        idle, run = aws["idle"], aws["run"]
        text += (
            "\naws backend (moto), the web process's S3 requests counted at a proxy:\n\n"
            "| scenario | streams | reached `done` | S3 requests | per stream-minute | per idle job per s |\n"
            "|---|---|---|---|---|---|\n"
            f"| {idle['jobs']} idle jobs x {idle['streams'] // idle['jobs']} streams, {idle['seconds']:.0f} s | "
            f"{idle['streams']} | - | {idle['counts']} | {idle['per_stream_min']:.2f} | {idle['per_job_s']:.2f} |\n"
            f"| running jobs, one stream each | {run['n']} | {run['done']}/{run['n']} | {run['counts']} | "
            f"{run['per_stream_min']:.1f} | - |\n"
        )
    text += (
        f"\nSetup: offline provider at {meta['latency_ms']} ms per call, `LIVE_DELTAS=0`, worker concurrency N+10, "
        f"one `jobq worker`; lag = client receipt - Redis's announcement of the XADD (keyspace notification), "
        f"only events written after the stream opened; floor: bare Litestar SSE, {meta['events']} events per stream "
        f"spread over {meta['job_s']:.0f} s. Machine: 2 cores shared; load average before {meta['load_before']}, "
        f"after {meta['load_after']}; pure-Python loop {meta['loop_ms']:.0f} ms.\n"
    )
    return text


async def main(args: argparse.Namespace) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logs = ROOT / "data" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    ns = [int(x) for x in (args.ns or ("100" if args.quick else "500,1000,2000")).split(",")]
    load_before = os.getloadavg()
    meta: dict[str, Any] = {"latency_ms": args.latency_ms, "loop_ms": loop_ms()}
    rows = []
    for n in ns:
        jobq = await jobq_run(n, logs, args.latency_ms, args.tree)
        print(f"jobq N={n}: {jobq}", flush=True)
        job_s = jobq["wall_s"]
        events = max(1, round(jobq["events"] / max(1, jobq["n"])) - 1)
        meta.update(events=events, job_s=job_s)
        if args.no_floor:
            continue
        floor = await floor_run(n, logs, events, job_s / events)
        print(f"floor N={n}: {floor}", flush=True)
        rows.append((n, jobq, floor))
    aws = None
    if not args.no_aws:
        aws = await aws_run(
            logs,
            streams=20 if args.quick else 200,
            idle_jobs=2 if args.quick else 10,
            per_idle=20,
            idle_s=15 if args.quick else 60,
            latency_ms=args.latency_ms,
        )
        print(f"aws: {aws}", flush=True)
    meta.update(
        load_before=" ".join(f"{x:.2f}" for x in load_before),
        load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )
    text = table(rows, aws, meta)
    print(text)
    if not (args.quick or args.tree or args.no_floor):
        write_section("fanout", "Streams at scale (`bench/fanout.py`)", text)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--client":
        asyncio.run(client_main(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--floor-app":
        floor_app(int(sys.argv[2]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--ns", help="stream counts (default 500,1000,2000; --quick 100)")
        parser.add_argument("--latency-ms", type=int, default=4000)
        parser.add_argument("--no-aws", action="store_true")
        parser.add_argument("--no-floor", action="store_true")
        parser.add_argument("--tree", type=Path, help="run jobq serve and worker from this source tree")
        args = parser.parse_args()
        asyncio.run(main(args))
