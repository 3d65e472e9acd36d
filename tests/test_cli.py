"""The `jobq` client commands against a real local deployment, and start-up errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.cli_live import LiveText, readable
from pipeline.dossier_markdown import render_markdown
from pipeline.graph import SECTION_STEPS
from tests.support.redis_server import redis_url
from tests.support.service import ROOT, Service, base_env, free_port


def _local_service(
    tmp_path_factory: pytest.TempPathFactory, name: str, latency_ms: int
) -> Iterator[Service]:
    """A local-backend ``jobq serve`` on its own SQLite file, stopped at the end."""
    workdir = tmp_path_factory.mktemp(name)
    env = {
        **base_env(),
        "JOBS_STORE_URL": f"sqlite:///{workdir / 'jobs.db'}",
        "LLM_OFFLINE_LATENCY_MS": str(latency_ms),
    }
    service = Service(backend="local", env=env, log_dir=workdir)
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture(scope="module")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _local_service(tmp_path_factory, "cli", 20)


def jobq(
    service: Service, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handlers.cli", *args, "--url", service.base_url]
        if args and args[0] != "--help"
        else [sys.executable, "-m", "handlers.cli", *args],
        cwd=ROOT,
        env={**base_env(), "COLUMNS": "200", **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _job_id(output: str) -> str:
    for word in output.split():
        if len(word) == 36 and word.count("-") == 4:
            return word
    raise AssertionError(f"no job id in {output!r}")


def test_submit_follows_the_job_to_completion(local_service: Service) -> None:
    """`jobq submit` posts the pitch, follows the stream, lists artifacts and exits 0 when done."""
    result = jobq(
        local_service,
        "submit",
        "--title",
        "CLI Solar",
        "--pitch",
        "Panels for schools.",
        "--language",
        "en",
        "--parallel-limit",
        "4",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "dossier" in result.stdout and "completed" in result.stdout
    job_id = _job_id(result.stdout)
    status = jobq(local_service, "status", job_id)
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "completed"


def test_submit_no_follow_then_status_artifacts_and_cancel(local_service: Service, tmp_path: Path) -> None:
    """--no-follow returns at once; status, artifacts (list and one) and cancel work on the id."""
    pitch = tmp_path / "pitch.txt"
    pitch.write_text("Batteries for bakeries, leased per month.", encoding="utf-8")
    result = jobq(local_service, "submit", "--title", "CLI Bake", "--pitch-file", str(pitch), "--no-follow")
    assert result.returncode == 0, result.stderr
    job_id = _job_id(result.stdout)
    follow = jobq(local_service, "submit", "--title", "CLI Bake", "--pitch-file", "-", stdin="From stdin.")
    assert follow.returncode == 0, follow.stderr
    listed = jobq(local_service, "artifacts", _job_id(follow.stdout))
    assert listed.returncode == 0
    for name in ("pitch", "sources", "section_market", "investor_score", "dossier"):
        assert name in listed.stdout
    one = jobq(local_service, "artifacts", _job_id(follow.stdout), "pitch")
    assert one.returncode == 0
    assert json.loads(one.stdout)["data"]["pitch"] == "From stdin."
    cancelled = jobq(local_service, "cancel", job_id)
    assert cancelled.returncode == 0 and job_id in cancelled.stdout


def test_client_errors_exit_1_with_the_servers_message(local_service: Service) -> None:
    """An invalid pitch and an unknown job exit 1 with the API's error, not a traceback."""
    bad = jobq(local_service, "submit", "--title", "x" * 201, "--pitch", "p")
    assert bad.returncode == 1
    assert "400" in bad.stderr and "project_title" in bad.stderr
    missing = jobq(local_service, "status", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1 and "404" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_unreachable_server_exits_1_with_a_message() -> None:
    """A client command against a closed port says it cannot reach the server."""
    result = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "status", "x", "--url", "http://127.0.0.1:9"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr


def test_submit_needs_exactly_one_pitch_source() -> None:
    """Neither or both of --pitch/--pitch-file is a usage error (exit 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "handlers.cli", "submit", "--title", "t"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--pitch" in result.stderr


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("path", ["nosuchuser:wrong-password@", "/99"], ids=["password", "database"])
def test_a_redis_url_that_redis_refuses_stops_the_process_with_one_line(command: str, path: str) -> None:
    """A wrong password or a database Redis does not have ends `jobq serve` and `jobq worker`
    at start (exit 2, one line naming the variable) instead of retrying it forever."""
    base = redis_url()
    url = base.replace("redis://", "redis://" + path) if path.endswith("@") else base.rstrip("/") + path
    result = subprocess.run(
        [sys.executable, "-m", "handlers.cli", command, "--port", str(free_port())]
        if command == "serve"
        else [sys.executable, "-m", "handlers.cli", command],
        cwd=ROOT,
        env={**base_env(), "REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "REDIS_URL" in lines[0] and "refused" in lines[0], lines


def test_artifacts_dossier_as_markdown(local_service: Service) -> None:
    """`jobq artifacts ID dossier --format md` prints the dossier as the same Markdown the API serves;
    without --format the dossier is JSON as before, and md for another artifact is a usage error."""
    result = jobq(local_service, "submit", "--title", "CLI | Markdown", "--pitch", "Soap for ships.")
    assert result.returncode == 0, result.stderr + result.stdout
    job_id = _job_id(result.stdout)
    markdown = jobq(local_service, "artifacts", job_id, "dossier", "--format", "md")
    assert markdown.returncode == 0, markdown.stderr
    with local_service.client() as client:
        dossier = client.get(f"/api/jobs/{job_id}/artifacts/dossier").json()["data"]
        served = client.get(f"/api/jobs/{job_id}/dossier.md").text
    assert markdown.stdout == render_markdown(dossier) == served
    assert markdown.stdout.startswith("# CLI \\| Markdown\n")
    as_json = jobq(local_service, "artifacts", job_id, "dossier")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["data"] == dossier
    wrong = jobq(local_service, "artifacts", job_id, "pitch", "--format", "md")
    assert wrong.returncode == 2 and "--format md" in wrong.stderr


def test_live_text_follows_delta_events() -> None:
    """Recorded `delta` events build each step's text; a new attempt drops the old text, a replayed
    delta is not shown twice, and a step leaves the display once its status is completed."""
    live = LiveText()
    events = [
        ("delta", {"step": "market", "attempt": 1, "offset": 0, "text": '{"headline":"Mar'}),
        ("delta", {"step": "team", "attempt": 1, "offset": 0, "text": '{"headline":"Team A"'}),
        ("delta", {"step": "market", "attempt": 1, "offset": 16, "text": 'ket one","bullets":["a'}),
        ("delta", {"step": "market", "attempt": 1, "offset": 16, "text": 'ket one","bullets":["a'}),
    ]
    for kind, data in events:
        live.event(kind, data)
    assert live.tail(80) == [
        ("market", ["headline: Market one", "bullets:", "  - a"]),
        ("team", ["headline: Team A"]),
    ]
    live.event("delta", {"step": "market", "attempt": 2, "offset": 0, "text": '{"headline":"Retry'})
    live.event("delta", {"step": "market", "attempt": 1, "offset": 38, "text": "late old text"})
    assert live.tail(80)[0] == ("market (attempt 2)", ["headline: Retry"])
    live.event("status", {"steps": {"market": "running", "team": "completed"}})
    assert [label for label, _ in live.tail(80)] == ["market (attempt 2)"]
    live.event("done", {"status": "completed"})
    assert live.tail(80) == []


def test_live_text_shows_the_tail_of_a_long_answer() -> None:
    """Only the last lines of a long answer show, wrapped to the terminal, marked as cut with '…'."""
    live = LiveText()
    narrative = " ".join(f"word{i}" for i in range(60))
    text = json.dumps({"headline": "H", "bullets": ["one", "two"], "narrative": narrative})
    for offset in range(0, len(text), 7):
        piece = text[offset : offset + 7]
        live.event("delta", {"step": "gtm", "attempt": 1, "offset": offset, "text": piece})
    [(label, lines)] = live.tail(40)
    assert label == "gtm" and len(lines) == LiveText.LINES
    assert lines[0].startswith("…") and lines[-1].endswith("word59")
    assert all(len(line) <= 41 for line in lines)


def test_readable_turns_partial_json_into_lines() -> None:
    """A model's JSON cut mid-string reads as key: value lines with escapes decoded; other text stays."""
    partial = '{"headline":"Caf\\u00e9 \\"Nord\\"","data":{"tam_eur":1200,"note":"line1\\nline2'
    assert readable(partial) == 'headline: Café "Nord"\ndata:\n  tam_eur: 1200\n  note: line1\nline2'
    assert readable('```json\n["a",') == "- a"
    assert readable("plain prose") == "plain prose"


ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""Colours and cursor moves of a terminal display, to read the text it shows."""


@pytest.fixture(scope="module")
def slow_local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _local_service(tmp_path_factory, "cli-slow", 600)


def test_submit_live_shows_the_text_being_written(slow_local_service: Service) -> None:
    """`jobq submit --live` on a terminal shows, under the bar, the running steps' text as the models
    write it (from the stream's delta events); without --live the output has no such lines."""
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    args = ("submit", "--title", "Live Vines", "--pitch", "Drones scout vineyards.", "--language", "en")
    live = jobq(slow_local_service, *args, "--parallel-limit", "4", "--live", env=terminal)
    assert live.returncode == 0, live.stderr + live.stdout[-2000:]
    shown = ANSI_CONTROL.sub("", live.stdout)
    sections = "|".join(SECTION_STEPS)
    assert re.search(rf"▸ ({sections})\n", shown), shown[-3000:]
    assert re.search(r"headline: [A-Za-z ]+: Live Vines - ", shown)
    assert "narrative: Live Vines addresses" in shown
    plain = jobq(slow_local_service, *args, "--parallel-limit", "4", "--skip-cache", env=terminal)
    assert plain.returncode == 0, plain.stderr
    shown = ANSI_CONTROL.sub("", plain.stdout)
    assert "completed" in shown and "▸" not in shown and "headline:" not in shown


def test_submit_with_a_key_follows_by_token_and_renews_an_expired_one(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`jobq submit --api-key` streams through streamUrl's token; when a reconnect finds the
    token expired (401) it fetches the job for a fresh one and still follows it to the end."""
    workdir = tmp_path_factory.mktemp("cli-secured")
    env = {
        **base_env(),
        "JOBS_STORE_URL": f"sqlite:///{workdir / 'jobs.db'}",
        "LLM_OFFLINE_LATENCY_MS": "3000",  # the job runs well past the token's 10 s
        "API_KEYS": "key-cli:cli",
        "STREAM_TOKEN_TTL_S": "10",
    }
    service = Service(backend="local", env=env, log_dir=workdir).start()
    try:
        argv = [sys.executable, "-m", "handlers.cli", "submit", "--title", "Token CLI"]
        argv += ["--pitch", "Panels for schools.", "--api-key", "key-cli", "--url", service.base_url]
        client = subprocess.Popen(
            argv, cwd=ROOT, env={**base_env(), "COLUMNS": "200"}, stdout=subprocess.PIPE, text=True
        )
        time.sleep(11)  # past the token's lifetime, the job still running
        service.restart()  # the stream breaks; the CLI reconnects with an expired token
        out, _ = client.communicate(timeout=120)
        assert client.returncode == 0, out
        log = (workdir / "web.log").read_text()
        assert "/stream?token=[redacted]&deltas=0 HTTP/1.1\" 401" in log  # the refused reconnect
        assert "api_key" not in log and "key-cli" not in log
        with service.client(headers={"X-API-Key": "key-cli"}) as keyed:
            assert keyed.get(f"/api/jobs/{_job_id(out)}").json()["status"] == "completed"
    finally:
        service.stop()
