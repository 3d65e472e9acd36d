"""The offline provider: schema-valid answers derived from the input, no network.

It is the default when no API key is set and the workhorse of tests and load
benchmarks: answers are deterministic (same title, pitch and language, same
answer), latency is simulated with ``asyncio.sleep`` so cancelling the caller
aborts a call in flight, and ``calls`` / ``in_flight`` / ``max_in_flight`` let
tests check the concurrency the scheduler promised.

With ``on_text`` the answer streams like a model's: in pieces spread evenly over
the step's latency (about one every ``CHUNK_INTERVAL_S``; at least two, at most
``MAX_CHUNKS``), the last one at the end of it. At zero latency it comes in one
piece at once, with no extra sleep.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping
from functools import cached_property, lru_cache
from typing import Any

import msgspec

from pipeline.graph import SECTION_STEPS
from pipeline.hashing import sha256_hex
from pipeline.model import LLMError, LLMReply, LLMRequest
from pipeline.ports import TextSink
from pipeline.vocabulary import ErrorCode

JSONDict = dict[str, Any]

CHUNK_INTERVAL_S = 0.05
"""Simulated time between two pieces of a streamed answer."""
MAX_CHUNKS = 40

_WORD = re.compile(r"[^\W\d_]{5,}", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_STOP = {
    "about", "after", "their", "there", "these", "which", "while", "would", "where",
    "einen", "einer", "eines", "diese", "dieser", "durch", "keine", "nicht", "unsere",
    "werden", "wird", "sowie", "unser", "other", "using", "without", "within",
}

_T = {
    "de": {
        "offline": "Offline-Modus: erzeugt ohne Sprachmodell, nur als Platzhalter zu verwenden.",
        "source_title": "Offline-Platzhalter: Daten zu {topic}",
        "source_note": "Stützt den Abschnitt zu {topic}; vor Verwendung durch echte Quelle "
        "ersetzen.",
        "finding": "{topic} ist für {title} in {region} relevant (offline abgeleitet).",
        "question": "Welche belastbaren Zahlen belegen {topic}?",
        "assumption": "{topic} entwickelt sich in {region} wie im Pitch beschrieben.",
        "headline": "{section}: {title} - {topic}",
        "bullet": "{topic}: im Pitch genannt, offline eingeordnet.",
        "narrative": "{title} adressiert {topic}. {pitch} Diese Einschätzung zum Abschnitt "
        "{section} ist offline aus dem Briefing abgeleitet.",
        "strength": "Klarer Fokus auf {topic}",
        "risk": "{topic} ist nicht durch Quellen belegt",
        "fix": "Zahlen zu {topic} mit Quellen belegen",
    },
    "en": {
        "offline": "Offline mode: produced without a language model, use as a placeholder only.",
        "source_title": "Offline placeholder: data on {topic}",
        "source_note": "Supports the section on {topic}; replace with a real source before use.",
        "finding": "{topic} matters for {title} in {region} (derived offline).",
        "question": "Which reliable figures back {topic}?",
        "assumption": "{topic} develops in {region} as the pitch describes.",
        "headline": "{section}: {title} - {topic}",
        "bullet": "{topic}: named in the pitch, placed offline.",
        "narrative": "{title} addresses {topic}. {pitch} This view of the {section} section "
        "is derived offline from the brief.",
        "strength": "Clear focus on {topic}",
        "risk": "{topic} is not backed by sources",
        "fix": "Back the figures on {topic} with sources",
    },
}


def _ranked_words(text: str, limit: int) -> tuple[str, ...]:
    words = [w.lower() for w in _WORD.findall(text) if w.lower() not in _STOP]
    ranked = [w for w, _ in Counter(words).most_common()]
    return tuple(ranked[:limit] or ["market"])


def _sentences(text: str, limit: int) -> list[str]:
    return list(_split_sentences(text)[:limit])


@lru_cache(maxsize=256)
def _split_sentences(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in _SENTENCE.split(text.strip()) if s.strip())


@lru_cache(maxsize=256)
def _pitch_topics(title: str, text: str) -> tuple[str, ...]:
    """Up to five topics of the pitch, none a word of the title. Every step of a job
    reads the same pitch: its words are ranked once per process."""
    title_words = {w.lower() for w in _WORD.findall(title)}
    return tuple([t for t in _ranked_words(text, 8) if t not in title_words][:5] or ["market"])


@lru_cache(maxsize=1024)
def _each(
    language: str, key: str, title: str, region: str, topics: tuple[str, ...], count: int
) -> tuple[str, ...]:
    """The same phrases recur in most steps of a job: each is formatted once."""
    text = _T[language][key]
    picked = (topics * count)[:count]
    return tuple(text.format(title=title, region=region, topic=topic) for topic in picked)


class OfflineProvider:
    """``LLMProvider`` without a model. ``latency_ms`` applies to every call;
    ``latency_by_step`` overrides it per step (benchmarks with uneven steps)."""

    name = "offline"

    def __init__(
        self, latency_ms: float = 0, *, latency_by_step: Mapping[str, float] | None = None
    ) -> None:
        self.latency_ms = latency_ms
        self.latency_by_step = dict(latency_by_step or {})
        self.calls = 0
        self.calls_by_step: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        self.calls += 1
        self.calls_by_step[request.step] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = max(0.0, self.latency_by_step.get(request.step, self.latency_ms) / 1000)
            if on_text is None or not delay:
                # Even at zero latency the call gives up the event loop once, as a call
                # over the network does: a job must not run all its steps in one turn.
                await asyncio.sleep(delay)
                text = self._text(request)
                if on_text is not None:
                    on_text(text)
            else:
                text = self._text(request)
                await _stream(text, delay, on_text)
        finally:
            self.in_flight -= 1
        return LLMReply(
            text=text,
            model=request.model,
            prompt_tokens=(len(request.system) + len(request.prompt)) // 4,
            completion_tokens=len(text) // 4,
        )

    def _text(self, request: LLMRequest) -> str:
        answer = self.answer(request.step, request.language, request.context)
        return msgspec.json.encode(answer).decode()

    def answer(self, step: str, language: str, context: JSONDict) -> JSONDict:
        """The deterministic answer for ``step`` given its input artifacts."""
        builder = _BUILDERS.get(step) or (_section if step in SECTION_STEPS else None)
        if builder is None:
            raise LLMError(ErrorCode.LLM_BAD_REQUEST, f"offline provider has no answer for step {step!r}")
        return builder(_Facts(step, language if language in _T else "en", context))


async def _stream(text: str, delay: float, on_text: TextSink) -> None:
    """Pass ``text`` to ``on_text`` in pieces, piece ``i`` of ``n`` at ``delay * i / n``
    (from the start, so the sleeps' overshoot does not add up)."""
    count = max(1, min(MAX_CHUNKS, max(2, round(delay / CHUNK_INTERVAL_S)), len(text)))
    size = len(text)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(1, count + 1):
        await asyncio.sleep(max(0.0, start + delay * i / count - loop.time()))
        on_text(text[(i - 1) * size // count : i * size // count])


class _Facts:
    """What the offline answers are made of, taken from the step's inputs only."""

    def __init__(self, step: str, language: str, context: JSONDict) -> None:
        pitch = context.get("pitch") or {}
        brief = context.get("brief") or {}
        evidence = context.get("sources") or {}
        self.step = step
        self.language = language
        self.context = context
        self.title = str(pitch.get("title") or brief.get("project_title") or "Startup")
        self.text = str(pitch.get("pitch") or brief.get("brief") or self.title)
        self.region = str(pitch.get("geo") or evidence.get("region") or "EU/DACH")
        self.topics = list(_pitch_topics(self.title, self.text))
        self.sources = [s["title"] for s in evidence.get("sources", []) if "title" in s]

    @cached_property
    def rng(self) -> random.Random:
        """Numbers of this step (seeded by step, pitch and language); made when used."""
        seed = sha256_hex(f"{self.step}|{self.title}|{self.text}|{self.language}")
        return random.Random(int(seed[:16], 16))

    @cached_property
    def base(self) -> random.Random:
        """Numbers every step of the same pitch agrees on (market size and such)."""
        return random.Random(int(sha256_hex(f"{self.title}|{self.text}")[:16], 16))

    def t(self, key: str, **values: str) -> str:
        return _T[self.language][key].format(
            title=self.title, region=self.region, **{"topic": self.topics[0], **values}
        )

    def each(self, key: str, count: int) -> list[str]:
        """``key``'s text for each of the first ``count`` topics (repeated if fewer)."""
        return list(_each(self.language, key, self.title, self.region, tuple(self.topics), count))

    def section_data(self, name: str) -> JSONDict:
        return dict((self.context.get(f"section_{name}") or {}).get("data") or {})


def _evidence(f: _Facts) -> JSONDict:
    sources = [
        {
            "title": f.t("source_title", topic=topic),
            "publisher": "offline",
            "year": None,
            "region": f.region,
            "url": "",
            "method": "offline placeholder",
            "key_findings": [f.t("finding", topic=topic)],
            "usage_note": f.t("source_note", topic=topic),
            "access": "none",
            "reliability_score": 0.1,
            "last_accessed": "1970-01-01",
        }
        for topic in f.topics[:3]
    ]
    return {"region": f.region, "topics": f.topics, "sources": sources}


def _brief(f: _Facts) -> JSONDict:
    sentences = _sentences(f.text, 5)
    return {
        "project_title": f.title,
        "brief": " ".join(sentences[:3]) or f.title,
        "facts": sentences,
        "open_questions": f.each("question", 2),
        "assumptions": [*f.each("assumption", 1), f.t("offline")],
    }


def _market_data(f: _Facts) -> JSONDict:
    tam = f.base.randint(5, 90) * 100_000_000
    sam = tam * f.base.randint(10, 40) // 100
    som = sam * f.base.randint(1, 8) // 100
    return {
        "tam_eur": tam,
        "sam_eur": sam,
        "som_eur": som,
        "cagr_pct": f.base.randint(4, 35),
        "target_customers": f.base.randint(2, 90) * 1000,
    }


def _business_data(f: _Facts) -> JSONDict:
    price = f.rng.randint(3, 40) * 10
    margin = f.rng.randint(55, 85)
    cac = f.rng.randint(2, 30) * 100
    return {
        "price_eur_per_month": price,
        "gross_margin_pct": margin,
        "cac_eur": cac,
        "ltv_eur": price * 12 * 3 * margin // 100,
        "som_eur": f.section_data("market").get("som_eur", 0),
    }


def _financial_data(f: _Facts) -> JSONDict:
    business = f.section_data("business_model")
    price = int(business.get("price_eur_per_month", 100))
    customers = f.rng.randint(20, 200)
    y1 = price * 12 * customers
    return {
        "revenue_y1_eur": y1,
        "revenue_y2_eur": y1 * 3,
        "revenue_y3_eur": y1 * 8,
        "funding_ask_eur": f.rng.randint(5, 40) * 100_000,
        "runway_months": f.rng.randint(12, 30),
        "gross_margin_pct": business.get("gross_margin_pct", 70),
        "break_even_month": f.rng.randint(24, 60),
    }


_SECTION_DATA: dict[str, Callable[[_Facts], JSONDict]] = {
    "problem": lambda f: {
        "affected_customers": f.base.randint(2, 90) * 1000,
        "cost_per_incident_eur": f.rng.randint(50, 5000),
        "frequency_per_year": f.rng.randint(1, 52),
    },
    "solution": lambda f: {
        "time_saved_pct": f.rng.randint(10, 70),
        "cost_reduction_pct": f.rng.randint(5, 50),
        "development_stage_months": f.rng.randint(2, 24),
    },
    "team": lambda f: {
        "founders": f.rng.randint(2, 4),
        "employees": f.rng.randint(0, 12),
        "open_key_roles": f.rng.randint(1, 3),
    },
    "market": _market_data,
    "status_quo": lambda f: {
        "current_spend_eur": f.rng.randint(1, 50) * 1000,
        "switching_cost_eur": f.rng.randint(1, 20) * 500,
        "manual_share_pct": f.rng.randint(20, 90),
    },
    "business_model": _business_data,
    "competition": lambda f: {
        "direct_competitors": f.rng.randint(2, 12),
        "indirect_competitors": f.rng.randint(3, 30),
        "market_share_leader_pct": f.rng.randint(5, 45),
    },
    "gtm": lambda f: {
        "target_customers_y1": f.rng.randint(20, 200),
        "cac_eur": f.section_data("business_model").get("cac_eur", 0),
        "sales_cycle_days": f.rng.randint(14, 180),
        "conversion_rate_pct": f.rng.randint(1, 25),
    },
    "financial_plan": _financial_data,
}


def _section(f: _Facts) -> JSONDict:
    section = f.step.replace("_", " ")
    lead = " ".join(_sentences(f.text, 2))
    return {
        "headline": f.t("headline", section=section.title()),
        "bullets": f.each("bullet", 3),
        "narrative": f.t("narrative", section=section, pitch=lead),
        "data": _SECTION_DATA[f.step](f),
        "assumptions": [*f.each("assumption", 1), f.t("offline")],
        "open_questions": f.each("question", 1),
        "citations": f.sources[:2],
        "evidence_coverage": round(min(1.0, len(f.sources) / 10), 2),
    }


CRITERIA = (
    "team",
    "problem",
    "solution",
    "market",
    "business_model",
    "competition",
    "go_to_market",
    "financials",
)


def _score(f: _Facts) -> JSONDict:
    scores = {name: float(f.rng.randint(3, 9)) for name in CRITERIA}
    total = round(sum(scores.values()) / len(scores) * 10, 1)
    verdict = "GREEN" if total >= 70 else "YELLOW" if total >= 50 else "RED"
    market = f.section_data("market")
    business = f.section_data("business_model")
    issues = []
    if market.get("som_eur") != business.get("som_eur"):
        issues.append("som_eur differs between market and business_model")
    return {
        "score_total": total,
        "verdict": verdict,
        "scores": scores,
        "top_strengths": f.each("strength", 3),
        "top_risks": f.each("risk", 3),
        "priority_fixes": f.each("fix", 2),
        "follow_up_questions": f.each("question", 3),
        "consistency_issues": issues,
    }


_BUILDERS: dict[str, Callable[[_Facts], JSONDict]] = {
    "evidence": _evidence,
    "brief": _brief,
    "investor_score": _score,
}
