"""Old commit against the current tree, side by side in one run (issue 12).

Measures (b) completed jobs/s of one ``jobq worker`` (offline provider, zero
latency) and (c) total/ideal for 200 jobs queued at once on one worker at 200 ms
per LLM call (default info logging), as ``bench/throughput.py`` does, once with the
worker code of an old commit and once with the current work tree's.

The old commit is extracted with ``git archive`` into a temporary directory (removed
at the end); each worker runs ``python -m handlers.cli worker`` with its tree as cwd
and PYTHONPATH (same interpreter), and a probe run the same way checks beforehand
that every ``pipeline``/``adapters``/``handlers`` module it imports comes from that
tree. Jobs are submitted in-process by the current tree's code, on one private
``redis-server``. Runs alternate between the trees, the order flipping every round
(old, new, new, old, ...), so a change of machine speed hits both alike.

The table is printed and written into BENCHMARKS.md between the ``refactor``
markers. Usage: ``python bench/compare_refs.py [--runs N] [--quick] [--ref REF]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402 - after sys.path
from bench.throughput import (  # noqa: E402 - after sys.path
    bench_concurrency,
    child_env,
    jobq_worker_rate,
    loop_ms,
)
from tests.support.redis_server import RedisServer  # noqa: E402 - after sys.path

OLD_REF = "7f5b5cd"
PACKAGES = ("pipeline", "adapters", "handlers")
C_JOBS, C_LATENCY_MS = 200, 200
RUN_LIMIT_S = 300  # one measurement; a worker that never takes its jobs fails the run

T = TypeVar("T")

PROBE = """
import importlib, importlib.util, json, sys
for name in ("handlers.cli", "handlers.saq_worker", "handlers.bootstrap"):
    importlib.import_module(name)
files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
         if n.split(".")[0] in ("pipeline", "adapters", "handlers")}
print(json.dumps({"files": files, "runner": importlib.util.find_spec("pipeline.runner") is not None}))
"""


@dataclass
class Tree:
    """One source tree whose worker is measured."""

    key: str  # "old" or "new"
    path: Path
    label: str
    b: list[float] = field(default_factory=list)  # jobs/s per run
    c: list[dict[str, float]] = field(default_factory=list)  # bench_concurrency per run

    @property
    def c_ratio(self) -> list[float]:
        return [r["total_s"] / r["ideal_s"] for r in self.c]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def extract(ref: str, into: Path) -> None:
    """The tree of ``ref`` as plain files in ``into``."""
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", ref], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=False)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise RuntimeError(f"could not extract {ref} into {into}")


def probe(tree: Tree, url: str) -> str:
    """Import the worker's modules the way the worker does (cwd and PYTHONPATH = the
    tree) and check that all of them come from that tree; one line saying so."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tree.path,
        env=child_env(url, "probe", LOG_LEVEL="info", PYTHONPATH=str(tree.path)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tree.key} tree ({tree.path}) does not import:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    root = str(tree.path.resolve()) + "/"
    files = [f for f in found["files"].values() if f]
    foreign = sorted(f for f in files if not str(Path(f).resolve()).startswith(root))
    if foreign:
        raise RuntimeError(f"{tree.key} worker would import code from outside {root}: {foreign[:5]}")
    runner = "present" if found["runner"] else "absent"
    return f"{tree.key}: {len(files)} modules imported, all from {tree.path}; pipeline/runner.py {runner}"


