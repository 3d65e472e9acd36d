"""Expected duration of each LLM step, learned from the calls this process made.

The scheduler ranks ready steps by the longest remaining chain of work. Counting
every LLM step as one unit is right when steps take equally long; real steps do
not (an evidence search writes far more than a team section), and a chain
weighted by observed durations picks the step that really gates the job.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.graph import STEP_BY_NAME, Latency

ALPHA = 0.3
"""Weight of the newest observation in the moving average."""


class LatencyModel:
    """Exponentially weighted mean duration per (step, model), in seconds."""

    def __init__(self) -> None:
        self._mean: dict[tuple[str, str], float] = {}

    def observe(self, step: str, model: str, seconds: float) -> None:
        key = (step, model)
        previous = self._mean.get(key)
        self._mean[key] = seconds if previous is None else previous + ALPHA * (seconds - previous)

    def estimate(self, step: str, model: str) -> float | None:
        return self._mean.get((step, model))

    def weights(self, routes: Iterable[tuple[str, str]]) -> Latency:
        """A latency function over the graph for the given (step, model) routes: the
        learned mean where there is one, the mean of the known ones elsewhere
        (1.0 when nothing is known yet, i.e. plain step counting); code steps 0."""
        routes = list(routes)
        known = {s: m for s, model in routes if (m := self.estimate(s, model)) is not None}
        fallback = sum(known.values()) / len(known) if known else 1.0
        table = {s: known.get(s, fallback) for s, _ in routes}

        def latency(name: str) -> float:
            if not STEP_BY_NAME[name].uses_llm:
                return 0.0
            return table.get(name, fallback)

        return latency
