"""Fair scheduling across tenants on the redis backend (issue 16, part 7), in one run.

One ``jobq worker`` with 4 slots, every LLM call 300 ms (offline provider), behind one
``jobq serve`` with two API keys (tenant A, tenant B). Tenant A submits 200 jobs over
HTTP, then tenant B submits one. Measured with fair scheduling (the default) and with
``FAIR_SCHEDULING=0`` (first in, first out, SAQ's own queue layout), each run on a fresh
key prefix.

- B's wait: from its submit (the job's ``created_at``) to its start (``started_at``),
  in seconds and in job durations (the median of A's jobs' run times in that run).
- The FIFO wait computed for the fair run: when B would have started behind A's whole
  backlog, i.e. the start of A's last job, minus B's submit.
- A's throughput: 200 jobs over the time from A's first start to A's last completion.

Targets (issue 16): B starts within 2 job durations with fair scheduling (FIFO: about
50); A's throughput with fair scheduling at least 95 % of FIFO's. This script is the
load client (its own process); web and worker are child processes on a private
``redis-server``. The table is printed and written into BENCHMARKS.md between the
``fairness`` markers. Usage: ``python bench/fairness.py [--jobs N] [--rounds R]`` (R runs of each mode, in
the order fair, FIFO, FIFO, fair, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402 - after sys.path
from bench.throughput import BODY, Child, child_env, http_ok, loop_ms, start_worker, wait_until  # noqa: E402
from tests.support.redis_server import RedisServer, free_port  # noqa: E402 - after sys.path

SLOTS = 4
LATENCY_MS = 300
KEYS = {"A": "bench-key-a", "B": "bench-key-b"}
SUBMITTERS = 8
"""Concurrent HTTP clients of tenant A's submission."""
WORKER_KEYS = (
    "API_KEYS",
    "STREAM_TOKEN_SECRET",
    "FAIR_SCHEDULING",
    "WORKER_CONCURRENCY",
    "LLM_OFFLINE_LATENCY_MS",
)
"""What the worker's environment takes from the web's (it logs at info, as operators run it)."""


@dataclass
class Run:
    mode: str
    b_wait_s: float
    fifo_wait_s: float
    job_s: float
    a_jobs: int
    a_window_s: float

    @property
    def a_throughput(self) -> float:
        return self.a_jobs / self.a_window_s


def _env(url: str, prefix: str, fair: bool) -> dict[str, str]:
    return child_env(
        url,
        prefix,
        API_KEYS=",".join(f"{key}:tenant-{name.lower()}" for name, key in KEYS.items()),
        STREAM_TOKEN_SECRET=uuid.uuid4().hex,
        FAIR_SCHEDULING="1" if fair else "0",
        WORKER_CONCURRENCY=str(SLOTS),
        LLM_OFFLINE_LATENCY_MS=str(LATENCY_MS),
        SAQ_HEARTBEAT_S="20",
    )


async def _submit(client: httpx.AsyncClient, tenant: str) -> str:
    body = {**BODY, "project_title": f"Solar Mesh {uuid.uuid4().hex[:10]}"}
    response = await client.post("/api/jobs", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"})
    if response.status_code != 202:
        raise RuntimeError(f"submit failed: {response.status_code} {response.text[:200]}")
    job_id: str = response.json()["jobId"]
    return job_id


async def _submit_backlog(client: httpx.AsyncClient, count: int) -> list[str]:
    ids: list[str] = []

    async def submitter(share: int) -> None:
        for _ in range(share):
            ids.append(await _submit(client, "A"))

    shares = [count // SUBMITTERS + (1 if n < count % SUBMITTERS else 0) for n in range(SUBMITTERS)]
    await asyncio.gather(*(submitter(share) for share in shares))
    return ids


async def one_run(url: str, logs: Path, fair: bool, jobs: int) -> Run:
    from adapters.redis_store import RedisStore

    prefix = f"fair{'on' if fair else 'off'}-{uuid.uuid4().hex[:6]}"
    env = _env(url, prefix, fair)
    port = free_port()
    mode = "fair" if fair else "fifo"
    serve = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)]
    web = Child(f"web-{mode}-{prefix}", serve, env, logs)
    worker = start_worker(url, prefix, logs, f"worker-{mode}-{prefix}", **{k: env[k] for k in WORKER_KEYS})
    store = RedisStore.from_url(url, prefix=prefix)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_until(lambda: http_ok(f"{base}/api/jobs/health"), "jobq serve")
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            a_ids = await _submit_backlog(client, jobs)
            b_id = await _submit(client, "B")

        async def all_done() -> bool:
            counts = await store.count_by_status()
            if counts["failed"] or counts["cancelled"]:
                raise RuntimeError(f"jobs did not complete: {counts}")
            return counts["completed"] >= jobs + 1

        await wait_until(all_done, "all jobs to complete", limit_s=jobs * 10)
        a_jobs = [job for job in [await store.get(job_id) for job_id in a_ids] if job is not None]
        b_job = await store.get(b_id)
        assert b_job is not None and b_job.started_at is not None
        a_starts = [j.started_at for j in a_jobs if j.started_at is not None]
        a_ends = [j.completed_at for j in a_jobs if j.completed_at is not None]
        durations = [
            end - start
            for j in a_jobs
            if (start := j.started_at) is not None and (end := j.completed_at) is not None
        ]
        return Run(
            mode=mode,
            b_wait_s=b_job.started_at - b_job.created_at,
            fifo_wait_s=max(a_starts) - b_job.created_at,
            job_s=statistics.median(durations),
            a_jobs=len(a_jobs),
            a_window_s=max(a_ends) - min(a_starts),
        )
    finally:
        await store.close()
        worker.stop()
        web.stop()


