"""CPU instructions per job of the pipeline on the Redis store, counted by valgrind.

Timings on a shared machine swing by a third from one minute to the next; the
number of instructions a job executes does not. ``bench/pipeline_overhead.py``
runs in-process jobs (offline provider, zero latency) under
``valgrind --tool=callgrind`` twice, with a small and a large number of jobs; the
difference divided by the difference in jobs is the cost of one job, free of
start-up. With ``--against REF`` the same is measured for a git revision (checked
out into a temporary worktree) beside the working tree, in the same run.

Usage: ``python bench/instructions.py [--against REF] [--small 20] [--large 80]``.
The table is printed and written into BENCHMARKS.md between the ``instructions``
markers.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402 - after sys.path


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
            str(jobs),
            "--backend",
            "redis",
        ],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


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
    with tempfile.TemporaryDirectory(prefix="jobq-instructions-") as tmp:
        out_dir = Path(tmp)
        rows = [("working tree", per_job(ROOT, args.small, args.large, out_dir))]
        if args.against:
            tree = checkout(args.against, out_dir)
            try:
                rows.append((f"`{args.against}`", per_job(tree, args.small, args.large, out_dir)))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    base = rows[-1][1]
    lines = [
        "| code | M instructions per job | vs last row |",
        "|---|---:|---:|",
        *(f"| {name} | {mi:.1f} | {mi / base:.2f}x |" for name, mi in rows),
    ]
    text = (
        "\n".join(lines)
        + f"\n\nIn-process jobs on Redis (offline provider, zero latency, all at once), "
        f"{args.large} jobs minus {args.small} jobs under callgrind; the count does not "
        "depend on the machine's load.\n"
    )
    print(text)
    write_section("instructions", "Instructions per job (`bench/instructions.py`)", text)


if __name__ == "__main__":
    main()