def fingerprint(tree: Path) -> str:
    """A hash of the worker's source files: did the tree change while it was measured?"""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((tree / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(tree)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


async def limited(step: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(step, RUN_LIMIT_S)
    except TimeoutError:
        raise RuntimeError(f"{what} took over {RUN_LIMIT_S} s (did its worker start? see its log)") from None


async def measure(trees: list[Tree], url: str, logs: Path, runs: int, b_jobs: int) -> list[float]:
    """``runs`` rounds of (b) then (c) for each tree; the order of the trees flips every
    round. Run ids are 2 * round + tree index, so old runs are even and new runs odd in
    the worker logs' names. Returns the loop speed at the start of each round."""
    speeds = []
    for round_ in range(runs):
        speeds.append(loop_ms())
        order = trees if round_ % 2 == 0 else trees[::-1]
        for tree in order:
            run = 2 * round_ + trees.index(tree)
            rate = await limited(jobq_worker_rate(url, logs, b_jobs, run, tree=tree.path), f"(b) {tree.key}")
            tree.b.append(rate)
            print(f"round {round_ + 1}/{runs} (b) {tree.key}: {rate:.0f} jobs/s", flush=True)
        for tree in order:
            run = 2 * round_ + trees.index(tree)
            result = await limited(
                bench_concurrency(url, logs, C_JOBS, C_LATENCY_MS, run, "info", tree=tree.path),
                f"(c) {tree.key}",
            )
            tree.c.append(result)
            print(
                f"round {round_ + 1}/{runs} (c) {tree.key}: total {result['total_s']:.2f} s, "
                f"{result['total_s'] / result['ideal_s']:.3f}x ideal, "
                f"CPU {result['cpu_ms_per_job']:.1f} ms/job",
                flush=True,
            )
    return speeds


def log_problems(logs: Path) -> dict[str, int]:
    """Error and warning lines (and tracebacks) in each tree's worker logs; a run whose
    worker had trouble is no fair comparison."""
    counts = {"old": 0, "new": 0}
    for log in logs.glob("jobq-worker-*.log"):
        key = ("old", "new")[int(log.stem.rsplit("-", 1)[1]) % 2]
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line or "[error" in line or "[critical" in line or "[warning" in line:
                counts[key] += 1
    return counts


# -- report -------------------------------------------------------------------


def spread(values: list[float]) -> float | None:
    """(max - min) / median, or None with fewer than two runs."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else None


def noise(old: list[float], new: list[float]) -> float | None:
    """The larger spread between runs of the same tree."""
    spreads = [s for s in (spread(old), spread(new)) if s is not None]
    return max(spreads) if spreads else None


def verdict(ratio: float, higher_is_better: bool, noise_: float | None) -> str:
    worse = 1 - ratio if higher_is_better else ratio - 1
    if worse <= 0:
        return "met"
    if noise_ is None:
        return f"worse by {worse:.1%} (noise unknown: one run)"
    if worse <= noise_:
        return f"met within noise ({worse:.1%} worse, noise {noise_:.1%})"
    return f"NOT met ({worse:.1%} worse, noise {noise_:.1%})"


def cell(values: list[float], fmt: str, unit: str = "") -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:{fmt}}{unit}"
    return f"{median:{fmt}}{unit} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(old: Tree, new: Tree, runs: int, b_jobs: int) -> tuple[str, dict[str, float | None]]:
    b_noise = noise(old.b, new.b)
    c_noise = noise(old.c_ratio, new.c_ratio)
    b_ratio = statistics.median(new.b) / statistics.median(old.b)
    c_ratio = statistics.median(new.c_ratio) / statistics.median(old.c_ratio)
    old_total = [r["total_s"] for r in old.c]
    new_total = [r["total_s"] for r in new.c]
    old_cpu = [r["cpu_ms_per_job"] for r in old.c]
    new_cpu = [r["cpu_ms_per_job"] for r in new.c]
    old_mem = [r["kib_per_job"] for r in old.c]
    new_mem = [r["kib_per_job"] for r in new.c]
    ideal = old.c[0]["ideal_s"]
    median_of = f"median of {runs} (range)" if runs > 1 else "one run"
    rows = [
        f"| measure, {median_of} | old {old.label} | new {new.label} | new/old | target | result |",
        "|---|---|---|---|---|---|",
        f"| (b) completed jobs/s, one worker process, {b_jobs} jobs | {cell(old.b, '.0f')} "
        f"| {cell(new.b, '.0f')} | {b_ratio:.2f} | new >= old within noise "
        f"| {verdict(b_ratio, True, b_noise)} |",
        f"| (c) {C_JOBS} jobs queued at once, {C_LATENCY_MS} ms/call: total / ideal "
        f"({ideal:.2f} s) | {cell(old.c_ratio, '.3f', 'x')} | {cell(new.c_ratio, '.3f', 'x')} "
        f"| {c_ratio:.3f} | new <= old within noise | {verdict(c_ratio, False, c_noise)} |",
        f"| (c) total (s) | {cell(old_total, '.2f')} | {cell(new_total, '.2f')} "
        f"| {statistics.median(new_total) / statistics.median(old_total):.3f} | | |",
        f"| (c) worker CPU per job (ms) | {cell(old_cpu, '.2f')} | {cell(new_cpu, '.2f')} "
        f"| {statistics.median(new_cpu) / statistics.median(old_cpu):.2f} | | |",
        f"| (c) memory per in-flight job (KiB) | {cell(old_mem, '.0f')} | {cell(new_mem, '.0f')} | | | |",
    ]
    return "\n".join(rows) + "\n", {"b": b_noise, "c": c_noise}


def pct(value: float | None) -> str:
    return "unknown (one run per tree)" if value is None else f"{value:.1%}"


def describe(
    old: Tree,
    new: Tree,
    ref: str,
    state: dict[str, Any],
    noises: dict[str, float | None],
    speeds: list[float],
    seconds: float,
) -> str:
    sequence = "; ".join(
        f"round {n + 1}: "
        + ", ".join(
            f"{t.key} {t.b[n]:.0f}/s {t.c_ratio[n]:.3f}x" for t in ((old, new) if n % 2 == 0 else (new, old))
        )
        for n in range(len(old.b))
    )
    packages = ", ".join(f"{p}/" for p in PACKAGES)
    changed = (
        f"with uncommitted changes in {state['dirty']} files of {packages}"
        if state["dirty"]
        else f"with no uncommitted changes in {packages}"
    )
    text = (
        f"\nCompared: the worker code of `{ref}` (old; extracted with `git archive` into a "
        f"temporary directory) and the work tree (new) at HEAD `{state['head']}`, {changed}; "
        f"{state['differ']} files of {packages} differ between the two. Each worker "
        "runs `python -m handlers.cli worker` with its tree as cwd and PYTHONPATH, the same "
        "interpreter and settings (info logging, offline provider); a probe checked that all "
        "the code it imports comes from its tree. Jobs are submitted by the new tree's code "
        "on one private `redis-server`. (b) and (c) are measured as in `bench/throughput.py`. "
        "The trees alternate, the order flipping every round (old, new, new, old, ...). "
        f"Runs in order (b, c): {sequence}.\n\n"
        f"Targets (issue 12): new (b) >= old (b) and new (c) ratio <= old (c) ratio, within "
        f"noise. Noise observed between runs of the same tree (max - min over median, the "
        f"larger of the two trees): (b) {pct(noises['b'])}, (c) ratio {pct(noises['c'])}. "
        f"A fixed Python loop took {speeds[0]:.0f} ms before and {speeds[-1]:.0f} ms after "
        f"the run ({', '.join(f'{s:.0f}' for s in speeds[1:-1])} ms at the start of each "
        f"round); the whole comparison took {seconds:.0f} s.\n"
    )
    problems = state["log_problems"]
    if any(problems.values()):
        text += (
            f"\n**Warning: the worker logs have error/warning lines (old {problems['old']}, "
            f"new {problems['new']}); see them before trusting the numbers.**\n"
        )
    if state["changed_during_run"]:
        text += "\n**Warning: the new tree's code changed during the run; repeat it.**\n"
    return text


async def measure_all(trees: list[Tree], url: str, logs: Path, runs: int, b_jobs: int) -> list[float]:
    import structlog

    # The bench process submits jobs in-process: keep its own log quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("saq").setLevel(logging.WARNING)
    return await measure(trees, url, logs, runs, b_jobs)


def main(ref: str, runs: int, b_jobs: int, write_to: Path | None) -> None:
    began = time.monotonic()
    logs = ROOT / "data" / "bench-logs" / time.strftime("compare-refs-%Y%m%d-%H%M%S", time.gmtime())
    logs.mkdir(parents=True, exist_ok=True)
    full_ref = git("rev-parse", "--short", f"{ref}^{{commit}}")
    state: dict[str, Any] = {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": len(git("status", "--porcelain", "--", *PACKAGES).splitlines()),
        "differ": len(
            set(git("diff", "--name-only", full_ref, "--", *PACKAGES).splitlines())
            | set(git("ls-files", "--others", "--exclude-standard", "--", *PACKAGES).splitlines())
        ),
    }
    before = fingerprint(ROOT)
    old = Tree("old", Path(tempfile.mkdtemp(prefix="jobq-old-tree-")).resolve(), f"`{full_ref}`")
    new = Tree("new", ROOT, f"`{state['head']}`" + (" + changes" if state["dirty"] else ""))
    speeds = [loop_ms()]
    server = RedisServer.start(persistent=False)
    try:
        extract(full_ref, old.path)
        print(f"redis on {server.url}; worker logs in {logs}", flush=True)
        for tree in (old, new):
            print(probe(tree, server.url), flush=True)
        speeds += asyncio.run(measure_all([old, new], server.url, logs, runs, b_jobs))
    finally:
        server.close()
        shutil.rmtree(old.path, ignore_errors=True)
    speeds.append(loop_ms())
    state["changed_during_run"] = fingerprint(ROOT) != before
    state["log_problems"] = log_problems(logs)
    print(f"error/warning lines in the worker logs: {state['log_problems']}", flush=True)
    rows, noises = table(old, new, runs, b_jobs)
    text = rows + describe(old, new, full_ref, state, noises, speeds, time.monotonic() - began)
    print(text)
    if state["changed_during_run"]:
        print("WARNING: the new tree's code changed during the run", file=sys.stderr)
    if write_to is not None:
        report.BENCHMARKS = write_to
        title = "Refactor: old commit against new code (`bench/compare_refs.py`)"
        report.write_section("refactor", title, text)
        print(f"written to {write_to}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=OLD_REF, help=f"the old commit (default {OLD_REF})")
    parser.add_argument("--runs", type=int, default=3, help="runs per tree (default 3)")
    parser.add_argument("--quick", action="store_true", help="one run per tree, 100 jobs in (b)")
    parser.add_argument(
        "--write-to",
        type=Path,
        default=report.BENCHMARKS,
        help="the file to put the section in (default BENCHMARKS.md)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    main(args.ref, runs, 100 if args.quick else 400, None if args.no_write else args.write_to)
