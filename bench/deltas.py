"""Live model output (issue 14): what ``delta`` events cost the worker, and how many
a client receives, on the redis backend.

1. Overhead, ``LIVE_DELTAS=1`` beside ``LIVE_DELTAS=0``, interleaved (on, off, off,
   on, on, off, ...) so that both settings see the same machine:
   (b) completed jobs/s of one ``jobq worker`` at zero LLM latency, as
       ``bench/throughput.py`` (b) (no step lives 100 ms there, so no delta is
       written: this is the cost of the streaming path itself);
   (c) ``jobs`` jobs queued at once at 600 ms per LLM call, ``parallel_limit`` 4,
       one worker with a slot per job: the batch's total time and the worker's CPU
       per job, where deltas are really written. The deltas written are counted
       from Redis after the batch, without touching the worker: every event takes
       the next number of the job's counter (``evseq``) and no other event is ever
       removed from the stream, so deltas written = counter - non-delta entries.
2. Stream volume: one job at 3000 ms per call, followed live by an SSE client
   (httpx, a task of this process) against a real ``jobq serve`` and one ``jobq
   worker``: delta events per second of each step's running time, deltas per step,
   and the ``delta`` entries in the finished job's Redis stream per attempt,
   beside the bound the README states for an attempt of its length. A second
   client with ``?deltas=0`` checks the opt-out.

Everything runs on a private ``redis-server``. The table is printed and written into
BENCHMARKS.md between the ``deltas`` markers.
Usage: ``python bench/deltas.py [--quick] [--runs N]`` (``--quick``: one run of each
setting, fewer jobs, BENCHMARKS.md left alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402 - after sys.path
from bench.throughput import (  # noqa: E402 - after sys.path
    BODY,
    Child,
    child_env,
    cpu_s,
    http_ok,
    job_window,
    loop_ms,
    start_worker,
    submit_jobs,
    wait_until,
)
from pipeline.deltas import COALESCE_S, FULL_RATE_DELTAS  # noqa: E402 - after sys.path
from tests.support.redis_server import RedisServer, free_port  # noqa: E402 - after sys.path

SETTINGS = {"on": "1", "off": "0"}
LIVE_LATENCY_MS = 600
LIVE_PARALLEL = 4
VOLUME_LATENCY_MS = 3000
RATE_TARGET = 12.0
OVERHEAD_TARGET = 0.8


# -- counting events in Redis ----------------------------------------------------


@dataclass
class EventCount:
    """Events of finished jobs, read from Redis after the run."""

    ids: int = 0
    """Ids handed out (the jobs' ``evseq`` counters): every event ever written."""
    kept: int = 0
    """Non-delta entries in the streams."""
    deltas_left: int = 0
    """``delta`` entries still in the streams."""
    llm_calls: int = 0
    """LLM calls in the jobs' traces (cache hits left out)."""

    @property
    def deltas_written(self) -> int:
        return self.ids - self.kept


async def deltas_in(redis: Any, stream: str) -> tuple[int, int]:
    """(``delta`` entries, all entries) of an events stream (XRANGE)."""
    entries: list[Any] = await redis.xrange(stream)
    return sum(fields[b"type"] == b"delta" for _, fields in entries), len(entries)


async def count_events(url: str, prefix: str, ids: list[str]) -> EventCount:
    from redis.asyncio import Redis

    from adapters.constants import EVENTS_KEY, TRACE_KEY
    from adapters.redis_codec import EVENT_SEQ_KEY, RedisKeys

    keys = RedisKeys(prefix)
    redis = Redis.from_url(url)
    count = EventCount()
    try:
        for job_id in ids:
            seq = await redis.get(keys.key(EVENT_SEQ_KEY, job_id))
            count.ids += int(seq or 0)
            deltas, entries = await deltas_in(redis, keys.key(EVENTS_KEY, job_id))
            count.deltas_left += deltas
            count.kept += entries - deltas
            for raw in await redis.lrange(keys.key(TRACE_KEY, job_id), 0, -1):
                if not json.loads(raw).get("cache_hit"):
                    count.llm_calls += 1
    finally:
        await redis.aclose()
    return count


# -- 1. overhead ---------------------------------------------------------------------


async def worker_alive(url: str, prefix: str) -> None:
    from adapters.saq_queue import SaqQueue

    queue = SaqQueue.from_url(url, prefix=prefix)
    try:

        async def alive() -> bool:
            return bool((await queue.stats())["workers"])

        await wait_until(alive, "worker")
    finally:
        await queue.close()


async def batch(
    url: str, logs: Path, name: str, jobs: int, env: dict[str, str], **fields: Any
) -> dict[str, float]:
    """``jobs`` jobs queued while one started worker is paused (SIGSTOP, as throughput.py
    (c)), then run: the window from the first start to the last completion, the jobs'
    durations, the worker's CPU from its resume on, and the events counted in Redis."""
    prefix = f"bench-{name}"
    worker = start_worker(url, prefix, logs, name, tree=None, **env)
    try:
        await worker_alive(url, prefix)
        await asyncio.sleep(1.0)
        cpu_before = cpu_s(worker.pid)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            ids = await submit_jobs(url, prefix, jobs, **fields)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        first, last, durations = await job_window(url, prefix, ids, 600)
        worker_cpu = cpu_s(worker.pid) - cpu_before
    finally:
        worker.stop()
    events = await count_events(url, prefix, ids)
    return {
        "rate": jobs / (last - first),
        "total_s": last - first,
        "job_s": statistics.fmean(durations),
        "cpu_s": worker_cpu,
        "cpu_ms_per_job": worker_cpu * 1000 / jobs,
        "deltas": events.deltas_written,
        "deltas_left": events.deltas_left,
        "llm_calls": events.llm_calls,
    }


async def rate_run(url: str, logs: Path, jobs: int, setting: str, run: int) -> dict[str, float]:
    """(b): one worker at zero latency, its default slots; completed jobs/s."""
    env = {"LLM_OFFLINE_LATENCY_MS": "0", "LIVE_DELTAS": SETTINGS[setting]}
    return await batch(url, logs, f"deltas-b-{setting}-{run}", jobs, env)


async def live_run(url: str, logs: Path, jobs: int, setting: str, run: int) -> dict[str, float]:
    """(c): 600 ms per call, parallel_limit 4, a worker slot per job."""
    env = {
        "LLM_OFFLINE_LATENCY_MS": str(LIVE_LATENCY_MS),
        "WORKER_CONCURRENCY": str(jobs),
        "LIVE_DELTAS": SETTINGS[setting],
    }
    return await batch(url, logs, f"deltas-c-{setting}-{run}", jobs, env, parallel_limit=LIVE_PARALLEL)


async def overhead(url: str, logs: Path, runs: int, rate_jobs: int, live_jobs: int) -> dict[str, Any]:
    """Both measures, ``runs`` times each setting, in the order on, off, off, on, ..."""
    rates: dict[str, list[dict[str, float]]] = defaultdict(list)
    lives: dict[str, list[dict[str, float]]] = defaultdict(list)
    speeds: list[float] = []
    for run in range(runs):
        order = ["on", "off"] if run % 2 == 0 else ["off", "on"]
        speeds.append(loop_ms())
        for setting in order:
            rates[setting].append(await rate_run(url, logs, rate_jobs, setting, run))
            lives[setting].append(await live_run(url, logs, live_jobs, setting, run))
            r, c = rates[setting][-1], lives[setting][-1]
            print(
                f"  run {run} {setting}: (b) {r['rate']:.0f} jobs/s, mean job {r['job_s']:.2f} s, "
                f"{r['cpu_ms_per_job']:.1f} ms CPU/job; (c) {c['total_s']:.2f} s, "
                f"{c['cpu_ms_per_job']:.1f} ms CPU/job, {c['deltas']:.0f} deltas "
                f"({c['deltas_left']:.0f} left)",
                flush=True,
            )
    speeds.append(loop_ms())
    return {"rates": rates, "lives": lives, "speeds": speeds}


# -- 2. stream volume ----------------------------------------------------------------


@dataclass
class Received:
    """What one SSE client saw: events with their arrival time."""

    events: list[tuple[float, int | None, str, Any]] = field(default_factory=list)
    """(monotonic arrival, id, type, data)."""


async def follow(base: str, job_id: str, query: str, out: Received) -> None:
    """Read the job's SSE stream until ``done`` (a plain httpx client, line by line)."""
    url = f"{base}/api/jobs/{job_id}/stream{query}"
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60, read=60)) as client,
        client.stream("GET", url) as response,
    ):
        response.raise_for_status()
        event_id: int | None = None
        kind, data = "message", list[str]()
        async for line in response.aiter_lines():
            if line == "":
                if data:
                    out.events.append((time.monotonic(), event_id, kind, json.loads("\n".join(data))))
                    if kind == "done":
                        return
                event_id, kind, data = None, "message", []
            elif line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))


