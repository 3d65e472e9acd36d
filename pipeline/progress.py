"""A running job's step states and progress, and the ``status`` event they make.

``percentage`` is finished steps / 15 and, like ``currentStep``, never goes down:
steps run in parallel finish in any order, and a resumed delivery starts from what
the job showed before.
"""

from __future__ import annotations

import time

from pipeline.graph import STEP_BY_NAME, STEPS, TOTAL_STEPS, Step
from pipeline.model import JSON, Job
from pipeline.views import initial_progress, initial_steps, status_event
from pipeline.vocabulary import EventType, StepState


class JobProgress:
    """Steps and progress of one delivery's job, as its next commit stores them."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.steps: dict[str, str] = {**initial_steps(), **job.steps}
        self.progress: JSON = dict(job.progress) or initial_progress()
        self.running: dict[str, float] = {}
        """Steps in progress -> monotonic start time."""
        self.finished = 0
        self._status_of: Job | None = None
        self._status_base: JSON = {}
        self._all_pending = initial_steps()

    def resumed(self, done: set[str]) -> None:
        """Take in the steps whose checkpoint a resumed delivery found; the others
        start over as pending."""
        self.finished = len(done)
        for step in STEPS:
            if step.name not in done:
                self.steps[step.name] = StepState.PENDING
            elif self.steps[step.name] not in (StepState.COMPLETED, StepState.CACHED):
                self.steps[step.name] = StepState.COMPLETED

    def started(self, step: Step) -> None:
        self.steps[step.name] = StepState.RUNNING
        self.running[step.name] = time.monotonic()
        self.progress = self._next(step)

    def finished_step(self, step: Step, *, cached: bool) -> None:
        self.finished += 1
        self.running.pop(step.name, None)
        self.steps[step.name] = StepState.CACHED if cached else StepState.COMPLETED
        self.progress = self._next(step if cached else None)

    def active_step(self) -> str | None:
        """The step running longest, which an error names when the job is cut off."""
        if not self.running:
            return None
        return min(self.running, key=lambda name: self.running[name])

    def aborted(self, state: StepState) -> None:
        """Mark steps still running as ``state`` (the job ended under them)."""
        for name, current in self.steps.items():
            if current == StepState.RUNNING:
                self.steps[name] = state

    def fields(self) -> JSON:
        """The job fields a commit stores: steps and progress as they are now."""
        return {"steps": dict(self.steps), "progress": dict(self.progress)}

    def status(self) -> tuple[str, JSON]:
        """A ``status`` event of the job as it is now. Only steps and progress change
        during a run: the rest of the view is built once per ``self.job``."""
        if self._status_of is not self.job:
            self._status_of = self.job
            self._status_base = status_event(self.job)
        view = dict(self._status_base)
        view["progress"] = dict(self.progress)
        view["steps"] = {**self._all_pending, **self.steps}
        return EventType.STATUS, view

    def _next(self, started: Step | None) -> JSON:
        previous = self.progress
        if self.running:
            display = STEP_BY_NAME[max(self.running, key=lambda n: self.running[n])].display
        elif started is not None:
            display = started.display
        else:
            display = str(previous.get("step", STEPS[0].display))
        percentage = round(self.finished * 100 / TOTAL_STEPS)
        current = min(self.finished + 1, TOTAL_STEPS)
        return {
            "step": display,
            "percentage": max(percentage, int(previous.get("percentage", 0))),
            "currentStep": max(current, int(previous.get("currentStep", 1))),
            "totalSteps": TOTAL_STEPS,
        }
