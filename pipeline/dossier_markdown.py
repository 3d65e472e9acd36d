"""The final ``dossier`` artifact as a Markdown document people can read.

A pure function of the dossier (no clock, no I/O): the same dossier gives the
same text, for ``GET /api/jobs/{id}/dossier.md`` and ``jobq artifacts ID dossier
--format md`` alike. Labels follow the dossier's ``language`` (``de`` or ``en``).

Everything in the dossier came from a model (or from the user's pitch), so every
piece of it is escaped before it lands in the document: characters Markdown would
read as markup (``* _ ` [ ] < > | ~ \\``, entities), block markers at a line's start
(``#``, ``-``, ``+``, ``=``, ``1.``) and a heading's closing ``#`` run; text that
goes into a heading, a list item or a table cell is folded onto one line. Links
are made only to ``http(s)`` URLs, percent-encoded so they cannot break out of
the link.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "verdict": "Verdict",
        "score": "Score",
        "target": "Target",
        "geo": "Region",
        "offline_notice": "Offline: written without a language model; every figure and "
        "source is a placeholder.",
        "pitch": "Pitch",
        "brief": "Brief",
        "facts": "Facts",
        "investor_score": "Investor score",
        "criterion": "Criterion",
        "total": "Total",
        "top_strengths": "Strengths",
        "top_risks": "Risks",
        "priority_fixes": "Priority fixes",
        "follow_up_questions": "Follow-up questions",
        "consistency_issues": "Consistency issues",
        "figure": "Figure",
        "value": "Value",
        "assumptions": "Assumptions",
        "open_questions": "Open questions",
        "citations": "Citations",
        "evidence_coverage": "Evidence coverage",
        "sources": "Sources",
        "no_sources": "No sources.",
        "source_n": "source {n}",
        "reliability": "reliability",
        "no_link": "no link",
        "validation": "Validation",
        "passed": "Passed",
        "not_passed": "Not passed",
        "checked": "{sections} sections and {figures} figures checked.",
        "no_findings": "No findings.",
        "severity": "Severity",
        "section": "Section",
        "finding": "Finding",
        "error": "error",
        "warning": "warning",
        "meta": "About this dossier",
        "offline": "Offline",
        "yes": "yes",
        "no": "no",
        "provider": "Provider",
        "models": "Models",
        "prompt_version": "Prompt version",
        "pitch_hash": "Pitch hash",
    },
    "de": {
        "verdict": "Urteil",
        "score": "Punkte",
        "target": "Zielgruppe",
        "geo": "Region",
        "offline_notice": "Offline: ohne Sprachmodell erstellt; alle Zahlen und Quellen sind Platzhalter.",
        "pitch": "Pitch",
        "brief": "Briefing",
        "facts": "Fakten",
        "investor_score": "Investoren-Bewertung",
        "criterion": "Kriterium",
        "total": "Gesamt",
        "top_strengths": "Stärken",
        "top_risks": "Risiken",
        "priority_fixes": "Vorrangige Verbesserungen",
        "follow_up_questions": "Rückfragen",
        "consistency_issues": "Widersprüche",
        "figure": "Kennzahl",
        "value": "Wert",
        "assumptions": "Annahmen",
        "open_questions": "Offene Fragen",
        "citations": "Belege",
        "evidence_coverage": "Belegabdeckung",
        "sources": "Quellen",
        "no_sources": "Keine Quellen.",
        "source_n": "Quelle {n}",
        "reliability": "Verlässlichkeit",
        "no_link": "kein Link",
        "validation": "Prüfung",
        "passed": "Bestanden",
        "not_passed": "Nicht bestanden",
        "checked": "{sections} Abschnitte und {figures} Kennzahlen geprüft.",
        "no_findings": "Keine Befunde.",
        "severity": "Schwere",
        "section": "Abschnitt",
        "finding": "Befund",
        "error": "Fehler",
        "warning": "Warnung",
        "meta": "Über dieses Dossier",
        "offline": "Offline",
        "yes": "ja",
        "no": "nein",
        "provider": "Anbieter",
        "models": "Modelle",
        "prompt_version": "Prompt-Version",
        "pitch_hash": "Pitch-Hash",
    },
}

_NAMES: dict[str, dict[str, str]] = {
    "en": {
        "problem": "Problem",
        "solution": "Solution",
        "team": "Team",
        "market": "Market",
        "status_quo": "Status quo",
        "business_model": "Business model",
        "competition": "Competition",
        "gtm": "Go-to-market",
        "go_to_market": "Go-to-market",
        "financial_plan": "Financial plan",
        "financials": "Financials",
    },
    "de": {
        "problem": "Problem",
        "solution": "Lösung",
        "team": "Team",
        "market": "Markt",
        "status_quo": "Status quo",
        "business_model": "Geschäftsmodell",
        "competition": "Wettbewerb",
        "gtm": "Go-to-Market",
        "go_to_market": "Go-to-Market",
        "financial_plan": "Finanzplan",
        "financials": "Finanzen",
    },
}

_VERDICT_MARK = {"GREEN": "🟢", "YELLOW": "🟡", "RED": "🔴"}
_SCORE_LISTS = (
    "top_strengths",
    "top_risks",
    "priority_fixes",
    "follow_up_questions",
    "consistency_issues",
)

# Characters that are markup anywhere in a line. `#`, `-`, `+`, `=` and `1.` are
# markup only at a line's start (handled by _escape_line_start).
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")
_ENTITY = re.compile(r"&(?=#?[0-9A-Za-z]+;)")
_LEADING_MARKER = re.compile(r"^([#+=-])")
_LEADING_ORDINAL = re.compile(r"^(\d{1,9})([.)])")
_CLOSING_HASHES = re.compile(r"(\s)(#+)$")
_WHITESPACE = re.compile(r"\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_URL_SAFE = ":/?#[]@!$&*+,;=%~"


def _escape_chars(text: str) -> str:
    return _ENTITY.sub(r"\\&", _SPECIAL.sub(r"\\\1", text))


def _escape_line_start(line: str) -> str:
    line = _LEADING_MARKER.sub(r"\\\1", line)
    return _LEADING_ORDINAL.sub(r"\1\\\2", line)


def inline(value: object) -> str:
    """Model text for one line (a heading, a list item, a table cell): whitespace,
    newlines included, folded to single spaces, markup escaped."""
    text = _WHITESPACE.sub(" ", _text(value)).strip()
    text = _escape_line_start(_escape_chars(text))
    return _CLOSING_HASHES.sub(lambda m: f"{m.group(1)}\\{m.group(2)}", text)


def block(value: object) -> str:
    """Model text as paragraphs: blank lines kept as paragraph breaks, each line
    escaped and stripped of indentation (which would make it a code block)."""
    paragraphs = []
    for raw in _PARAGRAPH_BREAK.split(_text(value).replace("\r\n", "\n").replace("\r", "\n")):
        lines = [_escape_line_start(_escape_chars(line.strip())) for line in raw.split("\n")]
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def safe_url(value: object) -> str | None:
    """An ``http(s)`` URL fit for a Markdown link destination, or ``None``."""
    url = _text(value).strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return quote(url, safe=_URL_SAFE)


def slug(title: object) -> str:
    """An ASCII file name stem from the dossier's title (``dossier`` when nothing is left)."""
    ascii_text = unicodedata.normalize("NFKD", _text(title)).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:80].strip("-")
    return stem or "dossier"