@dataclass
class StepVolume:
    deltas: int = 0
    attempts: set[int] = field(default_factory=set)
    arrivals: list[float] = field(default_factory=list)
    call_s: float = 0.0
    """The step's LLM calls' time (the trace's ``duration_ms``)."""
    contiguous: bool = True

    @property
    def rate(self) -> float:
        """Deltas per second of the step's running time: its LLM calls' time (the
        ``status`` event showing a step running may wait 0.5 s in the commit buffer, so
        the client's running -> finished window is shorter than the step's run)."""
        return self.deltas / self.call_s

    @property
    def peak_1s(self) -> int:
        """Most deltas arriving within any 1 s."""
        best, lo = 0, 0
        for hi, t in enumerate(self.arrivals):
            while t - self.arrivals[lo] > 1.0:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    @property
    def min_gap_ms(self) -> float | None:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return min(gaps) * 1000 if gaps else None


def attempt_bound(seconds: float) -> int:
    """Most deltas an attempt of ``seconds`` may write (README, pipeline/deltas.py): one
    per 100 ms for its first 30, then a gap of the attempt's age over 30."""
    full = FULL_RATE_DELTAS * COALESCE_S
    if seconds <= full:
        return int(seconds / COALESCE_S)
    return int(FULL_RATE_DELTAS * (1 + math.log(seconds / full))) + 1


