"""Streams at scale (issue 13): thousands of SSE clients on one web process.

redis backend, per N (500, 1,000, 2,000): a private ``redis-server``, a real ``jobq
serve`` and one real ``jobq worker`` (``WORKER_CONCURRENCY`` N, ``LIVE_DELTAS=0``,
offline provider at ``--latency-ms`` per call, so each job runs for minutes), N jobs
arriving over 10 s (``--arrivals``: each at its own random time, by default; see
``ARRIVALS``) and N streams, each following its own job, opened by the load
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
  from ``/proc``; the maximum of samples 5 s apart), its RSS (peak of 1 s samples,
  and peak minus the RSS before the streams opened, per stream) and its CPU (seconds,
  % of one core);
- the floor in the same run: a bare Litestar SSE endpoint under the same uvicorn
  settings as ``jobq serve``, sending each stream the same number of events over the
  same time from an in-process timer (each event carries its send time), followed by
  the same client;
- the floor under load, in the same run: the same app while a worker runs N jobs on
  a Redis of its own beside it (nobody reads their events), each stream sent its
  events at the times the jobq run's events were written, so with the same bursts
  and the same competition for the machine's cores.

aws backend: moto server (in this process), ``jobq serve`` and ``jobq worker`` on
the aws backend; the web process reaches S3 through a counting proxy here, so its S3
requests are counted apart from the worker's. (a) 200 streams, each following its
own running job; (b) 10 queued jobs nobody runs (idle), 20 streams each, for 60 s:
S3 requests per stream-minute and per idle job per second.

The stress run (``--burst-n``, 2,000 by default): the same N jobs arriving in lockstep
batches, each batch writing its events in bursts; jobq and the floor under load, with
the same arrivals.

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
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout_parts import PARTS, PREFIX, CountingProxy, Sampler, WriteProbe  # noqa: E402
from bench.report import write_section  # noqa: E402 - after sys.path
from bench.throughput import (  # noqa: E402 - after sys.path
    Child,
    child_env,
    cpu_s,
    http_ok,
    loop_ms,
    rss_kib,
    start_worker,
    submit_at,
    wait_until,
)

# -- one run -------------------------------------------------------------------------

SUBMIT_BATCHES = 20
SPREAD_S = 10.0
"""Jobs are submitted in SUBMIT_BATCHES batches over this long."""
SETTLE_S = 20.0
"""aws idle scenario: streams open during this long before requests are counted."""


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
    proc = await asyncio.create_subprocess_exec(sys.executable, str(PARTS), "--client", str(spec), str(out))
    await proc.wait()
    return dict(json.loads(out.read_text()))


def summarize(result: dict[str, Any], write_times: dict[tuple[str, int], float] | None) -> dict[str, Any]:
    lags: list[float] = []
    by_kind: dict[str, list[float]] = defaultdict(list)
    late: list[float] = []
    """Seconds after the stream opened of the events in the slowest 1%."""
    streams = result["streams"]
    timed: list[tuple[float, float, float]] = []
    for s in streams:
        job = s["path"].split("/")[3] if write_times is not None else ""
        for event_id, kind, received, sent in s["events"]:
            written = sent if write_times is None else write_times.get((job, event_id))
            if written and written >= s["opened"]:
                lags.append((received - written) * 1000)
                by_kind[kind].append(lags[-1])
                timed.append((lags[-1], written - s["opened"], written))
    all_open = max((s["opened"] for s in streams), default=0.0)
    steady = [lag for lag, since, written in timed if written > all_open + 1.0]
    cut_off = _pct(lags, 0.99)
    late = sorted(round(since, 1) for lag, since, _ in timed if lag >= cut_off)
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
        "p99_steady": _pct(steady, 0.99),
        "steady_n": len(steady),
        "p99_by_kind": {kind: round(_pct(v, 0.99)) for kind, v in by_kind.items()},
        "slowest_since_open_s": late[:: max(1, len(late) // 10)],
    }


ARRIVALS = ("independent", "batches")
"""How the N jobs arrive over SPREAD_S: ``independent``, each at its own random time, as
independent users' jobs do (their steps then fall at scattered times, as the floor's
events do); ``batches``, in SUBMIT_BATCHES batches, so each batch's jobs run in lockstep
(the offline provider takes the same time for every call) and write their events in
bursts of a hundred jobs at once, a stress no floor has but the floor under load."""


class Load:
    """What runs beside the web process: a private Redis and one ``jobq worker`` running
    N jobs that arrive over SPREAD_S as ``arrivals`` says (see ARRIVALS)."""

    def __init__(
        self, n: int, logs: Path, latency_ms: int, label: str, tree: Path | None, arrivals: str
    ) -> None:
        from tests.support.redis_server import RedisServer

        self.n = n
        self.arrivals = arrivals
        self.server = RedisServer.start(persistent=False)
        self.worker = start_worker(
            self.server.url,
            PREFIX,
            logs,
            f"fanout-worker-{label}",
            tree=tree,
            LLM_OFFLINE_LATENCY_MS=str(latency_ms),
            LIVE_DELTAS="0",
            WORKER_CONCURRENCY=str(n + 10),
            LOG_LEVEL="warning",
        )

    async def submit(self) -> list[str]:
        if self.arrivals == "batches":
            counts = [self.n // SUBMIT_BATCHES + (b < self.n % SUBMIT_BATCHES) for b in range(SUBMIT_BATCHES)]
            offsets = [b * SPREAD_S / SUBMIT_BATCHES for b in range(SUBMIT_BATCHES)]
        else:
            counts = [1] * self.n
            offsets = sorted(random.uniform(0, SPREAD_S) for _ in range(self.n))
        return await submit_at(self.server.url, PREFIX, list(zip(offsets, counts, strict=True)))

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds the worker and Redis have used so far (they share the machine's
        cores with the web process)."""
        assert self.server.process is not None
        return {"worker": cpu_s(self.worker.pid), "redis": cpu_s(self.server.process.pid)}

    def stop(self) -> None:
        self.worker.stop()
        self.server.close()


