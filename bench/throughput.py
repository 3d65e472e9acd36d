"""Throughput of the redis backend (issue 3, part 8), each beside its floor, in one run.

(a) ``POST /api/jobs`` at 32 concurrent clients against ``jobq serve``, beside a bare
    Litestar endpoint that only enqueues a SAQ job (same server, same Redis).
(b) Completed 15-step jobs per second for one ``jobq worker`` process (offline
    provider, zero latency; the median of three runs), beside bare SAQ running
    no-op jobs.
(c) 200 concurrent jobs on one worker process at 200 ms per LLM call: the batch's
    total time beside the ideal (one job's optimal makespan), the worker's CPU per
    job, and memory per job; the median of three runs, the same with the worker
    logging warnings only (what its info lines cost), and with 50 jobs (where the
    worker's CPU is not the limit).

Workers log at their default level (info), as operators run them; the web servers
of (a) log warnings only, as the floor does.

Everything runs on a private ``redis-server`` (no persistence) so nothing else
disturbs it. The table is printed and written into BENCHMARKS.md between the
``throughput`` markers. Usage: ``python bench/throughput.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402 - after sys.path
from tests.support.redis_server import RedisServer, free_port  # noqa: E402 - after sys.path

FLOOR_QUEUE = "bench-floor"
NOOP_QUEUE = "bench-noop"
BODY = {
    "project_title": "Solar Mesh",
    "elevator_pitch": "Community solar micro-grids for rural schools; we lease panels "
    "and batteries and sell power by the kWh.",
    "language": "en",
}


# -- child processes ----------------------------------------------------------


def floor_app(url: str, port: int) -> None:
    """The floor of (a): one Litestar route that enqueues a SAQ job and answers 202."""
    import uvicorn
    from litestar import Litestar, post
    from saq import Queue

    logging.getLogger("saq").setLevel(logging.WARNING)  # as jobq's servers run here
    queue = Queue.from_url(url, name=FLOOR_QUEUE)

    @post("/enqueue", status_code=202)
    async def enqueue(data: dict[str, Any]) -> dict[str, Any]:
        job = await queue.enqueue("noop", title=data.get("project_title"))
        return {"jobId": job.key if job else None, "status": "queued"}

    app = Litestar([enqueue], on_startup=[queue.connect], on_shutdown=[queue.disconnect])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def noop_worker(url: str, concurrency: int) -> None:
    """The floor of (b): a SAQ worker whose jobs do nothing."""
    from saq import Queue, Worker

    logging.getLogger("saq").setLevel(logging.WARNING)

    async def noop(ctx: Any, **_: Any) -> None:
        return None

    async def main() -> None:
        queue = Queue.from_url(url, name=NOOP_QUEUE)
        worker: Worker[Any] = Worker(
            queue, functions=[("noop", noop)], concurrency=concurrency, dequeue_timeout=1.0
        )
        await queue.connect()
        try:
            await worker.start()
        finally:
            await queue.disconnect()

    asyncio.run(main())


class Child:
    """A subprocess with its output in a log file, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def child_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "LLM_", "SAQ_"))}
    keep.pop("REDIS_URL", None)
    return {
        **keep,
        "REDIS_URL": url,
        "JOBS_KEY_PREFIX": prefix,
        "LOG_LEVEL": "warning",
        "SUBMIT_RATE_PER_MIN": "0",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def loop_ms() -> float:
    """Time of a fixed pure-Python loop: how fast this machine runs Python right now
    (on a shared machine it varies between runs, and everything above varies with it)."""
    started = time.process_time()
    total = 0
    for i in range(3_000_000):
        total += i
    return (time.process_time() - started) * 1000


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def http_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(url)).status_code < 500
    except httpx.HTTPError:
        return False


