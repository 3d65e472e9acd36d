"""Makespan maths for ``bench/makespan.py``: the exact optimum of one job's schedule
and the old batch scheduler's makespan, on the pipeline's step graph."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from functools import cache

from pipeline.graph import (
    LLM_STEPS,
    STEP_BY_NAME,
    STEPS,
    TOTAL_STEPS,
    Latency,
    remaining_chain,
    unit_llm_latency,
)


def critical_path(latency: Latency = unit_llm_latency) -> float:
    return max(remaining_chain(latency).values())


def lower_bound(latency: Latency | float, parallel_limit: int) -> float:
    """Shortest possible makespan of the job with ``parallel_limit`` concurrent LLM
    calls, steps of the given latency (a number means: every LLM step takes that
    long, code steps nothing). Exact: see :func:`optimal_makespan`."""
    if isinstance(latency, int | float):
        per_call = float(latency)

        def fn(name: str) -> float:
            return per_call if STEP_BY_NAME[name].uses_llm else 0.0

        return optimal_makespan(fn, parallel_limit)
    return optimal_makespan(latency, parallel_limit)


def simple_bound(latency: Latency, parallel_limit: int) -> float:
    """The textbook bound max(critical path, total LLM work / slots); the exact
    optimum can be larger because precedence forces idle slots."""
    work = sum(latency(s) for s in LLM_STEPS)
    return max(critical_path(latency), work / parallel_limit)


def optimal_makespan(latency: Latency, parallel_limit: int) -> float:
    """Exact optimum of P|prec|Cmax for this graph by exhaustive search.

    Code steps take no time and no slot, so only the 12 LLM steps are scheduled;
    a code step in between (only ``input``, at the start) is transparent. The
    search branches at every moment a slot frees on *every* subset of ready steps
    to start (idling included, as list scheduling alone can miss the optimum) and
    memoises on (finished set, running steps with their remaining time). With 12
    steps that is at most a few thousand states.
    """
    llm = tuple(s for s in LLM_STEPS)
    lat = {s: float(latency(s)) for s in llm}
    deps = {s: _llm_ancestors(s) for s in llm}
    limit = max(1, parallel_limit)

    @cache
    def best(done: frozenset[str], running: tuple[tuple[str, float], ...]) -> float:
        if len(done) == len(llm):
            return 0.0
        busy = {name for name, _ in running}
        ready = [s for s in llm if s not in done and s not in busy and deps[s] <= done]
        free = limit - len(running)
        options: list[float] = []
        sizes = range(min(free, len(ready)), -1, -1)
        for size in sizes:
            if size == 0 and not running:
                continue
            for chosen in itertools.combinations(ready, size):
                options.append(_advance(done, running, chosen))
        return min(options)

    def _advance(
        done: frozenset[str], running: tuple[tuple[str, float], ...], start: Iterable[str]
    ) -> float:
        now_running = [*running, *((s, lat[s]) for s in start)]
        step = min(rem for _, rem in now_running)
        finished = frozenset(n for n, rem in now_running if rem <= step + 1e-12)
        still = tuple(sorted((n, rem - step) for n, rem in now_running if n not in finished))
        return step + best(done | finished, still)

    return best(frozenset(), ())


def _llm_ancestors(name: str) -> frozenset[str]:
    """LLM steps that must finish before ``name`` starts (through code steps too)."""
    seen: set[str] = set()
    stack = list(STEP_BY_NAME[name].depends_on)
    while stack:
        dep = stack.pop()
        if dep in seen:
            continue
        seen.add(dep)
        stack.extend(STEP_BY_NAME[dep].depends_on)
    return frozenset(d for d in seen if STEP_BY_NAME[d].uses_llm)


def batch_makespan(latency: Latency, parallel_limit: int) -> float:
    """Makespan of the old batch scheduler: start up to ``parallel_limit`` ready
    steps in graph order (code steps take a slot too, as they did), then wait for
    the whole batch before looking again."""
    done: set[str] = set()
    total = 0.0
    while len(done) < TOTAL_STEPS:
        ready = [
            s.name for s in STEPS if s.name not in done and set(s.depends_on) <= done
        ][: max(1, parallel_limit)]
        total += max(latency(s) for s in ready)
        done.update(ready)
    return total


def step_latencies(values: Mapping[str, float], default: float) -> Latency:
    """A latency function for LLM steps from a table, code steps taking nothing."""

    def fn(name: str) -> float:
        if not STEP_BY_NAME[name].uses_llm:
            return 0.0
        return float(values.get(name, default))

    return fn
