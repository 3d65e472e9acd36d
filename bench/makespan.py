"""Makespan of one job: the sliding-window runner vs the optimum vs the old batch scheduler.

Run: ``.venv/bin/python -m bench.makespan [--latency-ms 300] [--repeat 3] [--no-write]``

Every job runs the real ``run_job`` on an in-memory ``SqliteStore`` with the
offline provider answering after a simulated latency; only the scheduling policy
differs between the two measured columns:

- **sliding window** (``pipeline.scheduler.SlidingWindow``): a step starts the moment its
  inputs exist and an LLM slot is free, longest remaining chain first (chain
  weighted by the step durations learned from one warm-up job).
- **old batch** (``BatchScheduler`` below): start up to ``parallel_limit`` ready steps
  in graph order (code steps take a slot too), wait for the whole batch, repeat.
  It reuses the runner's step code, so the only difference is the policy.

The **lower bound** is the exact optimum of this scheduling problem
(P|prec|Cmax: 12 LLM steps with precedence, ``parallel_limit`` identical slots, code
steps taking no time), found by exhaustive search in
:func:`bench.makespan_bounds.optimal_makespan`. It is not the textbook bound
``max(critical path, total work / slots)``: with equal latencies L that bound says
6L at two slots, but the optimum is 7L, because ``investor_score`` needs all nine
sections and so always runs alone at the end, leaving a slot idle.

Two latency profiles are measured: every LLM step taking the same time, and an
uneven profile (real steps differ: evidence and market are long, team is short)
where waiting for a whole batch wastes slots.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import statistics
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import structlog

from adapters.sqlite_store import SqliteStore
from bench.makespan_bounds import batch_makespan, lower_bound, step_latencies
from pipeline.delivery import run_job
from pipeline.deps import Deps, PipelineConfig
from pipeline.graph import DEPENDS_ON, FINAL_STEP, LLM_STEPS, STEPS
from pipeline.latency import LatencyModel
from pipeline.model import Artifact, Job
from pipeline.offline import OfflineProvider
from pipeline.request import validate_request
from pipeline.scheduler import SLIDING_WINDOW, Scheduler, StepHost
from pipeline.views import initial_progress, initial_steps

LIMITS = (1, 2, 3, 4, 16)
BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
START, END = "<!-- makespan:start -->", "<!-- makespan:end -->"
UNEVEN_FACTORS = {
    "evidence": 1.6,
    "brief": 0.8,
    "market": 1.8,
    "team": 0.5,
    "problem": 0.7,
    "business_model": 1.2,
    "financial_plan": 1.5,
    "gtm": 0.9,
    "investor_score": 1.3,
}
BODY = {
    "project_title": "GreenGrid",
    "elevator_pitch": "GreenGrid balances neighbourhood solar batteries for municipal utilities.",
    "language": "en",
    "skip_cache": True,
    "timeout_ms": 600_000,
}


class BatchScheduler:
    """The old scheduler, on the runner's own step code: batches of up to
    ``parallel_limit`` ready steps in graph order (code steps take a slot too), each
    batch awaited as a whole before the next starts."""

    async def __call__(self, host: StepHost) -> Artifact:
        seen = set(host.done)
        while FINAL_STEP not in host.done:
            done = host.done.keys()
            ready = [s for s in STEPS if s.name not in seen and done >= DEPENDS_ON[s.name]]
            batch = ready[: host.limit]
            if not batch:
                raise RuntimeError("batch scheduler stalled")
            seen.update(step.name for step in batch)
            tasks = [asyncio.create_task(host.run_step(step)) for step in batch]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        return host.done[FINAL_STEP]


async def measure(
    limit: int,
    latency_ms: Mapping[str, float],
    scheduler: Scheduler,
    learned: LatencyModel | None = None,
) -> tuple[float, int]:
    """Duration (s) of one fresh job and the peak of concurrent LLM calls. ``learned``
    carries step durations over from earlier jobs, as in a long-lived worker."""
    store = SqliteStore(":memory:")
    await store.open()
    try:
        llm = OfflineProvider(latency_by_step=latency_ms)
        request = validate_request({**BODY, "parallel_limit": limit})
        job = Job(
            id=str(uuid.uuid4()),
            tenant="bench",
            request=request.to_dict(),
            progress=initial_progress(),
            steps=initial_steps(),
        )
        await store.create(job)
        started = time.perf_counter()
        deps = Deps(store, llm, PipelineConfig(), latency=learned or LatencyModel())
        done = await run_job(job.id, deps, scheduler=scheduler)
        elapsed = time.perf_counter() - started
        if done is None or done.status != "completed":
            raise RuntimeError(f"bench job ended {done and done.status}: {done and done.error}")
        return elapsed, llm.max_in_flight
    finally:
        await store.close()


async def profile_rows(
    name: str, latency_ms: Mapping[str, float], repeat: int
) -> list[dict[str, object]]:
    latency = step_latencies({s: v / 1000 for s, v in latency_ms.items()}, 0.0)
    rows: list[dict[str, object]] = []
    learned = LatencyModel()
    await measure(16, latency_ms, SLIDING_WINDOW, learned)  # warm-up: the worker has seen one job
    for limit in LIMITS:
        sliding = [await measure(limit, latency_ms, SLIDING_WINDOW, learned) for _ in range(repeat)]
        batch = [await measure(limit, latency_ms, BatchScheduler()) for _ in range(repeat)]
        bound = lower_bound(latency, limit)
        sliding_s = statistics.median(t for t, _ in sliding)
        batch_s = statistics.median(t for t, _ in batch)
        rows.append(
            {
                "profile": name,
                "limit": limit,
                "bound": bound,
                "sliding": sliding_s,
                "sliding_peak": max(p for _, p in sliding),
                "batch": batch_s,
                "batch_model": batch_makespan(latency, limit),
            }
        )
        print(
            f"{name:8} limit {limit:2}: bound {bound:.2f}s  sliding {sliding_s:.2f}s "
            f"({sliding_s / bound - 1:+.1%})  batch {batch_s:.2f}s ({batch_s / bound - 1:+.1%})",
            flush=True,
        )
    return rows


def table(rows: list[dict[str, object]], latency_ms: float, repeat: int) -> str:
    lines = [
        f"Makespan of one job (`python -m bench.makespan`), offline provider, "
        f"{latency_ms:.0f} ms base LLM latency, median of {repeat} run(s), in-memory SQLite.",
        "",
        "| profile | parallel_limit | lower bound (optimum) | sliding window | vs bound "
        "| old batch scheduler | vs bound | peak concurrent calls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bound, sliding, batch = float(str(r["bound"])), float(str(r["sliding"])), float(str(r["batch"]))
        lines.append(
            f"| {r['profile']} | {r['limit']} | {bound:.2f} s | {sliding:.2f} s "
            f"| {sliding / bound - 1:+.1%} | {batch:.2f} s | {batch / bound - 1:+.1%} "
            f"| {r['sliding_peak']} |"
        )
    lines += [
        "",
        "The lower bound is the exact optimum for 12 LLM steps with their precedence and",
        "`parallel_limit` slots (exhaustive search, `bench/makespan_bounds.py:optimal_makespan`); the",
        "textbook `max(critical path, work / slots)` is lower than reachable at limit 2",
        "(6 vs 7 call times) because `investor_score` always runs alone at the end.",
        "The sliding window ranks ready steps by the longest remaining chain weighted by the",
        "step durations the process has seen (one warm-up job before the measured ones);",
        "with nothing learned it counts LLM steps, which is optimal for the even profile.",
        "With equal latencies the old batch scheduler is also optimal at 1, 2, 4 and 16 slots",
        "on this graph (model: 12/7/6/5/5 call times at 1/2/3/4/16 vs optimum 12/7/5/5/5);",
        "it loses at 3 slots and wherever step durations differ.",
        "Uneven profile: per-step factors on the base latency: "
        + ", ".join(f"{k} x{v}" for k, v in UNEVEN_FACTORS.items())
        + ", others x1.",
    ]
    return "\n".join(lines)


def write(section: str) -> None:
    block = f"{START}\n{section}\n{END}"
    if BENCHMARKS.exists():
        text = BENCHMARKS.read_text()
        if START in text and END in text:
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text,
                          flags=re.DOTALL)
        else:
            text = text.rstrip() + "\n\n## Makespan\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\n## Makespan\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    even = {s: args.latency_ms for s in LLM_STEPS}
    uneven = {s: args.latency_ms * UNEVEN_FACTORS.get(s, 1.0) for s in LLM_STEPS}
    rows = await profile_rows("even", even, args.repeat)
    rows += await profile_rows("uneven", uneven, args.repeat)
    section = table(rows, args.latency_ms, args.repeat)
    print()
    print(section)
    if not args.no_write:
        write(section)
        print(f"\nwritten to {BENCHMARKS}")


if __name__ == "__main__":
    asyncio.run(main())
