"""Where the benchmark scripts put their tables: a marked section of BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(name: str, title: str, text: str) -> None:
    """Put ``title``, the time of the run and ``text`` between ``<!-- name:start -->``
    and ``<!-- name:end -->`` in BENCHMARKS.md (at its end the first time)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    run = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{start}\n## {title}\n\nRun {run}.\n\n{text}{end}"
    current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if start in current and end in current:
        head, _, rest = current.partition(start)
        _, _, tail = rest.partition(end)
        current = head + block + tail
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS.write_text(current)