def render_markdown(dossier: Mapping[str, Any]) -> str:
    """The dossier as one Markdown document (ends with a newline)."""
    lang = "de" if dossier.get("language") == "de" else "en"
    out = _Doc(lang)
    score = _mapping(dossier.get("investor_score"))
    sources = [_mapping(s) for s in _list(_mapping(dossier.get("evidence")).get("sources"))]
    meta = _mapping(dossier.get("meta"))

    out.heading(1, dossier.get("title") or "Dossier")
    out.para(_headline_facts(out, dossier, score))
    if meta.get("offline"):
        out.para(f"> **{out.label('offline_notice')}**")
    _render_pitch_and_brief(out, dossier)
    _render_score(out, score)
    for name, section in _mapping(dossier.get("sections")).items():
        _render_section(out, str(name), _mapping(section), sources)
    _render_sources(out, sources)
    _render_validation(out, _mapping(dossier.get("validation")))
    _render_meta(out, meta)
    return out.text()


class _Doc:
    """Blocks of the document, joined by blank lines."""

    def __init__(self, lang: str) -> None:
        self.lang = lang
        self.blocks: list[str] = []

    def label(self, key: str, **values: object) -> str:
        text = _LABELS[self.lang][key]
        return text.format(**values) if values else text

    def name(self, key: str) -> str:
        """Display name of a section or score criterion (unknown keys humanised, escaped)."""
        known = _NAMES[self.lang].get(key)
        return known if known is not None else inline(key.replace("_", " ").strip().capitalize())

    def heading(self, level: int, text: object, *, escaped: bool = False) -> None:
        self.blocks.append(f"{'#' * level} {text if escaped else inline(text)}")

    def para(self, text: str) -> None:
        if text:
            self.blocks.append(text)

    def bullets(self, items: Iterable[object], title: str | None = None) -> None:
        lines = [f"- {inline(item)}" for item in items if _text(item).strip()]
        if lines:
            self.blocks.append("\n".join(([f"**{title}**", ""] if title else []) + lines))

    def table(self, header: tuple[str, ...], rows: Sequence[tuple[str, ...]], align: str = "") -> None:
        if not rows:
            return
        marks = [("---:" if a == "r" else "---") for a in align.ljust(len(header), "l")]
        lines = [_row(header), _row(tuple(marks)), *(_row(r) for r in rows)]
        self.blocks.append("\n".join(lines))

    def text(self) -> str:
        return "\n\n".join(self.blocks) + "\n"