def _mean(runs: list[Run], attr: str) -> float:
    return statistics.fmean(getattr(run, attr) for run in runs)


def table(runs: list[Run], speed: tuple[float, float], load: tuple[str, str], jobs: int) -> str:
    fair = [run for run in runs if run.mode == "fair"]
    fifo = [run for run in runs if run.mode == "fifo"]

    def cell(attr: str, mode: list[Run]) -> str:
        seconds = _mean(mode, attr)
        in_jobs = statistics.fmean(getattr(run, attr) / run.job_s for run in mode)
        return f"{seconds:.2f} s = {in_jobs:.2f} jobs"

    def rate(mode: list[Run]) -> float:
        return statistics.fmean(run.a_throughput for run in mode)

    def throughput(mode: list[Run]) -> str:
        return f"{rate(mode):.3f} jobs/s ({_mean(mode, 'a_window_s'):.1f} s)"

    ratio = rate(fair) / rate(fifo)
    order = ", ".join(run.mode for run in runs)
    each = "; ".join(
        f"{run.mode}: B {run.b_wait_s:.2f} s, A {run.a_throughput:.3f} jobs/s, job {run.job_s:.2f} s"
        for run in runs
    )
    lines = [
        f"One `jobq worker` with {SLOTS} slots, every LLM call {LATENCY_MS} ms (offline provider), "
        f"behind one `jobq serve`; tenant A submits {jobs} jobs over HTTP ({SUBMITTERS} clients), "
        "then tenant B one. Same machine and private `redis-server`, a fresh key prefix per run, "
        f"runs in the order {order}; each cell is the mean over that mode's runs. A job "
        "duration is the median run time of A's jobs in that run.",
        "",
        "| measure | fair (default) | FIFO (`FAIR_SCHEDULING=0`) | target |",
        "|---|---|---|---|",
        f"| one job's duration | {_mean(fair, 'job_s'):.2f} s | {_mean(fifo, 'job_s'):.2f} s | |",
        f"| B's wait, submit to start | {cell('b_wait_s', fair)} | {cell('b_wait_s', fifo)} "
        "| fair <= 2 jobs |",
        f"| FIFO wait computed in the fair run (A's last start - B's submit) | {cell('fifo_wait_s', fair)} "
        "| | about 50 jobs |",
        f"| A's throughput (A's first start to A's last completion) | {throughput(fair)} "
        f"| {throughput(fifo)} | |",
        f"| A's throughput, fair / FIFO | {ratio * 100:.1f} % | | >= 95 % |",
        "",
        f"Each run: {each}.",
        "",
        "Where A's throughput with fair scheduling falls short of FIFO's, look first at B's job: "
        "with fair scheduling it takes one of the 4 slots in the middle of A's window (with FIFO "
        f"after A's last start), and with jobs of equal length that run in lock-step, {jobs + 1} "
        f"jobs need {-(-(jobs + 1) // SLOTS)} rounds of {SLOTS} where {jobs} need {-(-jobs // SLOTS)} "
        f"({-(-jobs // SLOTS) / -(-(jobs + 1) // SLOTS) * 100:.1f} %).",
        "",
        f"Machine: 2 cores shared with other sessions; load average {load[0]} before, {load[1]} after; "
        f"a fixed Python loop took {speed[0]:.0f} ms before and {speed[1]:.0f} ms after.",
        "",
    ]
    return "\n".join(lines)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def main(jobs: int, rounds: int) -> None:
    load_before, speed_before = _load(), loop_ms()
    server = RedisServer.start(persistent=False)
    logs = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    print(f"logs in {logs}", flush=True)
    runs: list[Run] = []
    try:
        # fair, FIFO, FIFO, fair, ...: a drift in the machine's speed weighs on both modes alike
        for n in range(rounds):
            for fair in (True, False) if n % 2 == 0 else (False, True):
                runs.append(await one_run(server.url, logs, fair=fair, jobs=jobs))
                print(runs[-1], flush=True)
    finally:
        server.close()
    text = table(runs, (speed_before, loop_ms()), (load_before, _load()), jobs)
    print(text)
    if jobs == 200:
        write_section("fairness", "Fair scheduling across tenants (`bench/fairness.py`)", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="tenant A's jobs (200 writes BENCHMARKS.md)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode")
    args: Any = parser.parse_args()
    os.chdir(ROOT)
    asyncio.run(main(args.jobs, args.rounds))
