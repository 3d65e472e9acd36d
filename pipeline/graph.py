"""The 15 pipeline steps as data (SPEC §5), and what the graph implies for scheduling.

Everything that orders or bounds work derives from :data:`STEPS`: the runner's
critical-path priority, the progress display names, and the makespan lower bound
the benchmark compares against.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache

SECTION_STEPS: tuple[str, ...] = (
    "problem",
    "solution",
    "team",
    "market",
    "status_quo",
    "business_model",
    "competition",
    "gtm",
    "financial_plan",
)


@dataclass(frozen=True)
class Step:
    name: str
    display: str
    """Name shown in ``progress.step`` while the step runs."""
    depends_on: tuple[str, ...]
    uses_llm: bool
    artifact: str
    artifact_type: str


def _section(name: str, extra: tuple[str, ...] = ()) -> Step:
    return Step(
        name=name,
        display=f"section_{name}",
        depends_on=("brief", "evidence", *extra),
        uses_llm=True,
        artifact=f"section_{name}",
        artifact_type="section",
    )


STEPS: tuple[Step, ...] = (
    Step("input", "input_processing", (), False, "pitch", "input"),
    Step("evidence", "evidence_harvesting", ("input",), True, "sources", "evidence"),
    Step("brief", "brief_extraction", ("input",), True, "brief", "brief"),
    _section("problem"),
    _section("solution"),
    _section("team"),
    _section("market"),
    _section("status_quo"),
    _section("business_model", ("market",)),
    _section("competition", ("market",)),
    _section("gtm", ("market", "business_model")),
    _section("financial_plan", ("market", "business_model")),
    Step("validate", "number_validation", SECTION_STEPS, False, "validation", "validation"),
    Step(
        "investor_score",
        "investor_scoring",
        ("brief", *SECTION_STEPS),
        True,
        "investor_score",
        "score",
    ),
    Step(
        "assemble",
        "final_assembly",
        (
            "input",
            "evidence",
            "brief",
            *SECTION_STEPS,
            "validate",
            "investor_score",
        ),
        False,
        "dossier",
        "final",
    ),
)

STEP_BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
STEP_NAMES: tuple[str, ...] = tuple(STEP_BY_NAME)
STEP_ORDER: dict[str, int] = {name: i for i, name in enumerate(STEP_NAMES)}
LLM_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS if s.uses_llm)
TOTAL_STEPS = len(STEPS)
FINAL_STEP = "assemble"


CHILDREN: dict[str, tuple[str, ...]] = {
    step.name: tuple(s.name for s in STEPS if step.name in s.depends_on) for step in STEPS
}
"""Steps that depend directly on each step."""
DEPENDS_ON: dict[str, frozenset[str]] = {step.name: frozenset(step.depends_on) for step in STEPS}
"""Each step's inputs as a set (the scheduler compares it with the finished steps)."""


def input_artifacts(step: Step) -> tuple[str, ...]:
    """Artifact names a step reads: exactly those of the steps it depends on."""
    return tuple(STEP_BY_NAME[d].artifact for d in step.depends_on)


Latency = Callable[[str], float]


def unit_llm_latency(name: str) -> float:
    """LLM steps cost one unit, code steps nothing: the shape of real runs."""
    return 1.0 if STEP_BY_NAME[name].uses_llm else 0.0


def remaining_chain(latency: Latency = unit_llm_latency) -> dict[str, float]:
    """Longest chain of work from the start of each step to the end of the job,
    the step itself included. Higher means more urgent (critical-path priority)."""
    result: dict[str, float] = {}
    for step in reversed(STEPS):  # STEPS is topologically ordered
        tail = max([result[c] for c in CHILDREN[step.name]], default=0.0)
        result[step.name] = latency(step.name) + tail
    return result


PRIORITY: dict[str, float] = remaining_chain()


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