async def jobq_run(
    n: int, logs: Path, latency_ms: int, arrivals: str, tree: Path | None = None
) -> dict[str, Any]:
    from tests.support.redis_server import free_port

    label = f"{n}-{arrivals}" if tree is None else f"{n}-{arrivals}-{tree.name}"
    for old in logs.glob(f"fanout-*-{label}.log"):  # noqa: ASYNC240 - before the run
        old.unlink()  # Child appends: one run per log
    load = Load(n, logs, latency_ms, label, tree, arrivals)
    port = free_port()
    in_tree = {} if tree is None else {"PYTHONPATH": str(tree)}
    env = child_env(load.server.url, PREFIX, LIVE_DELTAS="0", SSE_HEARTBEAT_S="15", **in_tree)
    serve = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)]
    web = Child(f"fanout-web-{label}", serve, env, logs, cwd=tree or ROOT)
    probe = WriteProbe(load.server.url)
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/api/jobs/health"), "jobq serve")
        await probe.start()
        rss_before = rss_kib(web.pid)
        sampler = Sampler(web.pid, load.server.port, redis=probe.redis).start()
        ids = await load.submit()
        cpu_before, began, own_before = cpu_s(web.pid), time.monotonic(), time.process_time()
        beside_before = load.cpu_s()
        result = await run_client(
            logs, f"fanout-jobq-{label}", port, [f"/api/jobs/{i}/stream" for i in ids], False, 900
        )
        wall = time.monotonic() - began
        cpu = cpu_s(web.pid) - cpu_before
        sampler.stop()
        own_cpu = time.process_time() - own_before
        beside = {name: used - beside_before[name] for name, used in load.cpu_s().items()}
        times = probe.times
        summary = summarize(result, times)
        writes = [[job, event_id, at] for (job, event_id), at in times.items()]
        (logs / f"fanout-jobq-{label}-writes.json").write_text(json.dumps(writes))
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
            schedule=schedule(result, times),
            bench_cpu_s=own_cpu,
            beside_cpu_s=beside,
        )
        return summary
    finally:
        await probe.stop()
        web.stop()
        load.stop()


