"""Per-job overhead of the pipeline, in process: jobs/s of ``run_job`` with the offline
provider at zero latency, on in-memory SQLite and on Redis (no SAQ, no HTTP).

This isolates what (b) of ``bench/throughput.py`` measures minus the queue: the CPU a
job costs in the pipeline plus the store round trips it makes. Usage::

    python bench/pipeline_overhead.py [--jobs 200] [--concurrency 50]
        [--backend sqlite|redis|both] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402 - after sys.path

from pipeline.delivery import run_job  # noqa: E402
from pipeline.deps import Deps  # noqa: E402
from pipeline.offline import OfflineProvider  # noqa: E402
from pipeline.ports import JobStore  # noqa: E402
from pipeline.service import JobService  # noqa: E402

BODY = {
    "project_title": "Solar Mesh",
    "elevator_pitch": "Community solar micro-grids for rural schools; we lease panels "
    "and batteries and sell power by the kWh.",
    "language": "en",
}


class _NoQueue:
    """Submission without delivery: the bench runs the jobs itself."""

    name = "none"

    async def enqueue(self, job_id: str, timeout_s: float) -> None:
        return None


async def _store(backend: str) -> JobStore:
    if backend == "sqlite":
        from adapters.sqlite_store import SqliteStore

        store: JobStore = SqliteStore(":memory:")
    else:
        from adapters.redis_store import RedisStore
        from tests.support.redis_server import redis_url

        store = RedisStore.from_url(redis_url(), prefix=f"bench-overhead-{uuid.uuid4().hex[:8]}", ttl_s=600)
    await store.open()
    return store


async def measure(
    backend: str, jobs: int, concurrency: int, profile: str | None, latency_ms: float = 0
) -> tuple[float, float]:
    """(jobs/s, CPU ms of this process per job): the CPU figure is steadier on a
    shared machine than the rate."""
    store = await _store(backend)
    deps = Deps(store=store, llm=OfflineProvider(latency_ms))
    service = JobService(deps, _NoQueue())  # type: ignore[arg-type]
    try:
        ids = [
            (await service.submit({**BODY, "project_title": f"Solar Mesh {uuid.uuid4().hex[:10]}"}, "bench"))[
                0
            ].id
            for _ in range(jobs)
        ]
        gate = asyncio.Semaphore(concurrency)

        async def one(job_id: str) -> None:
            async with gate:
                job = await run_job(job_id, deps)
                assert job is not None and job.status == "completed", job

        profiler = cProfile.Profile() if profile else None
        started, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        await asyncio.gather(*(one(i) for i in ids))
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        return jobs / elapsed, cpu * 1000 / jobs
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--backend", choices=("sqlite", "redis", "both"), default="both")
    parser.add_argument("--profile", help="write a cProfile dump here (one backend)")
    parser.add_argument("--latency-ms", type=float, default=0, help="simulated time per LLM call")
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), cache_logger_on_first_use=True
    )
    backends = ("sqlite", "redis") if args.backend == "both" else (args.backend,)
    for backend in backends:
        rate, cpu_ms = asyncio.run(
            measure(backend, args.jobs, args.concurrency, args.profile, args.latency_ms)
        )
        print(
            f"{backend}: {rate:.3g} jobs/s, {cpu_ms:.2f} CPU ms/job "
            f"({args.jobs} jobs, {args.concurrency} at once, {args.latency_ms:g} ms per call)"
        )


if __name__ == "__main__":
    main()
