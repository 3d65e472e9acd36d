"""CPU instructions per job on the redis backend, counted by valgrind.

Timings on a shared machine swing by a third from one minute to the next; the
number of instructions a job executes does not. Two measures, each run under
``valgrind --tool=callgrind`` twice, with a small and a large number of jobs (the
difference divided by the difference in jobs is the cost of one job, free of
start-up), offline provider at zero latency, 20 jobs at a time:

- in process: ``bench/pipeline_overhead.py`` (``run_job`` on the Redis store, no SAQ);
- worker: a real ``jobq worker`` process (SAQ included) taking jobs submitted to it.

With ``--against REF`` the same is measured for a git revision (checked out into a
temporary worktree) beside the working tree, in the same run. Jobs for the worker
are submitted by this tree's code, so REF must share its Redis key layout.

Usage: ``python bench/instructions.py [--against REF] [--small 20] [--large 80]``.
The table is printed and written into BENCHMARKS.md between the ``instructions``
markers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402 - after sys.path
from bench.throughput import (  # noqa: E402 - after sys.path
    RedisServer,
    child_env,
    job_window,
    submit_jobs,
    wait_until,
)

CONCURRENCY = 20
"""Jobs run at once. Under valgrind a process runs some fifty times slower, and with
many more jobs per event-loop turn Redis replies wait past the 5 s operation timeout."""


def instructions(tree: Path, jobs: int, out_dir: Path) -> int:
    """Instructions executed by one in-process run of ``jobs`` jobs in ``tree``."""
    out = out_dir / f"callgrind.{tree.name}.{jobs}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(tree / "bench" / "pipeline_overhead.py"),
            "--jobs",
            str(jobs),
            "--concurrency",
            str(CONCURRENCY),
            "--backend",
            "redis",
        ],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _totals(out)


def _totals(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


async def worker_instructions(tree: Path, jobs: int, out_dir: Path, redis_url: str) -> int:
    """Instructions a ``jobq worker`` in ``tree`` executes from start to exit, running
    ``jobs`` jobs submitted to it at once (``CONCURRENCY`` of them at a time)."""
    from adapters.saq_queue import SaqQueue

    prefix = f"instr-{tree.name}-{jobs}"
    out = out_dir / f"callgrind.worker.{tree.name}.{jobs}"
    env = child_env(
        redis_url, prefix, LLM_OFFLINE_LATENCY_MS="0", WORKER_CONCURRENCY=str(CONCURRENCY)
    )
    proc = _under_callgrind([sys.executable, "-m", "handlers.cli", "worker"], tree, env, out)
    queue = SaqQueue.from_url(redis_url, prefix=prefix)
    try:

        async def alive() -> bool:
            return bool((await queue.stats())["workers"])

        await wait_until(alive, "worker under valgrind", 300)
        await asyncio.sleep(2)  # every slot waiting in its dequeue
        ids = await submit_jobs(redis_url, prefix, jobs)
        await job_window(redis_url, prefix, ids, 900)
    finally:
        await queue.close()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 300)
    return _totals(out)


def _under_callgrind(
    argv: list[str], cwd: Path, env: dict[str, str], out: Path
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def worker_per_job(tree: Path, small: int, large: int, out_dir: Path, redis_url: str) -> float:
    few, many = await asyncio.gather(
        worker_instructions(tree, small, out_dir, redis_url),
        worker_instructions(tree, large, out_dir, redis_url),
    )
    return (many - few) / (large - small) / 1e6


def per_job(tree: Path, small: int, large: int, out_dir: Path) -> float:
    """Millions of instructions per job (difference of two runs, in parallel)."""
    with ThreadPoolExecutor(2) as pool:
        few, many = pool.map(lambda n: instructions(tree, n, out_dir), (small, large))
    return (many - few) / (large - small) / 1e6


def checkout(ref: str, into: Path) -> Path:
    """``ref`` in a worktree, measured with this tree's ``pipeline_overhead.py``."""
    tree = into / "against"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    shutil.copy(ROOT / "bench" / "pipeline_overhead.py", tree / "bench" / "pipeline_overhead.py")
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision to measure beside the working tree")
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=80)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("saq").setLevel(logging.WARNING)
    server = RedisServer.start(persistent=False)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="jobq-instructions-") as tmp:
        out_dir = Path(tmp)
        trees = [("working tree", ROOT)]
        try:
            if args.against:
                trees.append((f"`{args.against}`", checkout(args.against, out_dir)))
            for name, tree in trees:
                in_process = per_job(tree, args.small, args.large, out_dir)
                worker = asyncio.run(
                    worker_per_job(tree, args.small, args.large, out_dir, server.url)
                )
                rows.append((name, in_process, worker))
        finally:
            server.close()
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", str(out_dir / "against")],
                               cwd=ROOT, check=False)
    base = rows[-1]
    lines = [
        "| code | in process: M instructions per job | vs last row "
        "| SAQ worker: M instructions per job | vs last row |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {mi:.1f} | {mi / base[1]:.2f}x | {mw:.1f} | {mw / base[2]:.2f}x |"
          for name, mi, mw in rows),
    ]
    text = (
        "\n".join(lines)
        + f"\n\nOffline provider at zero latency, {CONCURRENCY} jobs at a time, {args.large} jobs minus "
        f"{args.small} jobs under callgrind. In process: `run_job` on Redis without SAQ; "
        "SAQ worker: a `jobq worker` process taking submitted jobs. The count does not "
        "depend on the machine's load; it moves by a few percent between runs, as how "
        "commands batch depends on timing.\n"
    )
    print(text)
    write_section("instructions", "Instructions per job (`bench/instructions.py`)", text)


if __name__ == "__main__":
    main()