def stored_per_attempt(entries: list[Any]) -> dict[tuple[str, int], int]:
    """``delta`` entries of an events stream (XRANGE reply) per (step, attempt)."""
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for _, fields in entries:
        if fields[b"type"] == b"delta":
            data = json.loads(fields[b"data"])
            counts[(data["step"], data["attempt"])] += 1
    return dict(counts)


async def volume(url: str, logs: Path) -> dict[str, Any]:
    """One job at 3000 ms per call, followed by two SSE clients (with and without deltas)."""
    from redis.asyncio import Redis

    from adapters.constants import EVENTS_KEY
    from adapters.redis_codec import RedisKeys

    prefix = "bench-dv"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)]
    web = Child("deltas-web", serve, child_env(url, prefix), logs)
    worker = start_worker(url, prefix, logs, "deltas-v-worker", LLM_OFFLINE_LATENCY_MS=str(VOLUME_LATENCY_MS))
    try:
        await wait_until(lambda: http_ok(f"{base}/api/jobs/health"), "jobq serve")
        await worker_alive(url, prefix)
        live, quiet = Received(), Received()
        async with httpx.AsyncClient(timeout=30) as client:
            body = {**BODY, "project_title": f"Solar Mesh {time.time()}"}
            reply = await client.post(f"{base}/api/jobs", json=body)
            reply.raise_for_status()
            job_id = reply.json()["jobId"]
            started = time.monotonic()
            await asyncio.wait_for(
                asyncio.gather(follow(base, job_id, "", live), follow(base, job_id, "?deltas=0", quiet)), 600
            )
            job_s = time.monotonic() - started
            trace = (await client.get(f"{base}/api/jobs/{job_id}/trace")).json()
        redis = Redis.from_url(url)
        try:
            reply_: Any = await redis.xrange(RedisKeys(prefix).key(EVENTS_KEY, job_id))
            entries: list[Any] = list(reply_)
        finally:
            await redis.aclose()
    finally:
        worker.stop()
        web.stop()

    steps: dict[str, StepVolume] = defaultdict(StepVolume)
    offsets: dict[tuple[str, int], int] = {}
    for at, _, kind, data in live.events:  # deltas in order of arrival
        if kind == "delta":
            step = steps[data["step"]]
            step.deltas += 1
            step.attempts.add(data["attempt"])
            step.arrivals.append(at)
            key2 = (data["step"], data["attempt"])
            if data["offset"] != offsets.get(key2, 0):
                step.contiguous = False
            offsets[key2] = data["offset"] + len(data["text"])
    records = trace["calls"]
    llm_steps = set()
    for record in records:
        if not record.get("cache_hit"):
            steps[record["step"]].call_s += record["duration_ms"] / 1000
            llm_steps.add(record["step"])
    measured = {name: s for name, s in steps.items() if name in llm_steps}
    non_delta = [(i, k) for _, i, k, _ in live.events if k != "delta"]
    return {
        "job_s": job_s,
        "steps": measured,
        "stored": stored_per_attempt(entries),
        "bounds": {(r["step"], r["attempt"]): attempt_bound(r["duration_ms"] / 1000) for r in records},
        "stream_entries": len(entries),
        "quiet_deltas": sum(k == "delta" for _, _, k, _ in quiet.events),
        "quiet_same": [(i, k) for _, i, k, _ in quiet.events] == non_delta,
    }