# -- (a) submission -------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _connection(
    port: int, request: bytes, stop_at: float, record_from: float, out: list[float], errs: list[int]
) -> None:
    """One keep-alive HTTP/1.1 connection sending requests back to back (a raw client:
    httpx would spend more CPU than the server under test on this 2-core machine)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if started >= record_from:
                out.append(time.perf_counter() - started)
                if not head.startswith((b"HTTP/1.1 202", b"HTTP/1.1 200")):
                    errs.append(1)
    finally:
        writer.close()


async def load(port: int, path: str, clients: int, seconds: float, warmup: float) -> LoadResult:
    payload = json.dumps(BODY).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    begin = time.perf_counter()
    record_from, stop_at = begin + warmup, begin + warmup + seconds
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(
        *(_connection(port, request, stop_at, record_from, latencies, errors) for _ in range(clients))
    )
    return LoadResult(len(latencies), seconds, latencies, len(errors))


async def bench_submit(url: str, logs: Path, seconds: float) -> dict[str, LoadResult]:
    floor_port, web_port = free_port(), free_port()
    floor = Child(
        "floor-web",
        [sys.executable, __file__, "--floor-app", str(floor_port)],
        child_env(url, "bench-a"),
        logs,
    )
    web = Child(
        "jobq-web",
        [sys.executable, "-m", "handlers.cli", "serve", "--port", str(web_port)],
        child_env(url, "bench-a"),
        logs,
    )
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{floor_port}/schema"), "floor app")
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{web_port}/api/jobs/health"), "jobq")
        results = {}
        for name, port, path in (("floor", floor_port, "/enqueue"), ("jobq", web_port, "/api/jobs")):
            results[name] = await load(port, path, clients=32, seconds=seconds, warmup=1.0)
        return results
    finally:
        floor.stop()
        web.stop()


# -- (b) worker throughput and (c) concurrency ----------------------------------


def _settings(url: str, prefix: str) -> Any:
    from handlers.settings import Settings

    return Settings.from_env({"REDIS_URL": url, "JOBS_KEY_PREFIX": prefix, "SAQ_HEARTBEAT_S": "20"})


async def submit_jobs(url: str, prefix: str, count: int, **fields: Any) -> list[str]:
    """Create and enqueue ``count`` jobs with distinct inputs (no cache hits)."""
    return await submit_at(url, prefix, [(0.0, count)], **fields)


async def submit_at(url: str, prefix: str, plan: list[tuple[float, int]], **fields: Any) -> list[str]:
    """Jobs as :func:`submit_jobs` makes them, ``count`` at a time ``offset`` seconds after
    the first, for each ``(offset, count)`` of ``plan`` (offsets in increasing order)."""
    from handlers.bootstrap import bootstrap

    container = bootstrap(_settings(url, prefix))
    await container.open()
    ids: list[str] = []
    try:
        began = time.monotonic()
        for offset, count in plan:
            await asyncio.sleep(max(0.0, began + offset - time.monotonic()))
            jobs = await asyncio.gather(
                *(
                    container.service.submit(
                        {**BODY, "project_title": f"Solar Mesh {uuid.uuid4().hex[:10]}", **fields},
                        "bench",
                    )
                    for _ in range(count)
                )
            )
            ids += [job.id for job, _ in jobs]
        return ids
    finally:
        await container.close()


async def job_window(
    url: str, prefix: str, ids: list[str], limit_s: float
) -> tuple[float, float, list[float]]:
    """Wait until every job completed; (first start, last completion, per-job durations)."""
    from adapters.redis_store import RedisStore

    store = RedisStore.from_url(url, prefix=prefix)
    try:

        async def all_done() -> bool:
            counts = await store.count_by_status()
            if counts["failed"] or counts["cancelled"]:
                raise RuntimeError(f"jobs did not complete: {counts}")
            return counts["completed"] >= len(ids)

        await wait_until(all_done, "jobs to complete", limit_s)
        jobs = [await store.get(job_id) for job_id in ids]
        starts = [j.started_at for j in jobs if j and j.started_at]
        ends = [j.completed_at for j in jobs if j and j.completed_at]
        durations = [j.completed_at - j.started_at for j in jobs if j and j.started_at and j.completed_at]
        return min(starts), max(ends), durations
    finally:
        await store.close()


def start_worker(url: str, prefix: str, logs: Path, name: str, tree: Path | None = None, **env: str) -> Child:
    """A ``jobq worker`` logging at its default level (info: two lines per step), as
    operators run it; the servers of (a) log warnings only, as its floor does. With
    ``tree``, the worker runs that source tree's code (its cwd and PYTHONPATH)."""
    in_tree = {} if tree is None else {"PYTHONPATH": str(tree)}
    return Child(
        name,
        [sys.executable, "-m", "handlers.cli", "worker"],
        child_env(url, prefix, **{"LOG_LEVEL": "info", **in_tree, **env}),
        logs,
        cwd=tree or ROOT,
    )


