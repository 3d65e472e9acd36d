"""The 15 pipeline steps as data (SPEC §5), and what the graph implies for scheduling.

Everything that orders work derives from :data:`STEPS`: the scheduler's
critical-path priority and the progress display names (and, in ``bench/``, the
makespan bound the scheduling benchmark compares against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