# -- report --------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    """Range, and its width as a share of the median (the noise between runs)."""
    med = _med(values)
    width = (max(values) - min(values)) / med if med else 0.0
    return f"{min(values):.2f}-{max(values):.2f}, {width:.0%}"


def _row(name: str, values: dict[str, list[float]], fmt: str, ratio: str = "") -> str:
    """``| name | on (range) | off (range) | ratio |``, the target cell left open."""
    on, off = values["on"], values["off"]
    ratio = ratio or f"{_med(on) / _med(off):.2f}x"
    cells = [f"{fmt.format(_med(v))} ({_spread(v)})" for v in (on, off)]
    return f"| {name} | {cells[0]} | {cells[1]} | {ratio} |"


def _verdict(paired: list[float]) -> str:
    if all(p >= OVERHEAD_TARGET for p in paired):
        return "met"
    if all(p < OVERHEAD_TARGET for p in paired):
        return "**not met**"
    return "**undecided** (the rounds disagree)"


def _b_reading(rate: dict[str, list[float]], cpu: dict[str, list[float]]) -> str:
    """What (b)'s gap is made of when the worker's CPU per job hardly moves."""
    rate_ratio = _med(rate["on"]) / _med(rate["off"])
    cpu_ratio = _med(cpu["on"]) / _med(cpu["off"])
    if rate_ratio >= 1 or cpu_ratio > 1.1:
        return ""
    return (
        f"\nIn (b) the worker's CPU per job differs by {cpu_ratio - 1:+.0%} while jobs/s differ by "
        f"{rate_ratio - 1:+.0%} (medians): what deltas on cost there is time the jobs wait, not the "
        "worker's CPU.\n"
    )


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(o: dict[str, Any], v: dict[str, Any], runs: int, rate_jobs: int, live_jobs: int) -> str:
    rates, lives, speeds = o["rates"], o["lives"], o["speeds"]
    rate = {s: [r["rate"] for r in rates[s]] for s in SETTINGS}
    total = {s: [r["total_s"] for r in lives[s]] for s in SETTINGS}
    cpu = {s: [r["cpu_ms_per_job"] for r in lives[s]] for s in SETTINGS}
    cpu_all = {s: [r["cpu_s"] for r in lives[s]] for s in SETTINGS}
    deltas = {s: [r["deltas"] for r in lives[s]] for s in SETTINGS}
    calls = {s: [r["llm_calls"] for r in lives[s]] for s in SETTINGS}
    left = {s: sum(r["deltas_left"] for r in lives[s]) for s in SETTINGS}
    b_deltas = {s: sum(r["deltas"] for r in rates[s]) for s in SETTINGS}
    b_cpu = {s: [r["cpu_ms_per_job"] for r in rates[s]] for s in SETTINGS}
    paired = [on / off for on, off in zip(rate["on"], rate["off"], strict=True)]
    ratio = f"{_med(paired):.0%} (rounds: {', '.join(f'{p:.0%}' for p in paired)})"
    per_call = {s: sum(deltas[s]) / max(1, sum(calls[s])) for s in SETTINGS}
    per_delta = (_med(cpu_all["on"]) - _med(cpu_all["off"])) * 1000 / max(1.0, _med(deltas["on"]))
    med = f"median of {runs} (range, width)"
    c_name = f"(c) {live_jobs} jobs, {LIVE_LATENCY_MS} ms/call, parallel_limit {LIVE_PARALLEL}"
    rows = [
        "| measure | deltas on | deltas off | on / off | target |",
        "|---|---|---|---|---|",
        _row(f"(b) {rate_jobs} jobs, 0 ms/call: completed jobs/s, {med}", rate, "{:.0f}", ratio)
        + f" >= 80% in every round: {_verdict(paired)} |",
        _row(f"(b) worker CPU per job (ms), {med}", b_cpu, "{:.2f}") + " |",
        f"| (b) delta events written, all runs | {b_deltas['on']:.0f} | {b_deltas['off']:.0f} | | |",
        _row(f"{c_name}: total (s), {med}", total, "{:.2f}") + " |",
        _row(f"(c) worker CPU per job (ms), {med}", cpu, "{:.1f}") + " |",
        f"| (c) worker CPU for the batch (s), median | {_med(cpu_all['on']):.2f} "
        f"| {_med(cpu_all['off']):.2f} | +{_med(cpu_all['on']) - _med(cpu_all['off']):.2f} s | |",
        f"| (c) delta events written per batch, median | {_med(deltas['on']):.0f} "
        f"| {_med(deltas['off']):.0f} | | |",
        f"| (c) delta events per LLM call (mean) | {per_call['on']:.1f} | {per_call['off']:.1f} | | |",
        f"| (c) extra worker CPU per delta written (ms), medians | {per_delta:.2f} | | | |",
        f"| (c) delta entries in the finished jobs' streams, all runs | {left['on']} | {left['off']} | | |",
    ]
    steps: dict[str, StepVolume] = v["steps"]
    counts = [s.deltas for s in steps.values()]
    top_name, top = max(steps.items(), key=lambda item: item[1].rate)
    gaps = [g for s in steps.values() if (g := s.min_gap_ms) is not None]
    peak = max(s.peak_1s for s in steps.values())
    stored, bounds = v["stored"], v["bounds"]
    over = {k: n for k, n in stored.items() if n > bounds.get(k, 0)}
    most = "0"
    if stored:
        name, attempt = key = max(stored, key=lambda k: stored[k])
        most = f"{stored[key]} ({name} attempt {attempt}; its bound {bounds.get(key, 0)})"
    contiguous = all(s.contiguous for s in steps.values())
    volume_rows = [
        "",
        f"| 1 job, {VOLUME_LATENCY_MS} ms/call, one SSE client | measured | target |",
        "|---|---|---|",
        f"| max over steps of delta events / s of the step's running time | {top.rate:.1f} ({top_name}: "
        f"{top.deltas} in {top.call_s:.2f} s) "
        f"| <= {RATE_TARGET:.0f}/s: {_met(top.rate <= RATE_TARGET)} |",
        f"| most deltas of one step arriving within any 1 s | {peak} | |",
        f"| shortest gap between two deltas of one step at the client (ms; the worker spaces its "
        f"writes >= 100 ms, the rest is delivery jitter) | {min(gaps):.0f} | |",
        f"| delta events per step ({len(counts)} LLM steps): min / mean / max | {min(counts)} / "
        f"{statistics.fmean(counts):.1f} / {max(counts)} | |",
        f"| offsets contiguous per attempt at the client | {'yes' if contiguous else 'no'} | |",
        f"| delta entries in the finished job's Redis stream: all; most of one attempt "
        f"({v['stream_entries']} entries in all) | {sum(stored.values())}; {most} "
        f"| at most {FULL_RATE_DELTAS} (1 + ln(T / {FULL_RATE_DELTAS * COALESCE_S:.0f} s)) + 1 per attempt "
        f"of T s: {_met(not over)} |",
        f"| `?deltas=0` client: deltas received; other events, same ids | {v['quiet_deltas']}; "
        f"{'yes' if v['quiet_same'] else 'no'} | |",
    ]
    busy = max(speeds) > 75
    note = (
        f"\nWhat: (b) as `bench/throughput.py` (b): {rate_jobs} jobs for one `jobq worker` (its "
        "default slots) at zero LLM latency; jobs/s from the first start to the last completion; "
        "on / off is the median of the rounds' ratios (a round runs both settings back to back). At "
        "zero latency the answer comes in one piece and no step lives 100 ms, so no delta is written: "
        "(b) measures what the streaming path costs when it writes nothing. (c) writes deltas: "
        f"{live_jobs} jobs, {LIVE_LATENCY_MS} ms per LLM call, parallel_limit {LIVE_PARALLEL}, a "
        "worker slot per job. In both the jobs are submitted while the started worker is paused "
        "(SIGSTOP) and its CPU is counted from its resume to the last completion. Deltas written "
        "are counted after each batch from Redis, not in the worker: every event takes the next "
        "number of the job's `evseq` counter and no other event is ever removed, so deltas written "
        "= counter - non-delta entries (the log is never rewritten now, so all of them stay). With "
        "deltas off the offline provider sleeps once per call; with deltas on it hands its answer "
        "over in pieces every 50 ms, as a streaming provider does: (c)'s extra CPU is that and "
        "the delta writes together. Each setting ran "
        f"{runs} time{'s' if runs != 1 else ''}, interleaved (on, off, off, on, ...); width is "
        "(max - min) / median, the noise between runs of one setting.\n"
        + _b_reading(rate, b_cpu)
        + f"\nThe stream volume table is one job at {VOLUME_LATENCY_MS} ms per call ({v['job_s']:.1f} s) "
        "followed live by an httpx SSE client against `jobq serve` (with one `jobq worker`, same "
        "private Redis); a step's running time is its LLM call's time from the trace (the client's "
        "running -> finished window starts late: a step's running mark may wait 0.5 s in the commit "
        f"buffer). An attempt of {VOLUME_LATENCY_MS / 1000:.0f} s stays within its first "
        f"{FULL_RATE_DELTAS} deltas, so the thinning after those is not exercised here.\n"
        f"\nMachine: 2 CPUs shared with Redis, the servers and the client; a fixed Python loop took "
        f"{speeds[0]:.0f} ms before and {speeds[-1]:.0f} ms after the run "
        f"({min(speeds):.0f}-{max(speeds):.0f} ms at the start of each round; ~60 ms on a quiet "
        "machine)"
        + (
            ": other work ran on the machine at the same time, which the interleaving spreads over "
            "both settings but which also moves from one run to the next (the widths above).\n"
            if busy
            else ".\n"
        )
    )
    return "\n".join(rows) + "\n" + "\n".join(volume_rows) + "\n" + note


async def main(quick: bool, runs: int | None) -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("saq").setLevel(logging.WARNING)
    logs = ROOT / "data" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = runs or (1 if quick else 3)
    rate_jobs, live_jobs = (100, 50) if quick else (400, 100)
    began = time.monotonic()
    server = RedisServer.start(persistent=False)
    try:
        print(f"redis on {server.url}; logs in {logs}", flush=True)
        o = await overhead(server.url, logs, runs, rate_jobs, live_jobs)
        print("1. overhead done", flush=True)
        v = await volume(server.url, logs)
        print("2. stream volume done", flush=True)
    finally:
        server.close()
    text = table(o, v, runs, rate_jobs, live_jobs)
    print(text)
    print(f"took {time.monotonic() - began:.0f} s", flush=True)
    if not quick:
        write_section("deltas", "Live model output: `delta` events (`bench/deltas.py`)", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run each, fewer jobs, no BENCHMARKS.md")
    parser.add_argument("--runs", type=int, help="runs of each setting (default 3, --quick 1)")
    args = parser.parse_args()
    asyncio.run(main(args.quick, args.runs))