async def jobq_worker_rate(url: str, logs: Path, jobs: int, run: int, tree: Path | None = None) -> float:
    """Completed jobs/s of one ``jobq worker`` given ``jobs`` queued jobs."""
    prefix = f"bench-b-{run}"
    ids = await submit_jobs(url, prefix, jobs)
    worker = start_worker(url, prefix, logs, f"jobq-worker-b-{run}", tree=tree, LLM_OFFLINE_LATENCY_MS="0")
    try:
        first, last, _ = await job_window(url, prefix, ids, 600)
    finally:
        worker.stop()
    return jobs / (last - first)


async def bench_worker(url: str, logs: Path, jobs: int, noop_jobs: int, runs: int) -> dict[str, float]:
    """(b): the median of ``runs`` jobq worker runs, beside one no-op SAQ run."""
    from saq import Queue

    rates = sorted([await jobq_worker_rate(url, logs, jobs, n) for n in range(runs)])
    jobq_rate = rates[len(rates) // 2]

    queue = Queue.from_url(url, name=NOOP_QUEUE)
    await queue.connect()
    keys = [uuid.uuid4().hex for _ in range(noop_jobs)]
    for key in keys:
        await queue.enqueue("noop", key=key, ttl=3600)
    noop = Child("noop-worker", [sys.executable, __file__, "--noop-worker", "50"], child_env(url, "x"), logs)
    try:

        async def drained() -> bool:
            return await queue.count("incomplete") == 0

        await wait_until(drained, "no-op jobs", 300)
        records = [j for j in await queue.jobs(keys) if j is not None]
    finally:
        noop.stop()
        await queue.disconnect()
    started = [j.started for j in records if j.started]
    span_s = (max(j.completed for j in records) - min(started)) / 1000
    noop_rate = len(records) / span_s
    return {"jobq": jobq_rate, "noop": noop_rate, "runs": runs, "low": rates[0], "high": rates[-1]}


async def bench_concurrency(
    url: str,
    logs: Path,
    jobs: int,
    latency_ms: int,
    run: int,
    log_level: str = "info",
    tree: Path | None = None,
) -> dict[str, float]:
    """One run of (c): ``jobs`` queued at once (submitted while the worker is paused by
    SIGSTOP), then taken by the worker with ``jobs`` slots."""
    from adapters.saq_queue import SaqQueue
    from bench.makespan_bounds import lower_bound

    prefix = f"bench-c{jobs}-{log_level}-{run}"
    worker = start_worker(
        url,
        prefix,
        logs,
        f"jobq-worker-c{jobs}-{log_level}-{run}",
        tree=tree,
        LLM_OFFLINE_LATENCY_MS=str(latency_ms),
        WORKER_CONCURRENCY=str(jobs),
        LOG_LEVEL=log_level,
    )
    queue = SaqQueue.from_url(url, prefix=prefix)
    try:

        async def alive() -> bool:
            return bool((await queue.stats())["workers"])

        await wait_until(alive, "worker c")
        await asyncio.sleep(1.0)
        baseline = rss_kib(worker.pid)
        peak = baseline
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_kib(worker.pid))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        cpu_before = cpu_s(worker.pid)
        # All jobs wait in the queue before the worker takes any: submitting 200 takes
        # the bench client ~0.4 s, which is not the worker's time to measure.
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            ids = await submit_jobs(url, prefix, jobs)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        first, last, durations = await job_window(url, prefix, ids, 600)
        worker_cpu = cpu_s(worker.pid) - cpu_before
        sampling = False
        await sampler
    finally:
        await queue.close()
        worker.stop()
    return {
        "jobs": jobs,
        "ideal_s": lower_bound(latency_ms / 1000, 2),
        "total_s": last - first,
        "mean_job_s": statistics.fmean(durations),
        "cpu_ms_per_job": worker_cpu * 1000 / jobs,
        "worker_cpu_s": worker_cpu,
        "kib_per_job": (peak - baseline) / jobs,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
    }


