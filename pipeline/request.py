"""The POST /api/jobs body (SPEC §4): every rule checked, every violation reported."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_LANGUAGE = "de"
DEFAULT_TARGET = "Pre-Seed/Seed VCs"
DEFAULT_GEO = "EU/DACH"
DEFAULT_PARALLEL_LIMIT = 2
DEFAULT_TIMEOUT_MS = 300_000
MAX_COST_USD_RANGE = (0.0, 1_000_000.0)
"""``max_cost_usd`` must be above the first bound and at most the second."""


_SURROGATE = re.compile("[\ud800-\udfff]")
"""What ``\\ud800``-style JSON escapes that pair with nothing decode to: no UTF-8 exists for it."""


class RequestInvalid(Exception):
    """The body broke one or more rules; ``details`` lists ``{field, message}``."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details))
        self.details = details


@dataclass(frozen=True)
class JobRequest:
    project_title: str
    elevator_pitch: str
    language: str = DEFAULT_LANGUAGE
    target: str = DEFAULT_TARGET
    geo: str = DEFAULT_GEO
    skip_cache: bool = False
    parallel_limit: int = DEFAULT_PARALLEL_LIMIT
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_cost_usd: float | None = None
    """The job's cost cap in USD at ``LLM_PRICES`` (SPEC 7.4); ``None``: no cap of its own."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as stored with the job; ``max_cost_usd`` only when set."""
        data = asdict(self)
        if self.max_cost_usd is None:
            del data["max_cost_usd"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRequest:
        """Read back a stored, already validated request."""
        return validate_request(data)


class _Checker:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.details: list[dict[str, str]] = []

    def error(self, field: str, message: str) -> None:
        self.details.append({"field": field, "message": message})

    def text(
        self, field: str, value: Any, *, max_len: int, default: str | None = None
    ) -> str:
        """A trimmed string of 1..max_len chars; ``default`` for missing/null/blank
        optional fields."""
        if value is None:
            if default is None:
                self.error(field, "is required")
            return default or ""
        if not isinstance(value, str):
            self.error(field, "must be a string")
            return ""
        if not value.isascii() and _SURROGATE.search(value):
            self.error(field, "must be text: it holds a lone UTF-16 surrogate escape")
            return ""
        trimmed = value.strip()
        if not trimmed:
            if default is None:
                self.error(field, "must not be empty")
            return default or ""
        if len(trimmed) > max_len:
            self.error(field, f"must be at most {max_len} characters (got {len(trimmed)})")
        return trimmed

    def integer(self, field: str, low: int, high: int, default: int) -> int:
        value = self.body.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(field, "must be an integer")
            return default
        if not low <= value <= high:
            self.error(field, f"must be between {low} and {high}")
        return value

    def cost(self, field: str) -> float | None:
        """An optional positive, finite number of USD (``None`` when missing or null)."""
        value = self.body.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(field, "must be a number (USD)")
            return None
        low, high = MAX_COST_USD_RANGE
        if not math.isfinite(value) or not low < value <= high:
            self.error(field, f"must be greater than {low:g} and at most {high:,.0f} (USD)")
            return None
        return float(value)


def validate_request(body: object) -> JobRequest:
    """Check a decoded JSON body; unknown fields are ignored."""
    if not isinstance(body, dict):
        raise RequestInvalid([{"field": "body", "message": "must be a JSON object"}])
    check = _Checker(body)
    title = check.text("project_title", body.get("project_title"), max_len=200)
    pitch_field = "elevator_pitch" if body.get("elevator_pitch") is not None else "pitch"
    pitch = check.text("elevator_pitch", body.get(pitch_field), max_len=10_000)
    language = body.get("language")
    if language is None:
        language = DEFAULT_LANGUAGE
    elif language not in ("de", "en"):
        check.error("language", "must be 'de' or 'en'")
        language = DEFAULT_LANGUAGE
    target = check.text("target", body.get("target"), max_len=200, default=DEFAULT_TARGET)
    geo = check.text("geo", body.get("geo"), max_len=100, default=DEFAULT_GEO)
    skip_cache = body.get("skip_cache")
    if skip_cache is None:
        skip_cache = False
    elif not isinstance(skip_cache, bool):
        check.error("skip_cache", "must be a boolean")
        skip_cache = False
    parallel_limit = check.integer("parallel_limit", 1, 16, DEFAULT_PARALLEL_LIMIT)
    timeout_ms = check.integer("timeout_ms", 1_000, 3_600_000, DEFAULT_TIMEOUT_MS)
    max_cost_usd = check.cost("max_cost_usd")
    if check.details:
        raise RequestInvalid(check.details)
    return JobRequest(
        project_title=title,
        elevator_pitch=pitch,
        language=str(language),
        target=target,
        geo=geo,
        skip_cache=skip_cache,
        parallel_limit=parallel_limit,
        timeout_ms=timeout_ms,
        max_cost_usd=max_cost_usd,
    )
