"""The dossier as Markdown: a real dossier from the offline provider, rendered and parsed
back with a CommonMark parser (GFM tables on), so the checks are about what a reader sees."""

from __future__ import annotations

import asyncio
import copy
import functools
from typing import Any

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from adapters.sqlite_store import SqliteStore
from pipeline.delivery import run_job
from pipeline.deps import Deps, PipelineConfig
from pipeline.dossier_markdown import render_markdown, slug
from pipeline.graph import SECTION_STEPS
from pipeline.offline import OfflineProvider
from tests.test_pipeline_runner import new_job

FAST = PipelineConfig(cancel_poll_s=0.02, llm_backoff_base_s=0.01, llm_backoff_max_s=0.05)
PITCH = (
    "Acme Robotics builds robots that fold laundry for hotels. "
    "Hotels pay per folded kilogram. Two pilots run in Vienna."
)


@functools.cache
def _offline_dossier(language: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        store = SqliteStore(":memory:")
        await store.open()
        try:
            job_id = await new_job(
                store, project_title="Acme Robotics", elevator_pitch=PITCH, language=language
            )
            job = await run_job(job_id, Deps(store, OfflineProvider(), FAST))
            assert job is not None and job.status == "completed", job and job.error
            artifact = await store.get_artifact(job_id, "dossier")
            assert artifact is not None
            data: dict[str, Any] = artifact.data
            return data
        finally:
            await store.close()

    return asyncio.run(run())


@pytest.fixture
def dossier() -> dict[str, Any]:
    """The English dossier of a real offline run (a fresh copy per test)."""
    return copy.deepcopy(_offline_dossier("en"))


def parse(markdown: str) -> list[Token]:
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(markdown)


def headings(tokens: list[Token], level: int) -> list[str]:
    """The text a reader sees in each heading of ``level``."""
    tag = f"h{level}"
    return [_plain(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == tag]


def tables(tokens: list[Token]) -> list[list[list[str]]]:
    """Each table as rows of cell texts (header row first)."""
    found: list[list[list[str]]] = []
    for i, t in enumerate(tokens):
        if t.type == "table_open":
            found.append([])
        elif t.type == "tr_open":
            found[-1].append([])
        elif t.type in ("th_open", "td_open"):
            found[-1][-1].append(_plain(tokens[i + 1]))
    return found


def _plain(inline: Token) -> str:
    """What a reader sees of an inline token: its text, without markup."""
    return "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline"))


def links(tokens: list[Token]) -> dict[str, str]:
    """Link text -> href over the whole document."""
    found: dict[str, str] = {}
    for t in tokens:
        children = t.children or []
        for i, c in enumerate(children):
            if c.type == "link_open":
                found[children[i + 1].content] = str(c.attrs["href"])
    return found


def list_items(tokens: list[Token]) -> list[str]:
    return [
        _plain(tokens[i + 2])
        for i, t in enumerate(tokens)
        if t.type == "list_item_open" and tokens[i + 2].type == "inline"
    ]


def test_document_has_the_title_verdict_and_one_heading_per_part(dossier: dict[str, Any]) -> None:
    """The Markdown opens with the title and verdict, then pitch, brief, score, the nine sections in
    pipeline order, sources, validation and meta as second-level headings."""
    markdown = render_markdown(dossier)
    tokens = parse(markdown)
    assert headings(tokens, 1) == ["Acme Robotics"]
    section_titles = [
        "Problem", "Solution", "Team", "Market", "Status quo",
        "Business model", "Competition", "Go-to-market", "Financial plan",
    ]  # fmt: skip
    assert list(dossier["sections"]) == list(SECTION_STEPS)
    assert headings(tokens, 2) == [
        "Pitch", "Brief", "Investor score", *section_titles, "Sources", "Validation", "About this dossier",
    ]  # fmt: skip
    score = dossier["investor_score"]
    assert f"**Verdict:** 🟡 {score['verdict']}" in markdown or f"{score['verdict']}" in markdown
    assert f"**Score:** {score['score_total']:g} / 100" in markdown
    for section in dossier["sections"].values():
        assert f"**{section['headline']}**" in markdown
        for bullet in section["bullets"]:
            assert bullet in list_items(tokens)
    assert markdown.endswith("\n") and "\n\n\n" not in markdown