def schedule(result: dict[str, Any], write_times: dict[tuple[str, int], float]) -> list[list[float]]:
    """Per stream, when its job's events were written after it opened: seconds after
    the first stream opened (the loaded floor sends its events at these times)."""
    streams = result["streams"]
    first = min((s["opened"] for s in streams if s["opened"]), default=0.0)
    out = []
    for s in streams:
        job = s["path"].split("/")[3]
        written = (write_times.get((job, event_id)) for event_id, *_ in s["events"])
        out.append([round(w - first, 3) for w in written if w and w >= s["opened"]])
    return out


def _warnings(log: Path) -> int:
    return sum(
        1 for line in log.read_text(errors="replace").splitlines() if "warning" in line or "error" in line
    )


async def floor_run(
    n: int,
    logs: Path,
    events: int,
    interval: float,
    loaded: tuple[int, str, list[list[float]]] | None = None,
) -> dict[str, Any]:
    """The bare floor; with ``loaded`` (latency_ms, arrivals, schedule), the floor under
    the jobq run's conditions: the same worker running N jobs arriving the same way
    beside it, and each stream's events sent at the times the jobq run's were written
    (same bursts)."""
    from tests.support.redis_server import free_port

    port = free_port()
    name = f"fanout-floor-{n}" if loaded is None else f"fanout-floor-loaded-{n}-{loaded[1]}"
    app = Child(name, [sys.executable, str(PARTS), "--floor-app", str(port)], dict(os.environ), logs)
    load = None if loaded is None else Load(n, logs, loaded[0], f"{n}-floor-{loaded[1]}", None, loaded[1])
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/schema"), "floor app")
        rss_before = rss_kib(app.pid)
        if load is not None:
            await load.submit()
        sampler = Sampler(app.pid, None).start()
        cpu_before, began = cpu_s(app.pid), time.monotonic()
        beside_before = load.cpu_s() if load is not None else {}
        if loaded is None:
            paths = [f"/s/{i}?events={events}&interval={interval:.3f}" for i in range(n)]
        else:
            start = time.time() + 0.5
            paths = [
                f"/p/{i}?start={start:.3f}&at={','.join(f'{t:.3f}' for t in times)}"
                for i, times in enumerate(loaded[2])
            ]
        result = await run_client(logs, name, port, paths, True, 900)
        wall = time.monotonic() - began
        cpu = cpu_s(app.pid) - cpu_before
        beside = {} if load is None else {k: v - beside_before[k] for k, v in load.cpu_s().items()}
        sampler.stop()
        summary = summarize(result, None)
        summary.update(
            conns=None,
            rss_mib=sampler.rss_peak / 1024,
            rss_per_stream_kib=(sampler.rss_peak - rss_before) / n,
            cpu_s=cpu,
            cpu_pct=100 * cpu / wall,
            beside_cpu_s=beside,
            wall_s=wall,
        )
        return summary
    finally:
        app.stop()
        if load is not None:
            load.stop()


# -- aws ------------------------------------------------------------------------------


async def aws_run(
    logs: Path, streams: int, idle_jobs: int, per_idle: int, idle_s: float, latency_ms: int
) -> dict[str, Any]:
    """The aws scenarios on a moto server in a process of its own: in this one it would
    share the GIL with the counting proxy, and on a slow machine the streams' LISTs (each
    walks the bucket) left the worker's calls waiting for minutes."""
    from tests.support.redis_server import free_port

    moto_port = free_port()
    command = [sys.executable, "-m", "tests.support.moto_server", str(moto_port)]
    moto = Child("fanout-moto", command, dict(os.environ), logs, cwd=ROOT)
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{moto_port}/moto-api/"), "moto server")
        return await _aws_scenarios(moto_port, logs, streams, idle_jobs, per_idle, idle_s, latency_ms)
    finally:
        moto.stop()