async def median_concurrency(
    url: str, logs: Path, jobs: int, runs: int, log_level: str = "info"
) -> dict[str, float]:
    """The run with the median total time of ``runs`` (a shared machine varies between runs)."""
    results = [await bench_concurrency(url, logs, jobs, 200, n, log_level) for n in range(runs)]
    chosen = sorted(results, key=lambda r: r["total_s"])[len(results) // 2]
    return {
        **chosen,
        "runs": runs,
        "min_total_s": min(r["total_s"] for r in results),
        "max_total_s": max(r["total_s"] for r in results),
    }


# -- report -------------------------------------------------------------------


def _concurrency_rows(c: dict[str, float], target: str) -> list[str]:
    jobs, runs, ideal = int(c["jobs"]), int(c["runs"]), c["ideal_s"]
    return [
        f"| (c) {jobs} jobs queued at once, 200 ms/call: total (s), median of {runs} "
        f"(range {c['min_total_s']:.2f}-{c['max_total_s']:.2f}) | {c['total_s']:.2f} "
        f"| {ideal:.2f} (ideal) | {c['total_s'] / ideal:.2f}x | {target} |",
        f"| (c) {jobs} jobs: mean job duration (s) | {c['mean_job_s']:.2f} | {ideal:.2f} (ideal) "
        f"| {c['mean_job_s'] / ideal:.2f}x | |",
        f"| (c) {jobs} jobs: worker CPU per job (ms) | {c['cpu_ms_per_job']:.1f} | "
        f"| {c['worker_cpu_s']:.2f} s of CPU in all | |",
    ]


def table(
    a: dict[str, LoadResult],
    b: dict[str, float],
    c: dict[str, float],
    c_quiet: dict[str, float],
    c_small: dict[str, float],
    speed: tuple[float, float],
) -> str:
    jobq, floor = a["jobq"], a["floor"]
    rows = [
        "| measure | jobq | floor | ratio | target |",
        "|---|---|---|---|---|",
        f"| (a) POST /api/jobs, 32 clients: requests/s | {jobq.rps:.0f} | {floor.rps:.0f} "
        f"| {jobq.rps / floor.rps:.0%} of floor | >= 60% |",
        f"| (a) p50 latency (ms) | {jobq.pct(0.5):.1f} | {floor.pct(0.5):.1f} "
        f"| {jobq.pct(0.5) / floor.pct(0.5):.1f}x | |",
        f"| (a) p99 latency (ms) | {jobq.pct(0.99):.1f} | {floor.pct(0.99):.1f} "
        f"| {jobq.pct(0.99) / floor.pct(0.99):.1f}x | <= 2x |",
        f"| (b) completed jobs/s, one worker process, median of {b['runs']:.0f} "
        f"(range {b['low']:.0f}-{b['high']:.0f}) | {b['jobq']:.0f} | {b['noop']:.0f} (no-op SAQ) "
        f"| {b['jobq'] / b['noop']:.0%} | >= 100 jobs/s |",
        *_concurrency_rows(c, "<= 1.2x"),
        f"| (c) {c_quiet['jobs']:.0f} jobs, worker logging warnings only: total (s), median of "
        f"{c_quiet['runs']:.0f} (range {c_quiet['min_total_s']:.2f}-{c_quiet['max_total_s']:.2f}) "
        f"| {c_quiet['total_s']:.2f} | {c_quiet['ideal_s']:.2f} (ideal) "
        f"| {c_quiet['total_s'] / c_quiet['ideal_s']:.2f}x | |",
        f"| (c) {c_quiet['jobs']:.0f} jobs, warnings only: worker CPU per job (ms) "
        f"| {c_quiet['cpu_ms_per_job']:.1f} | | {c_quiet['worker_cpu_s']:.2f} s of CPU in all | |",
        *_concurrency_rows(c_small, ""),
        f"| (c) memory per in-flight job (KiB) | {c['kib_per_job']:.0f} | | "
        f"| RSS {c['baseline_mib']:.0f} -> {c['peak_mib']:.0f} MiB |",
    ]
    errors = jobq.errors + floor.errors
    note = (
        f"\n{jobq.requests + floor.requests} requests measured, {errors} non-2xx. "
        f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        "client, servers and Redis share it. The web servers of (a) log warnings only, as the "
        "floor does; the workers of (b) and (c) log at their default level, info (two lines "
        "per step), except where a row says otherwise. "
        f"A fixed Python loop took {speed[0]:.0f} ms before and {speed[1]:.0f} ms after "
        "the run (the machine's speed at the time).\n"
    )
    bound = (
        "In (c) the jobs are submitted while the worker is paused (SIGSTOP), so all wait in "
        "the queue when it resumes; total is from the first job's start to the last one's "
        f"end. {_cpu_share(c)} At {c_small['jobs']:.0f} jobs it needed "
        f"{c_small['worker_cpu_s']:.2f} s.\n"
    )
    return "\n".join(rows) + "\n" + note + "\n" + bound


def _cpu_share(c: dict[str, float]) -> str:
    """What sets (c)'s total: the worker's CPU once it nears the ideal window, the
    simulated LLM latency while it stays well below."""
    share = c["worker_cpu_s"] / c["ideal_s"]
    head = (
        f"At {c['jobs']:.0f} jobs the worker needed {c['worker_cpu_s']:.2f} s of CPU for a batch "
        f"whose ideal is {c['ideal_s']:.2f} s ({share:.0%})"
    )
    if share >= 0.8:
        return head + ": one process's CPU, not the LLM latency, sets the total there."
    return head + ": the LLM latency, not the worker's CPU, sets the total there."


async def main(quick: bool) -> None:
    import structlog

    # The bench process submits jobs in-process: keep its own log quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("saq").setLevel(logging.WARNING)
    logs = ROOT / "data" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    speed_before = loop_ms()
    server = RedisServer.start(persistent=False)
    try:
        print(f"redis on {server.url}; logs in {logs}", flush=True)
        a = await bench_submit(server.url, logs, seconds=3 if quick else 8)
        print("(a) done", flush=True)
        b = await bench_worker(
            server.url,
            logs,
            jobs=100 if quick else 400,
            noop_jobs=2000 if quick else 5000,
            runs=1 if quick else 3,
        )
        print("(b) done", flush=True)
        c = await median_concurrency(server.url, logs, jobs=200, runs=1 if quick else 3)
        c_quiet = await median_concurrency(
            server.url, logs, jobs=200, runs=1 if quick else 3, log_level="warning"
        )
        c_small = await median_concurrency(server.url, logs, jobs=50, runs=1 if quick else 3)
        print("(c) done", flush=True)
    finally:
        server.close()
    text = table(a, b, c, c_quiet, c_small, (speed_before, loop_ms()))
    print(text)
    write_section("throughput", "Throughput of the redis backend (`bench/throughput.py`)", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--floor-app", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--noop-worker", type=int, metavar="CONCURRENCY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_app:
        floor_app(os.environ["REDIS_URL"], args.floor_app)
    elif args.noop_worker:
        noop_worker(os.environ["REDIS_URL"], args.noop_worker)
    else:
        asyncio.run(main(args.quick))