def _row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def _headline_facts(out: _Doc, dossier: Mapping[str, Any], score: Mapping[str, Any]) -> str:
    facts = []
    verdict = _text(score.get("verdict")).strip()
    if verdict:
        mark = _VERDICT_MARK.get(verdict.upper())
        facts.append(f"**{out.label('verdict')}:** {f'{mark} ' if mark else ''}{inline(verdict)}")
    if _is_number(score.get("score_total")):
        facts.append(f"**{out.label('score')}:** {_number(score['score_total'], out.lang)} / 100")
    lines = [" · ".join(facts)] if facts else []
    context = [
        f"{out.label(key)}: {inline(dossier[key])}"
        for key in ("target", "geo")
        if _text(dossier.get(key)).strip()
    ]
    if context:
        lines.append(" · ".join(context))
    return "  \n".join(lines)


def _render_pitch_and_brief(out: _Doc, dossier: Mapping[str, Any]) -> None:
    pitch = block(dossier.get("pitch"))
    if pitch:
        out.heading(2, out.label("pitch"), escaped=True)
        out.para("\n".join(f"> {line}" if line else ">" for line in pitch.split("\n")))
    brief = _mapping(dossier.get("brief"))
    if not brief:
        return
    out.heading(2, out.label("brief"), escaped=True)
    out.para(block(brief.get("brief")))
    out.bullets(_list(brief.get("facts")), out.label("facts"))
    out.bullets(_list(brief.get("assumptions")), out.label("assumptions"))
    out.bullets(_list(brief.get("open_questions")), out.label("open_questions"))


def _render_score(out: _Doc, score: Mapping[str, Any]) -> None:
    if not score:
        return
    out.heading(2, out.label("investor_score"), escaped=True)
    rows = [
        (out.name(str(key)), f"{_number(value, out.lang)} / 10" if _is_number(value) else inline(value))
        for key, value in _mapping(score.get("scores")).items()
    ]
    if _is_number(score.get("score_total")):
        rows.append((f"**{out.label('total')}**", f"**{_number(score['score_total'], out.lang)} / 100**"))
    out.table((out.label("criterion"), out.label("score")), rows, align="lr")
    for key in _SCORE_LISTS:
        out.bullets(_list(score.get(key)), out.label(key))


def _render_section(
    out: _Doc, name: str, section: Mapping[str, Any], sources: list[Mapping[str, Any]]
) -> None:
    out.heading(2, out.name(name), escaped=True)
    headline = inline(section.get("headline"))
    if headline:
        out.para(f"**{headline}**")
    out.bullets(_list(section.get("bullets")))
    out.para(block(section.get("narrative")))
    rows = [(inline(key), _value(value, out.lang)) for key, value in _mapping(section.get("data")).items()]
    out.table((out.label("figure"), out.label("value")), rows, align="lr")
    out.bullets(_list(section.get("assumptions")), out.label("assumptions"))
    out.bullets(_list(section.get("open_questions")), out.label("open_questions"))
    citations = [_citation(out, c, sources) for c in _list(section.get("citations")) if _text(c).strip()]
    if citations:
        out.para("\n".join([f"**{out.label('citations')}**", "", *(f"- {c}" for c in citations)]))
    coverage = section.get("evidence_coverage")
    if _is_number(coverage):
        out.para(f"*{out.label('evidence_coverage')}: {_percent(coverage, out.lang)}*")


