"""One step's execution: the cache, the LLM call (rate limiter, call, validation,
repair and trace live in :mod:`pipeline.llm_call`), or the code of a code step.

It makes artifacts and nothing else: recording them, and the job's state, is the
delivery's (:mod:`pipeline.job_run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.budget import JobBudget
from pipeline.deltas import StepDeltas
from pipeline.deps import Deps
from pipeline.graph import LLM_STEPS, SECTION_STEPS, Step
from pipeline.hashing import cache_key, make_artifact, verify_artifact
from pipeline.llm_call import StepCall, call_llm_step
from pipeline.model import JSON, Artifact, LLMError
from pipeline.prompts import prompt_version
from pipeline.request import JobRequest
from pipeline.steps import assemble_dossier, build_pitch
from pipeline.validation import validate_sections
from pipeline.vocabulary import ErrorCode


class StepFailed(Exception):
    """A step could not produce its artifact; the job fails with this error."""

    def __init__(self, code: str, message: str, step: str | None) -> None:
        super().__init__(message)
        self.error: JSON = {"code": code, "message": message, "step": step}


class StepExecutor:
    """Runs the steps of one job. ``done`` is the delivery's map of finished steps to
    their artifacts (read, never written here); ``trace`` takes every call's record."""

    def __init__(
        self,
        job_id: str,
        request: JobRequest,
        deps: Deps,
        done: Mapping[str, Artifact],
        deadline: float,
        trace: Callable[[JSON], None],
        budget: JobBudget | None = None,
    ) -> None:
        self.job_id = job_id
        self.request = request
        self.deps = deps
        self.done = done
        self.deadline = deadline
        self.trace = trace
        self.budget = budget
        """The job's cost caps; ``None``: uncapped."""
        self.fresh: set[str] = set()
        """LLM steps whose artifact a call of this delivery made (not the cache)."""
        self._cache_keys: dict[str, str] = {}

    def inputs(self, step: Step) -> dict[str, Any]:
        """Artifact name -> data of exactly the steps ``step`` depends on."""
        return {self.done[d].name: self.done[d].data for d in step.depends_on}

    def cache_key(self, step: Step) -> str:
        key = self._cache_keys.get(step.name)
        if key is None:
            language = self.request.language
            key = self._cache_keys[step.name] = cache_key(
                step.name,
                prompt_version(step.name, language),
                self.deps.config.model_for(step.name),
                language,
                {self.done[d].name: self.done[d].hash for d in step.depends_on},
            )
        return key

    async def call(self, step: Step) -> Artifact:
        """The artifact of an LLM step, from a call; :class:`StepFailed` if none. The
        answer streams into ``delta`` events while it is written (``config.live_deltas``)."""
        deltas = StepDeltas(self.deps.store, self.job_id, step.name) if self.deps.config.live_deltas else None
        call = StepCall(
            self.job_id,
            step.name,
            self.request.language,
            self.inputs(step),
            self.deadline,
            {self.done[d].name: self.done[d].hash for d in step.depends_on},
            deltas=deltas,
            trace=self.trace,
            budget=self.budget,
        )
        started = time.monotonic()
        try:
            data = await call_llm_step(self.deps, call)
        except LLMError as exc:
            raise StepFailed(exc.code, exc.message, step.name) from exc
        finally:
            if deltas is not None:
                await deltas.close()
        model = self.deps.config.model_for(step.name)
        self.deps.latency.observe(step.name, model, time.monotonic() - started)
        self.fresh.add(step.name)
        return make_artifact(step.artifact, step.artifact_type, data)

    def compute(self, step: Step) -> Artifact:
        """The artifact of a code step (no LLM); :class:`StepFailed` if it raised."""
        try:
            data = self._compute(step)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            raise StepFailed(ErrorCode.INTERNAL_ERROR, message, step.name) from exc
        return make_artifact(step.artifact, step.artifact_type, data)

    async def cached(self, steps: list[Step]) -> list[Artifact | None]:
        """Cached artifacts of ``steps`` (``None`` where there is no valid one).

        A step with an input that an LLM call of this delivery just wrote is not
        looked up: its key holds the hash of that new answer, which an earlier job
        can only have stored if a different prompt drew the very same answer. Not
        asking saves a store round trip between a step's end and its dependents'
        calls, which under load is what a job waits for most."""
        asked = [s for s in steps if not self.fresh.intersection(s.depends_on)]
        if self.request.skip_cache or not asked:
            return [None] * len(steps)
        keys = [self.cache_key(s) for s in asked]
        found = dict(zip(asked, await self.deps.store.cache_get_many(keys), strict=True))
        return [
            make_artifact(step.artifact, step.artifact_type, hit.data)
            if (hit := found.get(step)) is not None
            and hit.name == step.artifact
            and verify_artifact(hit)
            else None
            for step in steps
        ]

    def _compute(self, step: Step) -> Any:
        if step.name == "input":
            return build_pitch(self.request)
        if step.name == "validate":
            return validate_sections({n: self.done[n].data for n in SECTION_STEPS})
        if step.name == "assemble":
            return assemble_dossier(
                {a.name: a.data for a in self.done.values()},
                provider=self.deps.llm.name,
                models={s: self.deps.config.model_for(s) for s in LLM_STEPS},
            )
        raise ValueError(f"no code for step {step.name}")
