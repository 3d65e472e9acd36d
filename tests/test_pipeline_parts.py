"""The pure parts: graph, hashing, schemas, prompts, offline answers, number checks, views."""

from __future__ import annotations

import json
import math
import re
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.graph import (
    LLM_STEPS,
    PRIORITY,
    SECTION_STEPS,
    STEP_BY_NAME,
    STEPS,
    input_artifacts,
)
from pipeline.hashing import cache_key, canonical_json, content_hash, make_artifact, sha256_hex
from pipeline.model import Job
from pipeline.offline import OfflineProvider
from pipeline.prompts import prompt_version, render, template
from pipeline.request import validate_request
from pipeline.schemas import STEP_MODELS, InvalidOutput, json_schema, parse_output
from pipeline.steps import build_pitch, normalise_pitch
from pipeline.validation import validate_sections
from pipeline.views import status_event, status_view

PITCH = build_pitch(
    validate_request(
        {"project_title": "Acme", "elevator_pitch": "Robots fold hotel laundry. 12 pilots."}
    )
)


# -- graph ---------------------------------------------------------------


def test_graph_matches_the_spec_table() -> None:
    """15 steps in dependency order, with the SPEC's artifacts, types and LLM flags."""
    assert len(STEPS) == 15 and len(LLM_STEPS) == 12
    names = [s.name for s in STEPS]
    for index, step in enumerate(STEPS):
        assert all(names.index(d) < index for d in step.depends_on)
    assert STEP_BY_NAME["gtm"].depends_on == ("brief", "evidence", "market", "business_model")
    assert STEP_BY_NAME["investor_score"].depends_on == ("brief", *SECTION_STEPS)
    assert set(STEP_BY_NAME["assemble"].depends_on) == set(names) - {"assemble"}
    assert {s.artifact_type for s in STEPS} == {
        "input", "evidence", "brief", "section", "validation", "score", "final"
    }
    assert STEP_BY_NAME["market"].display == "section_market"
    assert input_artifacts(STEP_BY_NAME["competition"]) == ("brief", "sources", "section_market")


def test_priority_is_the_longest_remaining_chain() -> None:
    """market outranks the other sections, business_model outranks its siblings."""
    assert PRIORITY["market"] > PRIORITY["business_model"] > PRIORITY["problem"]
    assert PRIORITY["evidence"] == PRIORITY["brief"] == max(PRIORITY.values()) == 5


# -- hashing and schemas ---------------------------------------------------


@given(st.dictionaries(st.text(), st.one_of(st.integers(), st.text(), st.booleans())))
def test_artifact_hash_and_size_are_of_canonical_json(data: dict[str, Any]) -> None:
    """hash = sha256 of canonical JSON and size = its byte length, independent of key order."""
    artifact = make_artifact("brief", "brief", data)
    reordered = dict(reversed(list(data.items())))
    assert artifact.hash == content_hash(reordered)
    assert artifact.size == len(canonical_json(data))


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


