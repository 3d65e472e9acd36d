"""The web page at ``/`` in headless Chromium (SPEC 7.1, issue 14 part 3).

Against a real ``jobq serve`` (local backend, offline provider slowed down so a
step's text takes seconds to write): the page submits through its form, shows
the text of a running step before that step's artifact exists, renders the
finished dossier as a document (no JSON dump), lists the job among the caller's
past jobs to reopen it, and loads nothing that fails (console errors, failed
requests, 4xx/5xx answers, the favicon included). A second test drives the
page's own delta and rendering code with hand-made events and dossiers: the
offset rules of SPEC 7.1 and the link rules (only http(s) URLs become links).

Chromium is the system's (``apt-get install chromium``), driven by Playwright's
Python client; the test skips only when no Chromium executable can be found.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright

from tests.support.service import Service, base_env, running

pytestmark = pytest.mark.slow

LATENCY_MS = 2000
"""Each offline LLM call writes its answer over 2 s: time to see it being written."""
SCREENSHOT_DIR = Path(os.environ.get("JOBQ_SCREENSHOT_DIR", "/tmp"))
ARTIFACT_OF_STEP = {"evidence": "sources", "brief": "brief", "investor_score": "investor_score"}


def chromium_path() -> str | None:
    """The system Chromium: ``CHROMIUM_PATH``, /usr/bin/chromium, or one on PATH."""
    candidates = [os.environ.get("CHROMIUM_PATH", ""), "/usr/bin/chromium"]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def artifact_of(step: str) -> str:
    return ARTIFACT_OF_STEP.get(step, f"section_{step}")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("web-page")
    env = {
        **base_env(),
        "JOBS_STORE_URL": f"sqlite:///{workdir / 'jobs.db'}",
        "LLM_OFFLINE_LATENCY_MS": str(LATENCY_MS),
        "SUBMIT_RATE_PER_MIN": "0",
    }
    with running(Service(backend="local", env=env, log_dir=workdir)) as service:
        yield service


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (install it: apt-get install -y chromium, or set CHROMIUM_PATH)")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watched:
    """A page and everything that went wrong on it."""

    page: Page
    problems: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.problems == [], "the page had errors:\n" + "\n".join(self.problems)


@pytest.fixture
def page(browser: Browser, web: Service, request: pytest.FixtureRequest) -> Iterator[Watched]:
    request.node.jobq_services = [*getattr(request.node, "jobq_services", []), web]
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    watched = Watched(context.new_page())

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            watched.problems.append(f"console error: {msg.text} at {msg.location}")

    def on_failed(req: Request) -> None:
        watched.problems.append(f"request failed: {req.method} {req.url}: {req.failure}")

    def on_response(resp: Response) -> None:
        if resp.status >= 400:
            watched.problems.append(f"HTTP {resp.status}: {resp.request.method} {resp.url}")

    watched.page.on("console", on_console)
    watched.page.on("pageerror", lambda exc: watched.problems.append(f"page error: {exc}"))
    watched.page.on("requestfailed", on_failed)
    watched.page.on("response", on_response)
    try:
        yield watched
    finally:
        context.close()


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_live_texts(page: Page) -> list[dict[str, Any]]:
    """The live panels of steps still being written: step and text so far."""
    result: list[dict[str, Any]] = page.evaluate(
        """() => Array.from(document.querySelectorAll('details.live-step[data-state=running]'))
            .map((d) => {
              const box = d.querySelector('.live-text');
              return { step: d.dataset.step, text: box ? box.textContent : '',
                       font: box ? getComputedStyle(box).fontFamily : '', tag: box ? box.tagName : '' };
            })"""
    )
    return result


def test_page_follows_a_job_live_and_renders_the_dossier(page: Watched, web: Service) -> None:
    p = page.page
    p.goto(web.base_url + "/")
    assert p.title().startswith("jobq")
    title = f"Web Page Grid {uuid.uuid4().hex[:6]}"
    p.fill("#title", title)
    p.fill("#pitch", "Solar micro-grids for dairy farms in the Alps, sold as a monthly service.")
    p.select_option("#language", "en")
    p.fill("#parallel", "2")
    p.click("#submit")
    p.wait_for_function("document.getElementById('jobid').textContent.length > 0")
    job_id = p.text_content("#jobid") or ""
    with web.client() as client:
        check_live_then_dossier(page, web, client, job_id, title)


def check_live_then_dossier(
    page: Watched, web: Service, client: httpx.Client, job_id: str, title: str
) -> None:
    p = page.page

    # -- live text of a running step, before that step's artifact exists --------
    def live_before_artifact() -> dict[str, Any] | None:
        for panel in running_live_texts(p):
            if len(panel["text"]) < 20:
                continue
            names = {a["name"] for a in client.get(f"/api/jobs/{job_id}/artifacts").json()["artifacts"]}
            if artifact_of(panel["step"]) not in names:
                return {**panel, "artifacts": names}
        return None

    seen = wait_until(live_before_artifact, "live text of a step whose artifact does not exist yet", 60)
    assert seen["text"].lstrip().startswith("{"), seen  # the model's JSON, as it is being written
    assert "mono" in seen["font"].lower() and seen["tag"] != "PRE", seen
    step = seen["step"]

    # the step's artifact arrives: its live text gives way to the finished part, collapsed
    panel = f"details.live-step[data-step={step}]"
    p.wait_for_function(
        f"() => {{ const d = document.querySelector('{panel}');"
        " return d.dataset.state === 'done' && !d.open && !d.querySelector('.live-text')"
        " && d.querySelector('ol.sources, h3.headline, .score-wrap, ul, p') !== null; }",
        timeout=60_000,
    )

    # -- the finished dossier, as a document ------------------------------------
    p.wait_for_selector("#dossier .badge.verdict", timeout=120_000)
    view = client.get(f"/api/jobs/{job_id}").json()
    assert view["status"] == "completed", view
    data = view["result"]["data"]
    assert_rendered_dossier(p, job_id, data, title)
    markdown = client.get(p.get_attribute("#dossier a.download", "href") or "")
    assert markdown.status_code == 200 and markdown.headers["content-type"].startswith("text/markdown")
    p.wait_for_function("document.getElementById('submit').disabled === false")
    p.screenshot(path=str(SCREENSHOT_DIR / "jobq-web-dossier.png"), full_page=True)

    # -- the job among the caller's past jobs, reopened from a fresh page -------
    p.goto(web.base_url + "/")
    entry = f"#jobs a[data-job='{job_id}']"
    p.wait_for_selector(entry)
    assert title in (p.text_content(entry) or "")  # the page remembers titles of the jobs it started
    assert "completed" in (p.text_content(entry) or "")
    p.click(entry)
    p.wait_for_selector("#dossier .badge.verdict")
    assert_rendered_dossier(p, job_id, data, title)
    assert p.text_content("#status") == "completed"
    assert p.locator("#artifacts tr").count() == 15
    page.assert_clean()


def test_page_reopens_a_running_job_and_follows_it(page: Watched, web: Service) -> None:
    """A job started elsewhere (the API) shows up among the past jobs; clicking it while
    it runs follows it: live text, then the dossier."""
    title = f"Reopened Grid {uuid.uuid4().hex[:6]}"
    body = {
        "project_title": title,
        "elevator_pitch": "Heat pumps as a service for Alpine hotels.",
        "language": "en",
        "parallel_limit": 4,
    }
    with web.client() as client:
        created = client.post("/api/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["jobId"]
        p = page.page
        p.goto(web.base_url + "/")
        entry = f"#jobs a[data-job='{job_id}']"
        p.wait_for_selector(entry)
        p.click(entry)
        p.wait_for_function(
            "() => Array.from(document.querySelectorAll('details.live-step[data-state=running] .live-text'))"
            ".some((e) => e.textContent.length > 0)",
            timeout=60_000,
        )
        assert p.text_content("#status") in ("queued", "running")
        p.wait_for_selector("#dossier .badge.verdict", timeout=120_000)
        data = client.get(f"/api/jobs/{job_id}").json()["result"]["data"]
    assert p.text_content("#doc-title") == title
    assert p.text_content("#dossier .badge.verdict") == data["investor_score"]["verdict"]
    assert p.locator("#jobs li.current").get_attribute("data-job") == job_id
    page.assert_clean()


def assert_rendered_dossier(p: Page, job_id: str, data: dict[str, Any], title: str) -> None:
    score = data["investor_score"]
    assert p.text_content("#doc-title") == title
    assert p.text_content("#dossier .badge.verdict") == score["verdict"]
    headline = data["sections"]["market"]["headline"]
    assert p.text_content("#sec-market h3.headline") == headline
    assert p.locator("#sec-market table.data tr").count() == len(data["sections"]["market"]["data"])
    assert p.locator("#doc-score .bar-row").count() == len(score["scores"])  # the sub-score chart
    assert p.locator("#doc-score svg.score-total").count() == 1
    sources = data["evidence"]["sources"]
    assert p.locator("#doc-sources ol.sources > li").count() == len(sources)
    assert sources[0]["title"] in (p.text_content("#doc-sources") or "")
    link = p.locator("#dossier a.download")
    assert link.text_content() == "Download Markdown"
    assert link.get_attribute("href") == f"/api/jobs/{job_id}/dossier.md"
    # a document, not a dump: no visible <pre>, no JSON of the dossier in the page's text
    assert p.locator("pre:visible").count() == 0
    shown = p.inner_text("body")
    for marker in ('"investor_score"', '"score_total"', '"headline"', json.dumps(headline)):
        assert marker not in shown


def test_page_delta_rules_and_safe_rendering(page: Watched, web: Service) -> None:
    """The page's own code on hand-made input: SPEC 7.1's offset rules (duplicates
    ignored, a gap drops the text until the next attempt, a new attempt restarts,
    offsets count characters), model text only ever as text, links only to http(s)."""
    p = page.page
    p.goto(web.base_url + "/")
    p.evaluate("() => resetJob('00000000-0000-4000-8000-000000000000')")

    def delta(attempt: int, offset: int, text: str, step: str = "market") -> str:
        event = {"step": step, "attempt": attempt, "offset": offset, "text": text}
        p.evaluate("(d) => onDelta(d)", event)
        return p.eval_on_selector(f"details.live-step[data-step={step}] .live-text", "e => e.textContent")

    assert delta(1, 0, '{"headline":"') == '{"headline":"'
    assert delta(1, 0, '{"headline":"') == '{"headline":"'  # duplicate
    assert delta(1, 13, "Grün 😀") == '{"headline":"Grün 😀'
    assert delta(1, 19, '"') == '{"headline":"Grün 😀"'  # offsets count characters, not UTF-16 units
    assert delta(1, 40, "lost") == ""  # a gap: the partial text is dropped
    assert delta(1, 20, ",") == ""  # ... until the next attempt
    assert "lost" in (p.text_content("details.live-step[data-step=market] summary") or "")
    assert delta(2, 0, "<img src=x onerror=alert(1)>") == "<img src=x onerror=alert(1)>"
    assert delta(1, 0, "late text of attempt 1") == "<img src=x onerror=alert(1)>"
    assert p.locator("#live img").count() == 0
    assert delta(1, 5, "x", step="team") == ""  # a first delta not at offset 0 is a gap too

    section = {
        "headline": "<b>Bold</b> claims",
        "bullets": ["<script>alert(1)</script>"],
        "narrative": "First paragraph.\n\nSecond paragraph.",
        "data": {"tam_eur": 2200000000, "segments": {"dach": 3}},
        "assumptions": ["a"],
        "open_questions": ["q"],
        "citations": ["Good source", "Bad source", "Plain source"],
        "evidence_coverage": 0.5,
    }
    sources = [
        {"title": "Good source", "url": "https://example.org/report?x=1", "publisher": "Example"},
        {"title": "Bad source", "url": "javascript:alert(1)"},
        {"title": "Plain source", "url": "ftp://example.org/file"},
        {"title": "Http source", "url": "http://example.org/"},
    ]
    dossier = {
        "title": "Zürich <Labs>",
        "language": "de",
        "pitch": "p",
        "evidence": {"sources": sources},
        "sections": {"market": section},
        "investor_score": {"score_total": 41, "verdict": "RED", "scores": {"team": 3, "market": 6}},
        "validation": {
            "passed": False,
            "issues": [{"severity": "error", "section": "market", "key": "tam_eur", "message": "m"}],
        },
        "meta": {"offline": False},
    }
    p.evaluate("(d) => showResult({ success: true, data: d })", dossier)
    assert p.text_content("#doc-title") == "Zürich <Labs>"
    assert p.text_content("#dossier .badge.verdict") == "RED"
    assert p.text_content("#sec-market h3") == "<b>Bold</b> claims"
    assert p.locator("#dossier b, #dossier script").count() == 0
    assert p.text_content("#sec-market .kicker") == "Markt"  # labels follow the dossier's language
    links = p.eval_on_selector_all(
        "#doc-sources a", "as => as.map(a => [a.textContent, a.getAttribute('href'), a.rel, a.target])"
    )
    assert links == [
        ["Good source", "https://example.org/report?x=1", "noopener noreferrer", "_blank"],
        ["Http source", "http://example.org/", "noopener noreferrer", "_blank"],
    ]
    cited = p.eval_on_selector_all("#sec-market ol a", "as => as.map(a => a.textContent)")
    assert cited == ["Good source"]
    widths = p.eval_on_selector_all("#doc-score .fill", "fs => fs.map(f => f.style.width)")
    assert widths == ["30%", "60%"]
    assert "tam_eur" in (p.text_content("#doc-validation li.bad") or "")
    page.assert_clean()


@pytest.fixture(scope="module")
def secured_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("web-page-secured")
    env = {
        **base_env(),
        "JOBS_STORE_URL": f"sqlite:///{workdir / 'jobs.db'}",
        "LLM_OFFLINE_LATENCY_MS": "300",
        "SUBMIT_RATE_PER_MIN": "0",
        "API_KEYS": "key-page-alice:alice",
    }
    with running(Service(backend="local", env=env, log_dir=workdir)) as service:
        yield service


def test_page_with_api_keys_follows_streams_by_token_never_by_key(
    browser: Browser, secured_web: Service, request: pytest.FixtureRequest
) -> None:
    """With API_KEYS the page streams through streamUrl's token, sends the key only as a
    header, and follows a job both from its form and when reopened while it runs."""
    request.node.jobq_services = [secured_web]
    context = browser.new_context()
    try:
        p = context.new_page()
        urls: list[str] = []
        statuses: list[str] = []
        p.on("request", lambda r: urls.append(r.url))
        p.on("response", lambda r: statuses.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        p.goto(secured_web.base_url + "/")
        p.wait_for_function("document.getElementById('jobs-msg').textContent.length > 0")
        statuses.clear()  # the first list, before any key was entered, is a 401
        p.fill("#apikey", "key-page-alice")
        p.fill("#title", "Token Grid")
        p.fill("#pitch", "Solar micro-grids for dairy farms in the Alps.")
        p.click("#submit")
        p.wait_for_function("document.getElementById('jobid').textContent.length > 0")
        job_id = p.text_content("#jobid") or ""
        p.goto(f"{secured_web.base_url}/?job={job_id}")  # reopened while it runs
        p.wait_for_selector("#dossier .badge.verdict", timeout=120_000)
        streams = [u for u in urls if "/stream" in u]
        assert streams and all(f"/api/jobs/{job_id}/stream?token=" in u for u in streams), streams
        assert not [u for u in urls if "api_key" in u or "key-page-alice" in u]
        assert statuses == []
    finally:
        context.close()
