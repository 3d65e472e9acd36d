"""Scheduling strategies: in which order, and how many at once, a job's LLM steps run.

A strategy drives a :class:`StepHost` (the delivery) until the job's final step is
done and returns its artifact. The host runs a step (``run_step``) and, after any
step's end, runs what that made ready and needs no slot (``start_free_steps``: code
steps and cache hits). The pipeline uses :class:`SlidingWindow`; ``bench/`` keeps
the old batch scheduler as another strategy to compare with.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable, Mapping
from typing import Protocol

from pipeline.commit_buffer import stop_tasks
from pipeline.graph import FINAL_STEP, STEP_BY_NAME, STEP_ORDER, Step
from pipeline.model import Artifact


class StepHost(Protocol):
    """What a strategy needs of a delivery."""

    job_id: str
    limit: int
    """``parallel_limit``: LLM calls of the job at once."""

    @property
    def priority(self) -> Mapping[str, float]:
        """Longest remaining chain per step, weighted by the durations seen so far."""
        ...

    @property
    def done(self) -> Mapping[str, Artifact]:
        """Finished steps -> artifact."""
        ...

    async def run_step(self, step: Step) -> Artifact: ...

    async def start_free_steps(self, seen: set[str]) -> list[Step]:
        """Mark newly ready steps ``seen``, run those that need no slot, and return
        the LLM steps that need one."""
        ...


class Scheduler(Protocol):
    async def __call__(self, host: StepHost) -> Artifact: ...


class SlidingWindow:
    """``parallel_limit`` slots, each running one LLM step after another, the ready
    step with the longest remaining chain first. Code steps and cache hits take no
    slot: whoever makes them ready runs them.

    A slot goes from a step's end to its next step's call without giving up the
    event loop (unless the cache must be asked). With many jobs per process the
    step ends arrive in bursts, and every turn given up puts a job behind the
    whole burst; one turn keeps the jobs' calls as spread out as they ended."""

    async def __call__(self, host: StepHost) -> Artifact:
        ready = ReadySteps(host.priority)
        seen: set[str] = set(host.done)
        ready.add(await host.start_free_steps(seen))
        if FINAL_STEP in host.done:
            return host.done[FINAL_STEP]
        slots = {
            asyncio.create_task(self._slot(host, seen, ready), name=f"job:{host.job_id}:slot")
            for _ in range(host.limit)
        }
        try:
            while FINAL_STEP not in host.done:
                if not slots:
                    raise RuntimeError("scheduler stalled: no step ready")
                finished, _ = await asyncio.wait(slots, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()
                slots.difference_update(finished)
            return host.done[FINAL_STEP]
        finally:
            await stop_tasks(*slots)

    @staticmethod
    async def _slot(host: StepHost, seen: set[str], ready: ReadySteps) -> None:
        """One LLM slot: run ready steps until the job's last step is done."""
        while FINAL_STEP not in host.done:
            step = ready.pop()
            if step is None:
                if not ready.running:
                    break  # nothing ready and nothing that could make a step ready
                await ready.more()
                continue
            ready.running += 1
            try:
                await host.run_step(step)
                ready.add(await host.start_free_steps(seen))
            finally:
                ready.running -= 1
        ready.wake_all()  # the job is done (or stalled): idle slots end too


class ReadySteps:
    """LLM steps waiting for a slot, highest priority first, and the idle slots."""

    def __init__(self, priority: Mapping[str, float]) -> None:
        self.priority = priority
        self.heap: list[tuple[float, int, str]] = []
        self.idle: list[asyncio.Future[None]] = []
        self.running = 0
        """Slots in a step (its call, or finding what its end made ready)."""

    def add(self, steps: Iterable[Step]) -> None:
        for step in steps:
            heapq.heappush(self.heap, (-self.priority[step.name], STEP_ORDER[step.name], step.name))
        for _ in range(min(len(self.heap), len(self.idle))):
            self._wake_one()

    def pop(self) -> Step | None:
        return STEP_BY_NAME[heapq.heappop(self.heap)[2]] if self.heap else None

    async def more(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self.idle:
                self.idle.remove(waiter)

    def _wake_one(self) -> None:
        waiter = self.idle.pop(0)
        if not waiter.done():
            waiter.set_result(None)

    def wake_all(self) -> None:
        while self.idle:
            self._wake_one()


SLIDING_WINDOW: Scheduler = SlidingWindow()