def test_score_is_a_table_of_sub_scores_with_the_total(dossier: dict[str, Any]) -> None:
    """The investor score shows as a table: one row per sub-score out of 10, then the total out of 100."""
    score = dossier["investor_score"]
    table = tables(parse(render_markdown(dossier)))[0]
    assert table[0] == ["Criterion", "Score"]
    names = {"go_to_market": "Go-to-market", "business_model": "Business model"}
    expected = [[names.get(k, k.capitalize()), f"{v:g} / 10"] for k, v in score["scores"].items()]
    assert table[1:-1] == expected
    assert table[-1] == ["Total", f"{score['score_total']:g} / 100"]


def test_section_data_is_a_table_with_readable_numbers(dossier: dict[str, Any]) -> None:
    """Each section's figures are a two-column table; numbers get thousands separators."""
    market = dossier["sections"]["market"]["data"]
    rendered = tables(parse(render_markdown(dossier)))
    market_table = next(t for t in rendered if t[1][0] == next(iter(market)))
    assert market_table[0] == ["Figure", "Value"]
    assert market_table[1:] == [[key, f"{value:,}"] for key, value in market.items()]


def test_citation_links_to_its_sources_url(dossier: dict[str, Any]) -> None:
    """A citation naming a source with a URL is a link to that URL (spaces and parentheses
    percent-encoded); sources list title, publisher and year; one without a URL says so."""
    source = dossier["evidence"]["sources"][0]
    source.update(url="https://example.org/hotel laundry (2024).pdf", publisher="Hotel Board", year=2024)
    cited = dossier["sections"]["problem"]["citations"][0]
    assert cited == source["title"]
    markdown = render_markdown(dossier)
    found = links(parse(markdown))
    assert found[cited] == "https://example.org/hotel%20laundry%20%282024%29.pdf"
    first_source = f"1. [{source['title']}](https://example.org/hotel%20laundry%20%282024%29.pdf)"
    assert f"{first_source}, Hotel Board, 2024, reliability 0.1" in markdown
    second = dossier["evidence"]["sources"][1]
    assert f"2. {second['title']}, offline, reliability 0.1, no link" in markdown
    assert f"- {second['title']} (source 2)" in markdown


def test_only_http_urls_become_links(dossier: dict[str, Any]) -> None:
    """A source URL with another scheme (javascript:, data:) is shown as no link at all."""
    sources = dossier["evidence"]["sources"]
    sources[0]["url"], sources[1]["url"] = "javascript:alert(1)", "data:text/html,x"
    markdown = render_markdown(dossier)
    assert links(parse(markdown)) == {}
    assert "javascript:" not in markdown and "data:text" not in markdown