@settings(max_examples=400)
@given(_JSON_VALUES)
def test_canonical_json_is_python_sorted_compact_json(value: Any) -> None:
    """Canonical JSON is byte for byte json.dumps(sort_keys, compact, UTF-8), NaN as null."""
    expected = json.dumps(
        _finite_or_none(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert canonical_json(value) == expected


def test_cache_key_changes_with_each_ingredient() -> None:
    """Step, prompt version, model, language and input hashes each change the key."""
    base = ("market", "1:a", "m", "en", {"brief": "h1"})
    variants = [
        ("problem", "1:a", "m", "en", {"brief": "h1"}),
        ("market", "1:b", "m", "en", {"brief": "h1"}),
        ("market", "1:a", "n", "en", {"brief": "h1"}),
        ("market", "1:a", "m", "de", {"brief": "h1"}),
        ("market", "1:a", "m", "en", {"brief": "h2"}),
    ]
    keys = {cache_key(*base), *(cache_key(*v) for v in variants)}
    assert len(keys) == 6


def test_schemas_have_the_spec_shapes() -> None:
    """Source, section and score carry exactly the SPEC's fields."""
    source = json_schema("evidence")["$defs"]["Source"]["properties"]
    assert set(source) == {
        "title", "publisher", "year", "region", "url", "method", "key_findings",
        "usage_note", "access", "reliability_score", "last_accessed",
    }
    assert set(json_schema("market")["properties"]) == {
        "headline", "bullets", "narrative", "data", "assumptions", "open_questions",
        "citations", "evidence_coverage",
    }
    score = json_schema("investor_score")
    assert set(score["properties"]) == {
        "score_total", "verdict", "scores", "top_strengths", "top_risks", "priority_fixes",
        "follow_up_questions", "consistency_issues",
    }
    assert score["properties"]["verdict"]["enum"] == ["GREEN", "YELLOW", "RED"]


def test_parse_output_rejects_what_the_schema_forbids() -> None:
    """Non-JSON, missing fields, extra fields and out-of-range values are InvalidOutput."""
    good = OfflineProvider().answer("investor_score", "en", {"brief": {"project_title": "A"}})
    assert parse_output("investor_score", canonical_json(good).decode()) == good
    for bad in ("{", "[]", '{"verdict": "GREEN"}'):
        with pytest.raises(InvalidOutput):
            parse_output("investor_score", bad)
    for change in ({"verdict": "BLUE"}, {"score_total": 101}, {"extra": 1}):
        with pytest.raises(InvalidOutput):
            parse_output("investor_score", canonical_json({**good, **change}).decode())


# -- prompts -------------------------------------------------------------


def offline_inputs(step: str) -> dict[str, Any]:
    """Input artifacts of ``step``, produced by the offline provider up the graph."""
    offline = OfflineProvider()
    data: dict[str, Any] = {"pitch": PITCH}
    for s in STEPS:
        if s.name in ("input", step):
            if s.name == step:
                break
            continue
        if s.uses_llm:
            context = {a: data[a] for a in input_artifacts(s)}
            data[s.artifact] = offline.answer(s.name, "en", context)
        elif s.name == "validate":
            data["validation"] = validate_sections({n: data[f"section_{n}"] for n in SECTION_STEPS})
    return {a: data[a] for a in input_artifacts(STEP_BY_NAME[step])}


@pytest.mark.parametrize("language", ["de", "en"])
@pytest.mark.parametrize("step", LLM_STEPS)
def test_every_prompt_renders_from_its_inputs_only(step: str, language: str) -> None:
    """Each template exists in both languages and uses only placeholders its inputs fill."""
    system, user = template(step, language)
    assert system and user
    placeholders = {
        m.group("named") or m.group("braced")
        for m in string.Template.pattern.finditer(user)
        if m.group("named") or m.group("braced")
    }
    assert placeholders, "a prompt that ignores its inputs"
    inputs = offline_inputs(step)
    _, prompt = render(step, language, inputs, json_schema(step))
    for name, data in inputs.items():
        if name == "pitch":
            assert data["title"] in prompt and data["pitch"] in prompt
        else:
            marker = data.get("headline") or data.get("brief") or data["sources"][0]["title"]
            assert json.dumps(marker, ensure_ascii=False) in prompt, name
    assert '"properties"' in prompt
    with pytest.raises(KeyError):
        render(step, language, {}, json_schema(step))
    assert re.fullmatch(r"\d+:[0-9a-f]{16}", prompt_version(step, language))


# -- offline provider ------------------------------------------------------


@pytest.mark.parametrize("step", LLM_STEPS)
def test_offline_answers_are_schema_valid_and_deterministic(step: str) -> None:
    """Every offline answer validates against its step's model and repeats for the same input."""
    inputs = offline_inputs(step)
    first = OfflineProvider().answer(step, "en", inputs)
    STEP_MODELS[step].model_validate(first)
    assert OfflineProvider().answer(step, "en", inputs) == first
    assert OfflineProvider().answer(step, "de", inputs) != first


def test_offline_answer_depends_on_the_pitch() -> None:
    """A different pitch gives different offline content."""
    other = build_pitch(validate_request({"project_title": "Zed", "elevator_pitch": "Drones map vineyards."}))
    a = OfflineProvider().answer("brief", "en", {"pitch": PITCH})
    b = OfflineProvider().answer("brief", "en", {"pitch": other})
    assert a != b and b["project_title"] == "Zed"


def test_pitch_is_normalised() -> None:
    """Whitespace runs, CRLF and surplus blank lines are normalised; the hash follows the text."""
    assert normalise_pitch("  a \t b\r\n\r\n\r\n\r\nc  ") == "a b\n\nc"
    assert PITCH["pitch_hash"] == sha256_hex(PITCH["pitch"])


# -- number validation -------------------------------------------------------


def sections(**data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base = {"headline": "h", "bullets": [], "narrative": "", "assumptions": [],
            "open_questions": [], "citations": [], "evidence_coverage": 0.5}
    figures = {"market": {"tam_eur": 100, "sam_eur": 50, "som_eur": 5},
               "business_model": {"som_eur": 5}, "financial_plan": {"revenue_y1_eur": 1}}
    return {n: {**base, "data": data.get(n, figures.get(n, {}))} for n in SECTION_STEPS}


def kinds(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(i["section"], i["key"], i["kind"]) for i in result["issues"]]


def test_consistent_sections_pass() -> None:
    """Sections with sane, matching figures pass with no issues."""
    result = validate_sections(sections())
    assert result["passed"] and result["issues"] == [] and result["sections_checked"] == 9


def test_number_checks_find_each_kind_of_problem() -> None:
    """Out-of-range percentages, negatives, contradictions, funnel order and missing figures are found."""
    result = validate_sections(
        sections(
            market={"tam_eur": 100, "sam_eur": 500, "som_eur": 5, "cagr_pct": 140},
            business_model={"som_eur": 9, "cac_eur": -3},
            financial_plan={"note": "tbd"},
        )
    )
    assert not result["passed"]
    assert set(kinds(result)) == {
        ("market", "cagr_pct", "percentage_out_of_range"),
        ("market", "sam_eur", "funnel_order"),
        ("business_model", "som_eur", "inconsistent_figure"),
        ("business_model", "cac_eur", "negative_value"),
        ("financial_plan", "data", "missing_numbers"),
    }


def test_percentages_above_100_in_text_are_flagged() -> None:
    """A narrative claiming 250 % growth yields a warning, not an error."""
    data = sections()
    data["solution"]["narrative"] = "Customers grow 250 % a year."
    result = validate_sections(data)
    assert kinds(result) == [("solution", "text", "percentage_out_of_range")]
    assert result["passed"]


@pytest.mark.parametrize("claim", ["grows 180 PERCENT", "wächst um 180 Prozent", "180% more"])
def test_percentages_above_100_are_found_in_every_spelling(claim: str) -> None:
    """A percentage above 100 is flagged whether written as %, percent or Prozent, in any case."""
    data = sections()
    data["team"]["bullets"] = ["Fine.", f"Revenue {claim} a year."]
    assert kinds(validate_sections(data)) == [("team", "text", "percentage_out_of_range")]


# -- views -----------------------------------------------------------------


def test_status_view_has_the_spec_shape() -> None:
    """camelCase keys, ISO times, artifacts map, result only when completed, error only when failed."""
    job = Job(id="j", tenant="t", request={}, created_at=1704672000.0, status="completed",
              result={"success": True, "data": {}, "meta": {}}, error={"code": "x"})
    artifact = make_artifact("pitch", "input", PITCH)
    view = status_view(job, [artifact])
    assert list(view) == ["jobId", "status", "progress", "steps", "createdAt", "startedAt",
                          "completedAt", "attempts", "error", "artifacts", "result"]
    assert view["createdAt"] == "2024-01-08T00:00:00.000Z" and view["startedAt"] is None
    assert view["error"] is None
    assert view["artifacts"] == {"pitch": {"type": "input", "hash": artifact.hash,
                                           "timestamp": artifact.timestamp, "size": artifact.size}}
    assert len(view["steps"]) == 15 and set(view["steps"].values()) == {"pending"}
    failed = Job(id="j", tenant="t", request={}, status="failed", error={"code": "timeout"})
    assert status_view(failed)["error"] == {"code": "timeout"}
    assert "result" not in status_view(failed) and "artifacts" not in status_event(job)
    assert "result" not in status_event(job)
