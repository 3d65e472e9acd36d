"""Step 13, ``validate``: number checks across the nine sections (no LLM).

The checks are what an analyst does with a red pen: percentages outside 0-100,
negative money or counts, the same figure stated differently in two sections,
a market funnel where SOM exceeds SAM or SAM exceeds TAM, sections that should
carry figures but carry none, and percentages above 100 written into the text.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Mapping
from typing import Any

from pipeline.graph import SECTION_STEPS

NUMERIC_SECTIONS = ("market", "business_model", "financial_plan")
"""Sections that must state figures; the others may."""

PERCENT_KEY = re.compile(r"(_pct|_percent|_share|_rate)$")
NON_NEGATIVE_KEY = re.compile(r"(_eur|_months|_days|customers|competitors|founders|employees)")
TEXT_PERCENT = re.compile(r"(\d{1,3}(?:[.,]\d+)?)\s?(?:%|percent|Prozent)", re.IGNORECASE)
RELATIVE_TOLERANCE = 0.01
FUNNEL = ("tam_eur", "sam_eur", "som_eur")


def _issue(section: str, key: str, kind: str, severity: str, message: str) -> dict[str, str]:
    return {"section": section, "key": key, "kind": kind, "severity": severity, "message": message}


@functools.lru_cache(maxsize=1024)
def _key_rules(key: str) -> tuple[bool, bool]:
    """(is a percentage, must not be negative) for a figure's key: the same few keys
    come back in every job."""
    return bool(PERCENT_KEY.search(key)), bool(NON_NEGATIVE_KEY.search(key))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


def _differ(a: float, b: float) -> bool:
    scale = max(abs(a), abs(b), 1e-9)
    return abs(a - b) / scale > RELATIVE_TOLERANCE


def validate_sections(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``validation`` artifact for ``sections`` (step name -> section data)."""
    issues: list[dict[str, str]] = []
    figures = 0
    seen: dict[str, tuple[str, float]] = {}
    for name in SECTION_STEPS:
        section = sections.get(name)
        if section is None:
            issues.append(_issue(name, "", "missing_section", "error", "section is missing"))
            continue
        data = section.get("data") or {}
        numbers = {k: n for k, v in data.items() if (n := _number(v)) is not None}
        figures += len(numbers)
        if name in NUMERIC_SECTIONS and not numbers:
            issues.append(
                _issue(name, "data", "missing_numbers", "error", "section states no figures")
            )
        for key, value in numbers.items():
            percent, non_negative = _key_rules(key)
            if percent and not 0 <= value <= 100:
                issues.append(
                    _issue(name, key, "percentage_out_of_range", "error",
                           f"{key} = {value:g} is not a percentage between 0 and 100")
                )
            elif non_negative and value < 0:
                issues.append(
                    _issue(name, key, "negative_value", "error", f"{key} = {value:g} is negative")
                )
            if key in seen and _differ(seen[key][1], value):
                first, other = seen[key]
                issues.append(
                    _issue(name, key, "inconsistent_figure", "error",
                           f"{key} = {value:g} here but {other:g} in {first}")
                )
            seen.setdefault(key, (name, value))
        issues.extend(_funnel(name, numbers))
        issues.extend(_text_percentages(name, section))
    return {
        "passed": not any(i["severity"] == "error" for i in issues),
        "sections_checked": sum(1 for n in SECTION_STEPS if n in sections),
        "figures_checked": figures,
        "issues": issues,
    }


def _funnel(name: str, numbers: Mapping[str, float]) -> list[dict[str, str]]:
    present = [(k, numbers[k]) for k in FUNNEL if k in numbers]
    return [
        _issue(name, small, "funnel_order", "error", f"{small} ({low:g}) exceeds {big} ({high:g})")
        for (big, high), (small, low) in itertools.pairwise(present)
        if low > high
    ]


def _text_percentages(name: str, section: Mapping[str, Any]) -> list[dict[str, str]]:
    texts = [str(section.get("headline", "")), str(section.get("narrative", ""))]
    texts += [str(b) for b in section.get("bullets") or []]
    issues = []
    for text in texts:
        # Most texts state no percentage at all; the case-insensitive scan is the
        # dearest part of this step, so it runs only where one could match.
        folded = text.lower()
        if "%" not in text and "percent" not in folded and "prozent" not in folded:
            continue
        for match in TEXT_PERCENT.finditer(text):
            value = float(match.group(1).replace(",", "."))
            if value > 100:
                issues.append(
                    _issue(name, "text", "percentage_out_of_range", "warning",
                           f"text states {match.group(0)!r}, above 100%")
                )
    return issues
