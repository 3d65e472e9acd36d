"""``bench/throughput.py`` (a), accepting jobs, for an old commit's web server beside the
current tree's, side by side in one run (issue 15: framework validation of typed
request bodies must keep at least 90% of the old accept throughput).

``POST /api/jobs`` at 32 concurrent keep-alive clients (the raw client of
``bench/throughput.py``, in this process; the servers are their own processes), against
two ``jobq serve`` processes on one private ``redis-server``: one runs the old commit's
code (extracted with ``git archive``; its cwd and PYTHONPATH, the same interpreter; a
probe checks that every module it imports comes from that tree), one the work tree's.
The bare Litestar + SAQ floor of (a) runs beside them once per round. Rounds
alternate the order (old, new, new, old, ...); Redis is emptied before each load so
every load starts alike (no worker runs: the accepted jobs stay queued).

The table is printed and written into BENCHMARKS.md between the ``accept`` markers.
Usage: ``python bench/accept_refs.py [--ref REF] [--runs N] [--seconds S] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402 - after sys.path
from bench.compare_refs import Tree, extract, git, probe  # noqa: E402 - after sys.path
from bench.throughput import (  # noqa: E402 - after sys.path
    Child,
    LoadResult,
    child_env,
    http_ok,
    load,
    loop_ms,
    wait_until,
)
from tests.support.redis_server import RedisServer, free_port  # noqa: E402 - after sys.path

OLD_REF = "55a0735"
CLIENTS = 32
TARGET = 0.90


async def flush(url: str) -> None:
    import redis.asyncio as redis

    client = redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def server(name: str, tree: Path | None, url: str, logs: Path, port: int) -> Child:
    """``jobq serve`` of ``tree`` (the work tree when ``None``), logging warnings only."""
    env = child_env(url, f"bench-accept-{name}", **({"PYTHONPATH": str(tree)} if tree else {}))
    argv = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port)]
    return Child(f"accept-{name}", argv, env, logs, cwd=tree or ROOT)


async def measure(
    url: str, ports: dict[str, int], runs: int, seconds: float
) -> tuple[dict[str, list[LoadResult]], list[float]]:
    results: dict[str, list[LoadResult]] = {"old": [], "new": [], "floor": []}
    speeds = []
    for round_ in range(runs):
        speeds.append(loop_ms())
        order = ["old", "new"] if round_ % 2 == 0 else ["new", "old"]
        for key in [*order, "floor"]:
            await flush(url)
            path = "/enqueue" if key == "floor" else "/api/jobs"
            result = await load(ports[key], path, clients=CLIENTS, seconds=seconds, warmup=1.0)
            results[key].append(result)
            print(
                f"round {round_ + 1}/{runs} {key}: {result.rps:.0f} req/s, p50 {result.pct(0.5):.1f} ms, "
                f"p99 {result.pct(0.99):.1f} ms, {result.errors} non-2xx",
                flush=True,
            )
    return results, speeds


def cell(values: list[float], fmt: str) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:{fmt}}"
    return f"{median:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(results: dict[str, list[LoadResult]], labels: dict[str, str], runs: int) -> tuple[str, float]:
    rps = {k: [r.rps for r in v] for k, v in results.items()}
    p50 = {k: [r.pct(0.5) for r in v] for k, v in results.items()}
    p99 = {k: [r.pct(0.99) for r in v] for k, v in results.items()}
    ratio = statistics.median(rps["new"]) / statistics.median(rps["old"])
    per_round = [n / o for n, o in zip(rps["new"], rps["old"], strict=True)]
    verdict = "met" if ratio >= TARGET else "NOT met"
    median_of = f"median of {runs} (range)" if runs > 1 else "one run"
    rows = [
        f"| (a) POST /api/jobs, {CLIENTS} clients, {median_of} | old {labels['old']} "
        f"| new {labels['new']} | new/old | floor (bare Litestar + SAQ) | target | result |",
        "|---|---|---|---|---|---|---|",
        f"| requests/s | {cell(rps['old'], '.0f')} | {cell(rps['new'], '.0f')} | {ratio:.2f} "
        f"| {cell(rps['floor'], '.0f')} | new/old >= {TARGET:.2f} | {verdict} |",
        f"| p50 latency (ms) | {cell(p50['old'], '.1f')} | {cell(p50['new'], '.1f')} "
        f"| {statistics.median(p50['new']) / statistics.median(p50['old']):.2f} "
        f"| {cell(p50['floor'], '.1f')} | | |",
        f"| p99 latency (ms) | {cell(p99['old'], '.1f')} | {cell(p99['new'], '.1f')} "
        f"| {statistics.median(p99['new']) / statistics.median(p99['old']):.2f} "
        f"| {cell(p99['floor'], '.1f')} | | |",
    ]
    rounds = ", ".join(f"{r:.2f}" for r in per_round)
    errors = sum(r.errors for v in results.values() for r in v)
    requests = sum(r.requests for v in results.values() for r in v)
    text = "\n".join(rows) + (
        f"\n\nnew/old per round: {rounds}. {requests} requests measured, {errors} non-2xx.\n"
    )
    return text, ratio


async def run(ref: str, runs: int, seconds: float, logs: Path, old_path: Path) -> tuple[str, float]:
    redis_server = RedisServer.start(persistent=False)
    url = redis_server.url
    old = Tree("old", old_path, f"`{git('rev-parse', '--short', ref)}`")
    new = Tree("new", ROOT, f"`{git('rev-parse', '--short', 'HEAD')}` + work tree")
    print(probe(old, url), flush=True)
    print(probe(new, url), flush=True)
    ports = {"old": free_port(), "new": free_port(), "floor": free_port()}
    children = [
        server("old", old_path, url, logs, ports["old"]),
        server("new", None, url, logs, ports["new"]),
        Child(
            "accept-floor",
            [sys.executable, str(ROOT / "bench" / "throughput.py"), "--floor-app", str(ports["floor"])],
            child_env(url, "bench-accept-floor"),
            logs,
        ),
    ]
    try:
        for key, port in ports.items():
            probe_path = "/schema" if key == "floor" else "/api/jobs/health"
            await wait_until(lambda p=port, q=probe_path: http_ok(f"http://127.0.0.1:{p}{q}"), key)
        before = os.getloadavg()
        results, speeds = await measure(url, ports, runs, seconds)
        after = os.getloadavg()
    finally:
        for child in children:
            child.stop()
        redis_server.close()
    text, ratio = table(results, {"old": old.label, "new": new.label}, runs)
    dirty = git("status", "--porcelain", "--", "pipeline", "adapters", "handlers")
    text += (
        f"\nCompared: the web server (`jobq serve`) of {old.label} (old: the body read with `json.loads` "
        "and checked by hand in `pipeline/request.py`) and of the work tree (new: the body decoded by "
        "Litestar into the `JobRequest` msgspec Struct, strictly, then the domain's checks), "
        f"{'with uncommitted changes in pipeline/, adapters/, handlers/' if dirty else 'clean'}. "
        f"Both on one private `redis-server`, emptied before each {seconds:.0f} s load (1 s warm-up "
        "not counted); no worker runs. The load client is this script's process; servers, client "
        f"and Redis share the machine ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}). "
        f"Load average (1/5/15 min) {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f} before the "
        f"loads and {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f} after; a fixed Python loop took "
        f"{min(speeds):.0f}-{max(speeds):.0f} ms at the rounds' starts.\n"
    )
    return text, ratio


def main(ref: str, runs: int, seconds: float, write: bool) -> None:
    logs = ROOT / "data" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    old_path = Path(tempfile.mkdtemp(prefix="jobq-accept-old-"))
    try:
        extract(ref, old_path)
        text, ratio = asyncio.run(run(ref, runs, seconds, logs, old_path))
    finally:
        shutil.rmtree(old_path, ignore_errors=True)
    print(text)
    if write:
        title = "Accept throughput, old commit beside the work tree (`bench/accept_refs.py`)"
        report.write_section("accept", title, text)
    print(f"new/old = {ratio:.2f} (target >= {TARGET:.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=OLD_REF, help=f"the old commit (default {OLD_REF})")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each loads old, new and the floor)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per load")
    parser.add_argument("--quick", action="store_true", help="one round of 3 s")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds = 1, 3.0
    subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.ref], check=True, capture_output=True)
    main(args.ref, args.runs, args.seconds, not args.no_write)