def test_model_text_cannot_change_the_documents_structure(dossier: dict[str, Any]) -> None:
    """Pipes, a leading '#', list and quote markers, HTML and emphasis in model text stay text: no
    extra heading, no extra table column, no list, no HTML, and the reader sees the text as written."""
    problem = dossier["sections"]["problem"]
    problem["headline"] = "Costs | Revenue *now*"
    problem["bullets"] = ["# Not a heading", "1. not a list", "> not a quote", "<b>bold</b> & [x](y)"]
    problem["narrative"] = "# Big claim\n- not a list\n\n    not code\n===\nTitle ##"
    problem["data"] = {"share | of market": "10 | 20", "`tick`": "a_b_c"}
    problem["open_questions"] = ["Line one\n# line two"]
    dossier["title"] = "# Acme | Robotics"
    markdown = render_markdown(dossier)
    tokens = parse(markdown)

    assert headings(tokens, 1) == ["# Acme | Robotics"]
    assert len(headings(tokens, 2)) == 3 + 9 + 3
    kinds = [t.type for t in tokens]
    assert not {"html_block", "html_inline", "code_block", "fence", "hr"} & set(kinds)
    assert kinds.count("ordered_list_open") == 1  # the sources
    assert kinds.count("blockquote_open") == 2  # the offline marker and the pitch
    data_table = next(t for t in tables(tokens) if t[1][0] == "share | of market")
    assert data_table[1:] == [["share | of market", "10 | 20"], ["`tick`", "a_b_c"]]
    items = list_items(tokens)
    for bullet in problem["bullets"]:
        assert bullet in items
    assert "Line one # line two" in items
    paragraphs = [_plain(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "paragraph_open"]
    assert "Costs | Revenue *now*" in paragraphs
    assert "# Big claim- not a list" in paragraphs  # one paragraph, soft break, no list
    assert "not code===Title ##" in paragraphs
    assert "\\# Acme \\| Robotics" in markdown.splitlines()[0]


def test_validation_findings_are_a_table(dossier: dict[str, Any]) -> None:
    """Validation says whether it passed and lists each finding with severity, section, figure and message."""
    dossier["validation"].update(
        passed=False,
        issues=[
            {
                "section": "market",
                "key": "sam_eur",
                "kind": "inconsistent_figure",
                "severity": "error",
                "message": "SAM | larger than TAM",
            }
        ],
    )
    markdown = render_markdown(dossier)
    assert "**Not passed.** 9 sections and" in markdown
    table = tables(parse(markdown))[-1]
    assert table == [
        ["Severity", "Section", "Figure", "Finding"],
        ["error", "Market", "sam_eur", "SAM | larger than TAM"],
    ]


def test_clean_validation_and_meta_with_the_offline_marker(dossier: dict[str, Any]) -> None:
    """A passed validation says so with no table; the meta marks the dossier offline and names the models."""
    markdown = render_markdown(dossier)
    assert "**Passed.**" in markdown and "No findings." in markdown
    assert "> **Offline: written without a language model" in markdown
    assert "- Offline: yes" in markdown and "- Provider: offline" in markdown
    assert "  - offline: evidence, brief, problem" in markdown
    dossier["meta"].update(offline=False, provider="openai", models={"evidence": "gpt-x", "brief": "gpt-y"})
    online = render_markdown(dossier)
    assert "Offline: written" not in online and "- Offline: no" in online
    assert "  - gpt-x: evidence\n  - gpt-y: brief" in online


def test_a_german_dossier_has_german_labels_and_number_format() -> None:
    """With language de the headings and labels are German and numbers use German separators."""
    dossier = copy.deepcopy(_offline_dossier("de"))
    markdown = render_markdown(dossier)
    tokens = parse(markdown)
    h2 = headings(tokens, 2)
    german = ("Briefing", "Investoren-Bewertung", "Lösung", "Markt", "Geschäftsmodell", "Quellen", "Prüfung")
    assert set(german) <= set(h2)
    assert "**Urteil:**" in markdown and "**Punkte:**" in markdown
    tam = dossier["sections"]["market"]["data"]["tam_eur"]
    assert f"| {tam:,} |".replace(",", ".") in markdown
    assert "*Belegabdeckung: 30 %*" in markdown


def test_an_incomplete_dossier_still_renders() -> None:
    """Missing parts are left out instead of failing (a dossier from an older version)."""
    markdown = render_markdown({"title": "Only a title", "language": "en"})
    assert headings(parse(markdown), 1) == ["Only a title"]
    assert "No sources." in markdown


def test_file_name_slug() -> None:
    """The download name is the title in ASCII lower case with dashes, 'dossier' when nothing is left."""
    assert slug("Müller Bäckerei | Abo!") == "muller-backerei-abo"
    assert slug('"; rm -rf /') == "rm-rf"
    assert slug("日本") == "dossier"
