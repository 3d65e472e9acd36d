"""Pydantic models of every artifact (SPEC §5) and the JSON schemas LLM steps answer to.

LLM-produced models forbid extra keys so the schema handed to providers carries
``additionalProperties: false``; code-produced artifacts are plain models.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.graph import SECTION_STEPS, STEP_BY_NAME

Number = int | float


class _LLMModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_LLMModel):
    title: str = Field(min_length=1)
    publisher: str
    year: int | None = Field(ge=1900, le=2100)
    region: str
    url: str
    method: str
    key_findings: list[str]
    usage_note: str
    access: str
    reliability_score: float = Field(ge=0, le=1)
    last_accessed: str


class Evidence(_LLMModel):
    region: str
    topics: list[str]
    sources: list[Source]


class Brief(_LLMModel):
    project_title: str = Field(min_length=1)
    brief: str = Field(min_length=1)
    facts: list[str]
    open_questions: list[str]
    assumptions: list[str]


class Section(_LLMModel):
    headline: str = Field(min_length=1)
    bullets: list[str]
    narrative: str
    data: dict[str, Number | str]
    """Figures of the section, e.g. ``{"tam_eur": 1.2e9, "cagr_pct": 14}``."""
    assumptions: list[str]
    open_questions: list[str]
    citations: list[str]
    evidence_coverage: float = Field(ge=0, le=1)


class InvestorScore(_LLMModel):
    score_total: float = Field(ge=0, le=100)
    verdict: Literal["GREEN", "YELLOW", "RED"]
    scores: dict[str, float]
    top_strengths: list[str]
    top_risks: list[str]
    priority_fixes: list[str]
    follow_up_questions: list[str]
    consistency_issues: list[str]


class Pitch(BaseModel):
    title: str
    pitch: str
    pitch_hash: str
    language: Literal["de", "en"]
    target: str
    geo: str


class ValidationIssue(BaseModel):
    section: str
    key: str
    kind: str
    """``percentage_out_of_range``, ``negative_value``, ``inconsistent_figure``,
    ``funnel_order``, ``missing_numbers``."""
    severity: Literal["error", "warning"]
    message: str


class Validation(BaseModel):
    passed: bool
    sections_checked: int
    figures_checked: int
    issues: list[ValidationIssue]


class Dossier(BaseModel):
    title: str
    language: str
    target: str
    geo: str
    pitch: str
    brief: dict[str, Any]
    evidence: dict[str, Any]
    sections: dict[str, dict[str, Any]]
    validation: dict[str, Any]
    investor_score: dict[str, Any]
    meta: dict[str, Any]


STEP_MODELS: dict[str, type[BaseModel]] = {
    "input": Pitch,
    "evidence": Evidence,
    "brief": Brief,
    **{name: Section for name in SECTION_STEPS},
    "validate": Validation,
    "investor_score": InvestorScore,
    "assemble": Dossier,
}


@cache
def _schema(step: str) -> dict[str, Any]:
    return STEP_MODELS[step].model_json_schema()


def json_schema(step: str) -> dict[str, Any]:
    """JSON schema of the step's artifact, for structured-output requests.

    One shared dict per step, built once: treat it as read-only. A provider that
    needs to adapt it must copy it first (a deep copy per call cost more CPU than
    the rest of an offline step)."""
    return _schema(step)


def schema_name(step: str) -> str:
    return f"{STEP_BY_NAME[step].artifact}_v1"


def _raise_json_error(raw: str) -> NoReturn:
    """The JSON error in ``raw`` as ``json`` words it (line and column), for the repair turn."""
    try:
        json.loads(raw)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InvalidOutput(f"not valid JSON: {exc.msg} at {where}") from exc
    raise InvalidOutput("not valid JSON")


class InvalidOutput(ValueError):
    """An LLM answer that is not JSON or does not match the step's schema."""


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_output(step: str, text: str) -> dict[str, Any]:
    """Parse and validate an LLM answer; a Markdown code fence around it is tolerated."""
    match = _FENCE.match(text)
    raw = match.group(1) if match else text.strip()
    try:
        # Parsed and validated in one pass by pydantic-core (json.loads and then
        # model_validate took three times as long on a section answer).
        model = STEP_MODELS[step].model_validate_json(raw)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            _raise_json_error(raw)
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:8]
        ]
        more = exc.error_count() - len(problems)
        suffix = f" (and {more} more)" if more > 0 else ""
        raise InvalidOutput("; ".join(problems) + suffix) from exc
    return model.model_dump(mode="json")