def _citation(out: _Doc, citation: object, sources: list[Mapping[str, Any]]) -> str:
    """A citation names a source by its title: linked to the source's URL when it has
    one, else pointed at its number in the source list; a bare URL is linked as is."""
    wanted = _WHITESPACE.sub(" ", _text(citation)).strip()
    for n, source in enumerate(sources, 1):
        if _WHITESPACE.sub(" ", _text(source.get("title"))).strip().casefold() == wanted.casefold():
            url = safe_url(source.get("url"))
            if url:
                return f"[{inline(wanted)}]({url})"
            return f"{inline(wanted)} ({out.label('source_n', n=n)})"
    url = safe_url(wanted)
    return f"<{url}>" if url else inline(wanted)


def _render_sources(out: _Doc, sources: list[Mapping[str, Any]]) -> None:
    out.heading(2, out.label("sources"), escaped=True)
    if not sources:
        out.para(out.label("no_sources"))
        return
    items = []
    for n, source in enumerate(sources, 1):
        title = inline(source.get("title")) or "?"
        url = safe_url(source.get("url"))
        details = [inline(source.get(k)) for k in ("publisher", "year") if _text(source.get(k)).strip()]
        if _is_number(source.get("reliability_score")):
            rel = _number(source["reliability_score"], out.lang)
            details.append(f"{out.label('reliability')} {rel}")
        if not url:
            details.append(out.label("no_link"))
        head = f"[{title}]({url})" if url else title
        items.append(f"{n}. {head}" + (f", {', '.join(details)}" if details else ""))
    out.para("\n".join(items))


def _render_validation(out: _Doc, validation: Mapping[str, Any]) -> None:
    if not validation:
        return
    out.heading(2, out.label("validation"), escaped=True)
    verdict = out.label("passed" if validation.get("passed") else "not_passed")
    sections, figures = validation.get("sections_checked"), validation.get("figures_checked")
    checked = (
        " " + out.label("checked", sections=sections, figures=figures)
        if _is_number(sections) and _is_number(figures)
        else ""
    )
    out.para(f"**{verdict}.**{checked}")
    rows = []
    for issue in (_mapping(i) for i in _list(validation.get("issues"))):
        severity = _text(issue.get("severity"))
        shown = out.label(severity) if severity in ("error", "warning") else inline(severity)
        section = _text(issue.get("section"))
        rows.append(
            (
                shown,
                out.name(section) if section else "",
                inline(issue.get("key")),
                inline(issue.get("message")),
            )
        )
    if rows:
        header = (out.label("severity"), out.label("section"), out.label("figure"), out.label("finding"))
        out.table(header, rows)
    else:
        out.para(out.label("no_findings"))


def _render_meta(out: _Doc, meta: Mapping[str, Any]) -> None:
    if not meta:
        return
    out.heading(2, out.label("meta"), escaped=True)
    lines = [f"- {out.label('offline')}: {out.label('yes' if meta.get('offline') else 'no')}"]
    if _text(meta.get("provider")).strip():
        lines.append(f"- {out.label('provider')}: {inline(meta['provider'])}")
    by_model: dict[str, list[str]] = {}
    for step, model in _mapping(meta.get("models")).items():
        by_model.setdefault(_text(model), []).append(_text(step))
    if by_model:
        lines.append(f"- {out.label('models')}:")
        lines += [f"  - {inline(model)}: {inline(', '.join(steps))}" for model, steps in by_model.items()]
    for key in ("prompt_version", "pitch_hash"):
        if _text(meta.get(key)).strip():
            lines.append(f"- {out.label(key)}: {inline(meta[key])}")
    out.para("\n".join(lines))


def _value(value: object, lang: str) -> str:
    return _number(value, lang) if _is_number(value) else inline(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any, lang: str) -> str:
    """``1,200,000`` / ``0.35`` in English, ``1.200.000`` / ``0,35`` in German."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}".rstrip("0").rstrip(".")
    if lang == "de":
        text = text.translate(str.maketrans(",.", ".,"))
    return text


def _percent(value: Any, lang: str) -> str:
    return f"{_number(round(float(value) * 100, 1), lang)}" + (" %" if lang == "de" else "%")


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
