"""POST /api/jobs body rules (SPEC §4)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.request import RequestInvalid, validate_request

VALID = {"project_title": "Acme", "elevator_pitch": "We fold laundry."}


def fields_of(body: object) -> list[str]:
    with pytest.raises(RequestInvalid) as info:
        validate_request(body)
    return [d["field"] for d in info.value.details]


def test_defaults_apply_and_unknown_fields_are_ignored() -> None:
    """A minimal body gets every SPEC default; unknown fields do not matter."""
    request = validate_request({**VALID, "colour": "blue"})
    assert request.to_dict() == {
        "project_title": "Acme",
        "elevator_pitch": "We fold laundry.",
        "language": "de",
        "target": "Pre-Seed/Seed VCs",
        "geo": "EU/DACH",
        "skip_cache": False,
        "parallel_limit": 2,
        "timeout_ms": 300_000,
    }


def test_pitch_alias_and_trimming() -> None:
    """`pitch` is accepted for elevator_pitch and strings are trimmed."""
    request = validate_request({"project_title": "  Acme  ", "pitch": "  text  ", "language": "en"})
    assert (request.project_title, request.elevator_pitch, request.language) == ("Acme", "text", "en")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"elevator_pitch": "x"}, "project_title"),
        ({**VALID, "project_title": "   "}, "project_title"),
        ({**VALID, "project_title": "x" * 201}, "project_title"),
        ({**VALID, "project_title": 5}, "project_title"),
        ({"project_title": "Acme"}, "elevator_pitch"),
        ({**VALID, "elevator_pitch": "x" * 10_001}, "elevator_pitch"),
        ({**VALID, "language": "fr"}, "language"),
        ({**VALID, "target": "x" * 201}, "target"),
        ({**VALID, "geo": "x" * 101}, "geo"),
        ({**VALID, "skip_cache": "yes"}, "skip_cache"),
        ({**VALID, "parallel_limit": 0}, "parallel_limit"),
        ({**VALID, "parallel_limit": 17}, "parallel_limit"),
        ({**VALID, "parallel_limit": 2.0}, "parallel_limit"),
        ({**VALID, "parallel_limit": True}, "parallel_limit"),
        ({**VALID, "timeout_ms": 999}, "timeout_ms"),
        ({**VALID, "timeout_ms": 3_600_001}, "timeout_ms"),
        ({**VALID, "timeout_ms": "1000"}, "timeout_ms"),
    ],
)
def test_each_rule_names_its_field(body: dict[str, Any], field: str) -> None:
    """Every broken rule is reported against its own field."""
    assert fields_of(body) == [field]


def test_all_violations_are_reported_together() -> None:
    """A body breaking several rules lists every one of them."""
    body = {"project_title": "", "language": "xx", "parallel_limit": 99, "timeout_ms": False}
    assert fields_of(body) == [
        "project_title",
        "elevator_pitch",
        "language",
        "parallel_limit",
        "timeout_ms",
    ]


@pytest.mark.parametrize("body", [None, [], "text", 3, [VALID]])
def test_non_object_body_is_rejected(body: object) -> None:
    """Only a JSON object is a job request."""
    assert fields_of(body) == ["body"]


@given(
    title=st.text(min_size=1, max_size=200).filter(lambda s: s.strip() == s and s != ""),
    pitch=st.text(min_size=1, max_size=300).filter(lambda s: s.strip() != ""),
    limit=st.integers(1, 16),
    timeout=st.integers(1_000, 3_600_000),
    language=st.sampled_from(["de", "en"]),
)
def test_any_body_within_the_rules_is_accepted_unchanged(
    title: str, pitch: str, limit: int, timeout: int, language: str
) -> None:
    """Every value inside the documented ranges is accepted and kept as given."""
    request = validate_request(
        {
            "project_title": title,
            "elevator_pitch": pitch,
            "parallel_limit": limit,
            "timeout_ms": timeout,
            "language": language,
        }
    )
    assert request.project_title == title
    assert request.elevator_pitch == pitch.strip()
    assert (request.parallel_limit, request.timeout_ms, request.language) == (limit, timeout, language)
    assert validate_request(request.to_dict()) == request


@given(
    value=st.one_of(
        st.integers().filter(lambda n: not 1 <= n <= 16),
        st.booleans(),
        st.floats(),
        st.text(),
        st.none().map(lambda _: [1]),
    )
)
def test_any_parallel_limit_outside_1_to_16_or_not_an_int_is_rejected(value: object) -> None:
    """parallel_limit accepts exactly the ints 1..16 (a bool is not an int)."""
    assert fields_of({**VALID, "parallel_limit": value}) == ["parallel_limit"]


@given(title=st.text(min_size=201, max_size=400).filter(lambda s: len(s.strip()) > 200))
def test_titles_longer_than_200_after_trim_are_rejected(title: str) -> None:
    """The 200-character limit counts the trimmed title."""
    assert fields_of({**VALID, "project_title": title}) == ["project_title"]