async def _aws_scenarios(
    moto_port: int, logs: Path, streams: int, idle_jobs: int, per_idle: int, idle_s: float, latency_ms: int
) -> dict[str, Any]:
    from tests.support.moto_server import aws_backend_env
    from tests.support.redis_server import free_port

    endpoint = f"http://127.0.0.1:{moto_port}"
    env_aws = aws_backend_env(f"fanout{random.randrange(10**6)}", visibility_timeout_s=600, endpoint=endpoint)
    os.environ.update({k: v for k, v in env_aws.items() if k.startswith("AWS_")})  # for _submit_aws
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
        client = asyncio.ensure_future(
            run_client(logs, "fanout-aws-idle", port, paths, False, idle_s + SETTLE_S)
        )
        await asyncio.sleep(SETTLE_S)  # streams open (one GET of the job, one LIST, one GET each)
        opening = proxy.reset()
        await asyncio.sleep(idle_s)
        counts = proxy.reset()
        await client
        total = sum(counts.values())
        out["idle"] = {
            "opening": opening,
            "jobs": idle_jobs,
            "streams": len(paths),
            "seconds": idle_s,
            "counts": counts,
            "per_job_s": total / idle_jobs / idle_s,
            "per_stream_min": total / len(paths) / (idle_s / 60),
        }
        if streams == 0:
            return out
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
        await proxy.close()


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

Rows = list[tuple[int, str, dict[str, Any]]]
"""(N, server, one run's results) per run."""


def _runs(values: list[float], digits: int = 2) -> str:
    """The median, then every run's value in run order when there are several."""
    middle = f"{statistics.median(values):.{digits}f}"
    return middle if len(values) == 1 else f"{middle} ({' / '.join(f'{v:.{digits}f}' for v in values)})"


