"""The makespan maths the scheduling benchmark compares against (``bench/makespan_bounds.py``)."""

from __future__ import annotations

from bench.makespan_bounds import batch_makespan, lower_bound, simple_bound, step_latencies
from pipeline.graph import LLM_STEPS


def test_lower_bound_is_exact_for_unit_steps() -> None:
    """With equal LLM latency the optimum is 12, 7, 5, 5 calls' time at 1, 2, 4, 16 slots."""
    assert [lower_bound(1.0, k) for k in (1, 2, 3, 4, 16)] == [12, 7, 5, 5, 5]
    assert simple_bound(lambda s: 1.0 if s in LLM_STEPS else 0.0, 2) == 6


def test_lower_bound_never_exceeds_any_schedule() -> None:
    """On uneven latencies the optimum sits between the simple bound and the batch schedule."""
    latency = step_latencies({"market": 2.0, "team": 0.5, "evidence": 1.5}, 1.0)
    for k in (1, 2, 3, 4, 16):
        best = lower_bound(latency, k)
        assert simple_bound(latency, k) <= best + 1e-9 <= batch_makespan(latency, k) + 1e-9