def _row(n: int, name: str, runs: list[dict[str, Any]], ratios: str) -> str:
    conns = [r["conns"] for r in runs if r.get("conns") is not None]
    rss = statistics.median(r["rss_mib"] for r in runs)
    per_stream = statistics.median(r["rss_per_stream_kib"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    cpu_pct = statistics.median(r["cpu_pct"] for r in runs)
    p99 = [r["p99"] for r in runs]
    return (
        f"| {n} | {name} | {sum(r['done'] for r in runs)}/{sum(r['n'] for r in runs)} | "
        f"{sum(sum(r['cuts'].values()) for r in runs)} | "
        f"{statistics.median(r['p50'] for r in runs):.1f} | {_runs(p99, 1)} | "
        f"{ratios} | {max(conns) if conns else '-'} | {rss:.0f} ({per_stream:.1f}) | "
        f"{cpu:.0f} ({cpu_pct:.0f}%) |"
    )


def table(rows: Rows, aws: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    """One line per N and server: medians over the runs; the ratios are taken run by
    run (each against the floor of the same run) and shown as their median."""
    grouped: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for n, name, r in rows:
        grouped[(n, name)].append(r)
    floors = {(n, r["rep"]): r for n, name, r in rows if name == "floor"}
    loaded = {
        (n, name.removeprefix("floor under load"), r["rep"]): r
        for n, name, r in rows
        if name.startswith("floor under")
    }
    lines = [
        "| N | server | reached `done` (all runs) | cut | lag p50 ms | lag p99 ms | p99 / floor "
        "| p99 / floor under load | Redis conns (web) | RSS MiB (per stream KiB) | web CPU s (% core) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, name), runs in grouped.items():
        ratios = []
        tag = name[name.index(",") :] if "," in name else ""
        for bases in (
            [floors.get((n, r["rep"])) for r in runs],
            [loaded.get((n, tag, r["rep"])) for r in runs],
        ):
            pairs = [(r["p99"], base["p99"]) for r, base in zip(runs, bases, strict=True) if base]
            shown = not name.startswith("floor") and pairs
            ratios.append(_runs([mine / base for mine, base in pairs]) if shown else "")
        lines.append(_row(n, name, runs, " | ".join(ratios)))
    text = "\n".join(lines) + "\n\n"
    text += (
        "Today, from the issue (before this change): 500 streams: 1,165 Redis connections in all, p99 "
        "622 ms; 1,000 streams: 1,126-1,140 Redis connections held by the web process, p99 404-875 ms, "
        "1-30 streams cut in four runs."
        + (f" The `before` row is the code of {meta['before']} in this run." if meta.get("before") else "")
        + "\n\n"
    )
    for n, name, r in rows:
        text += (
            f"- run {r['rep']}, N={n} {name}: p99 {r['p99']:.1f} ms, lag samples {r['lag_n']}, "
            f"cuts {r['cuts'] or 'none'}, client CPU "
            f"{r['client_cpu_s']:.0f} s, run {r['wall_s']:.0f} s"
            + (f", web log warning/error lines {r['web_warnings']}" if "web_warnings" in r else "")
            + (f", write probe and meters CPU {r['bench_cpu_s']:.1f} s" if "bench_cpu_s" in r else "")
            + "".join(f", {name} CPU {used:.1f} s" for name, used in r.get("beside_cpu_s", {}).items())
            + (
                f", Redis clients in all (INFO clients) {r['redis_clients_all']}"
                if "redis_clients_all" in r
                else ""
            )
            + "\n"
        )
    if aws:
        idle, run = aws["idle"], aws["run"]
        text += (
            "\naws backend (moto), the web process's S3 requests counted at a proxy in front of moto:\n\n"
            "| scenario | streams | reached `done` | web S3 requests | per stream-minute "
            "| per idle job per s |\n"
            "|---|---|---|---|---|---|\n"
            f"| {idle['jobs']} idle jobs x {idle['streams'] // idle['jobs']} streams, "
            f"{idle['seconds']:.0f} s | {idle['streams']} | - | {idle['counts']} | "
            f"{idle['per_stream_min']:.2f} | {idle['per_job_s']:.2f} |\n"
            f"| running jobs ({meta['aws_latency_ms']} ms per call), one stream each | {run['n']} | "
            f"{run['done']}/{run['n']} | {run['counts']} | "
            f"{run['per_stream_min']:.1f} | - |\n"
        )
    text += (
        f"\nSetup: offline provider at {meta['latency_ms']} ms per call, `LIVE_DELTAS=0`, one `jobq worker` "
        "with concurrency N+10. The N jobs arrive over 10 s, each at its own random time (rows marked "
        f"`batches`: in {SUBMIT_BATCHES} batches, each running in lockstep, writing its events in bursts). "
        "Lag: client receipt minus Redis's keyspace notification of the XADD, "
        "events written after the stream opened only. Floor: bare Litestar SSE under the same uvicorn "
        f"settings, {meta['events']} events per stream over the jobq run's length, evenly spaced, nothing "
        "else running. Floor under load: the same app while the same worker runs N jobs on its own Redis "
        "beside it, each stream's events sent at the times the jobq run's were written (the same "
        "bursts); its lag counts from those planned times, the bare floor's from the app's send time. "
        f"Runs: {meta['repeat']} of every row, interleaved (run 1 of every row, then run 2, ...); a "
        "line shows the median over its runs, the runs' values in brackets, in run order; a ratio is "
        "taken within a run (against the floor of the same run). "
        "Machine: 2 cores shared "
        f"with other sessions; load average before {meta['load_before']}, after {meta['load_after']}; "
        f"pure-Python loop {meta['loop_ms']:.0f} ms.\n"
    )
    return text


def _commit_of(tree: Path) -> str:
    import subprocess

    found = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True, check=False
    )
    return f"`{found.stdout.strip()}`" if found.returncode == 0 else str(tree)


def _keep(rows: Rows, rep: int, n: int, name: str, r: dict[str, Any]) -> None:
    r["rep"] = rep
    shown = {k: v for k, v in r.items() if k != "schedule"}
    print(f"run {rep} N={n} {name}: {shown}", flush=True)
    rows.append((n, name, r))


async def main(args: argparse.Namespace) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logs = ROOT / "data" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    ns = [int(x) for x in (args.ns or ("100" if args.quick else "500,1000,2000")).split(",")]
    load_before = os.getloadavg()
    meta: dict[str, Any] = {
        "latency_ms": args.latency_ms,
        "aws_latency_ms": args.aws_latency_ms,
        "loop_ms": loop_ms(),
    }
    if args.before:
        meta["before"] = _commit_of(args.before)
    rows: Rows = []
    runs = [(n, args.arrivals) for n in ns]
    burst_n = args.burst_n if args.burst_n is not None else (100 if args.quick else 2000)
    if burst_n:
        runs.append((burst_n, "batches"))
    repeat = args.repeat or (1 if args.quick else 3)
    meta.update(repeat=repeat)
    for rep in range(1, repeat + 1):
        for n, arrivals in runs:
            tag = "" if arrivals == "independent" else f", {arrivals}"
            jobq = await jobq_run(n, logs, args.latency_ms, arrivals, args.tree)
            _keep(rows, rep, n, f"jobq serve{tag}", jobq)
            if args.before and n == args.before_n:
                before = await jobq_run(n, logs, args.latency_ms, arrivals, args.before)
                _keep(rows, rep, n, f"before{tag}", before)
            if args.no_floor:
                continue
            events = max(1, round(jobq["events"] / max(1, jobq["n"])) - 1)
            meta.update(events=events)
            if not any(row_n == n and name == "floor" and r["rep"] == rep for row_n, name, r in rows):
                _keep(rows, rep, n, "floor", await floor_run(n, logs, events, jobq["wall_s"] / events))
            schedule = (args.latency_ms, arrivals, jobq["schedule"])
            loaded = await floor_run(n, logs, events, 0.0, loaded=schedule)
            _keep(rows, rep, n, f"floor under load{tag}", loaded)
    aws = None
    saved = logs / "fanout-aws.json"
    if args.reuse_aws:
        aws = json.loads(saved.read_text())
        print(f"aws (from {saved}): {aws}", flush=True)
        if args.aws_idle:
            idle = await aws_run(logs, 0, 10, 20, 60, args.aws_latency_ms)
            aws["idle"] = idle["idle"]
            aws["idle_rerun"] = True
            print(f"aws idle: {idle}", flush=True)
    elif not args.no_aws:
        aws = await aws_run(
            logs,
            streams=20 if args.quick else 200,
            idle_jobs=2 if args.quick else 10,
            per_idle=20,
            idle_s=15 if args.quick else 60,
            latency_ms=args.aws_latency_ms,
        )
        print(f"aws: {aws}", flush=True)
        saved.write_text(json.dumps(aws))
    meta.update(
        load_before=" ".join(f"{x:.2f}" for x in load_before),
        load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )
    meta.setdefault("events", "?")
    text = table(rows, aws, meta)
    print(text)
    if not (args.quick or args.tree or args.no_floor):
        write_section("fanout", "Streams at scale (`bench/fanout.py`)", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=100, a short aws run, no BENCHMARKS.md")
    parser.add_argument("--ns", help="stream counts (default 500,1000,2000; --quick 100)")
    parser.add_argument("--latency-ms", type=int, default=4000, help="offline provider time per call")
    parser.add_argument("--no-aws", action="store_true")
    parser.add_argument("--aws-idle", action="store_true", help="with --reuse-aws: run the idle part again")
    parser.add_argument("--reuse-aws", action="store_true", help="the aws rows of the last run (its json)")
    parser.add_argument(
        "--aws-latency-ms", type=int, default=500, help="aws run: offline provider time per call"
    )
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="independent", help="how the jobs arrive")
    parser.add_argument(
        "--burst-n", type=int, help="also run N jobs arriving in lockstep batches (default 2000; 0: no)"
    )
    parser.add_argument("--tree", type=Path, help="run jobq serve and worker from this source tree")
    parser.add_argument("--before", type=Path, help="also run this source tree (e.g. a checkout of main)")
    parser.add_argument("--before-n", type=int, default=2000, help="the N at which --before runs")
    parser.add_argument(
        "--repeat", type=int, help="runs of every row, interleaved; the table shows medians (default 3)"
    )
    asyncio.run(main(parser.parse_args()))
