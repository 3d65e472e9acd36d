"""The ``jobq`` command: run the service (``serve``, ``worker``) and use it
(``submit`` with a progress bar and, with ``--live``, the text being written;
``status``, ``cancel``, ``artifacts``, the dossier as Markdown)."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from handlers.cli_live import LiveProgress, LiveText
from handlers.settings import Settings, SettingsError
from pipeline.dossier_markdown import render_markdown

app = typer.Typer(help="Async job system for long LLM pipelines.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="JOBQ_URL", help="Base URL of a running server.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="JOBQ_API_KEY", help="API key, when the server requires one."),
]
DEFAULT_URL = "http://127.0.0.1:8000"
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.25, 5.0
"""A broken stream is reopened after 0.25 s, then after twice as long each time, up to 5 s."""
RECONNECT_GIVE_UP_S = 300.0
"""Following gives up after this long without any event (the server down all along)."""


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """Settings from the environment; a bad value prints one line naming it and exits 2."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        _fail(f"jobq: configuration error: {exc}", 2)


REDIS_URL_VARIABLES = ("REDIS_URL", "REDISCLOUD_URL", "JOBS_QUEUE_URL", "JOBS_STORE_URL")


def check_redis(settings: Settings) -> None:
    """Exit 2 with one line when Redis refuses the configured URL (wrong password or user,
    no such database): a server process would otherwise retry it forever. A Redis that
    does not answer yet is no error: the processes connect once it does."""
    if settings.backend != "redis":
        return
    import asyncio

    from adapters.redis_store import RedisRefused, check_credentials

    for url in dict.fromkeys((settings.queue_url, settings.store_url)):
        try:
            asyncio.run(check_credentials(url))
        except RedisRefused as exc:
            variable = next(
                (v for v in REDIS_URL_VARIABLES if os.environ.get(v, "").strip() == url), "REDIS_URL"
            )
            _fail(f"jobq: configuration error: {variable}: Redis refused the connection: {exc}", 2)


GC_THRESHOLDS = (20_000, 20, 10)
"""The web process's collector thresholds (CPython's default: 700, 10, 10)."""


def tune_gc_for_streams() -> None:
    """Ready the web process's garbage collector for thousands of open streams.

    With the default thresholds, objects that live a fraction of a second (an event on
    its way to a stream) outlive two young collections and reach the oldest generation,
    where they pile up until a full collection walks every object of every open stream,
    stalling all of them at once. A larger first threshold lets them die young; what
    start-up built (modules, the app) is frozen out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PORT).")] = None,
) -> None:
    """Run the web app. On the local backend the worker runs in this process too."""
    settings = load_settings()
    from handlers.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    check_redis(settings)
    import uvicorn

    from handlers.app import create_app
    from handlers.bootstrap import bootstrap

    try:
        application = create_app(bootstrap(settings))
    except (RuntimeError, ValueError) as exc:
        _fail(f"jobq: cannot start: {exc}", 2)
    tune_gc_for_streams()
    uvicorn.run(
        application,
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        timeout_graceful_shutdown=5,
        proxy_headers=True,
        # Thousands of SSE clients reconnect at once after a deploy; the kernel caps
        # this at net.core.somaxconn. No limit_concurrency: it would refuse streams.
        # HTTP: httptools (a dependency) when installed, else h11.
        backlog=4096,
    )


@app.command()
def worker() -> None:
    """Run a queue worker (redis and aws backends)."""
    settings = load_settings()
    from handlers.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    if settings.backend == "local":
        _fail(
            "jobq: the local backend runs its worker inside `jobq serve`; "
            "set REDIS_URL (or JOBS_QUEUE_URL=sqs://...) for a separate worker.",
            2,
        )
    if settings.backend == "redis":
        check_redis(settings)
        from handlers.saq_worker import run_worker

        run_worker(settings)
    else:
        from handlers.aws import run_sqs_worker

        run_sqs_worker(settings)


def _client(url: str, api_key: str | None, timeout: float | None = 30.0) -> httpx.Client:
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"jobq: cannot reach {client.base_url}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = {"error": "bad_response", "message": response.text[:200]}
    if response.status_code >= 400:
        detail = "; ".join(f"{d.get('field')}: {d.get('message')}" for d in body.get("details", []))
        suffix = f" - {detail}" if detail else ""
        message = body.get("message", "")
        _fail(f"jobq: {response.status_code} {body.get('error')}: {message}{suffix}")
    return body


@app.command()
def submit(
    title: Annotated[str, typer.Option("--title", help="Project title.")],
    pitch: Annotated[str | None, typer.Option("--pitch", help="Elevator pitch text.")] = None,
    pitch_file: Annotated[
        Path | None, typer.Option("--pitch-file", help="Read the pitch from a file ('-' = stdin).")
    ] = None,
    language: Annotated[str, typer.Option(help="de or en.")] = "de",
    target: Annotated[str | None, typer.Option(help="Target investors.")] = None,
    geo: Annotated[str | None, typer.Option(help="Region.")] = None,
    parallel_limit: Annotated[int | None, typer.Option(help="Max concurrent LLM calls (1-16).")] = None,
    timeout_ms: Annotated[int | None, typer.Option(help="Deadline of the whole job.")] = None,
    max_cost_usd: Annotated[
        float | None, typer.Option(help="Cost cap of the job in USD (needs LLM_PRICES on the server).")
    ] = None,
    skip_cache: Annotated[bool, typer.Option("--skip-cache", help="Do not read the step cache.")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Idempotency-Key header.")] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Follow the job's progress.")] = True,
    live: Annotated[
        bool,
        typer.Option("--live", help="Show the text each running step's model is writing under the bar."),
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Submit a pitch to a running server and follow it with a progress bar."""
    if (pitch is None) == (pitch_file is None):
        _fail("jobq: give exactly one of --pitch or --pitch-file", 2)
    if pitch_file is not None:
        pitch = sys.stdin.read() if str(pitch_file) == "-" else pitch_file.read_text(encoding="utf-8")
    body: dict[str, Any] = {"project_title": title, "elevator_pitch": pitch, "language": language}
    optional = {
        "target": target,
        "geo": geo,
        "parallel_limit": parallel_limit,
        "timeout_ms": timeout_ms,
        "max_cost_usd": max_cost_usd,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if skip_cache:
        body["skip_cache"] = True
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(url, api_key) as client:
        created = _call(client, "POST", "/api/jobs", json=body, headers=headers)
        job_id = created["jobId"]
        console.print(f"job [bold]{job_id}[/bold] {created['status']}")
        if not follow:
            console.print(f"follow it: jobq status {job_id} --url {url}")
            return
    status = follow_job(url, api_key, job_id, live=live, stream_url=created.get("streamUrl"))
    console.print(f"the dossier: jobq artifacts {job_id} dossier --url {url}")
    raise typer.Exit(0 if status == "completed" else 1)


def _with_query(path: str, query: str) -> str:
    return path + ("&" if "?" in path else "?") + query


def follow_job(
    url: str, api_key: str | None, job_id: str, *, live: bool = False, stream_url: str | None = None
) -> str:
    """Follow the SSE stream to ``done``, reconnecting with Last-Event-ID; returns the status.
    ``live`` shows the running steps' text from ``delta`` events; without it the stream
    is asked to leave them out. ``stream_url`` (the job's ``streamUrl``) opens the stream
    with its token, the key staying out of the stream request; when the token has expired
    the job is fetched again, with the key, for a fresh one."""
    from httpx_sse import connect_sse

    last_id: str | None = None
    writing = LiveText() if live else None
    base = stream_url or f"/api/jobs/{job_id}/stream"
    path = base if live else _with_query(base, "deltas=0")
    final = "unknown"
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counter]}"),
        TimeElapsedColumn(),
    )
    with (
        LiveProgress(*columns, console=console, writing=writing) as progress,
        _client(url, None if stream_url else api_key, timeout=None) as client,
    ):
        task = progress.add_task("queued", total=100, counter="")
        backoff = RECONNECT_FIRST_S
        give_up = time.monotonic() + RECONNECT_GIVE_UP_S
        renewed = False
        while time.monotonic() < give_up:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", path, headers=headers) as source:
                    if source.response.status_code == 401 and stream_url and not renewed:
                        source.response.read()
                        renewed = True  # once per refusal: a fresh token refused too is an error
                        with _client(url, api_key) as keyed:
                            fresh = _call(keyed, "GET", f"/api/jobs/{job_id}")["streamUrl"]
                        stream_url = fresh
                        path = fresh if live else _with_query(fresh, "deltas=0")
                        continue
                    if source.response.status_code >= 400:
                        source.response.read()
                        code = source.response.status_code
                        _fail(f"jobq: stream answered {code}: {source.response.text}")
                    for event in source.iter_sse():
                        renewed = False
                        backoff = RECONNECT_FIRST_S
                        give_up = time.monotonic() + RECONNECT_GIVE_UP_S
                        last_id = event.id or last_id
                        data = json.loads(event.data) if event.data else {}
                        if writing is not None:
                            writing.event(event.event, data)
                        _show(progress, task, event.event, data)
                        if event.event == "done":
                            return str(data.get("status", final))
                        if event.event == "status":
                            final = str(data.get("status", final))
            except httpx.HTTPError as exc:
                progress.console.print(
                    f"[yellow]stream interrupted ({exc}); reconnecting in {backoff:.1f} s[/yellow]"
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
        progress.console.print(f"[red]no event for {RECONNECT_GIVE_UP_S:.0f} s; giving up[/red]")
    return final


def _show(progress: Progress, task: Any, kind: str, data: dict[str, Any]) -> None:
    if kind == "status":
        p = data.get("progress") or {}
        progress.update(
            task,
            completed=p.get("percentage", 0),
            description=f"{data.get('status', '')} {p.get('step') or ''}".strip(),
            counter=f"{p.get('currentStep', 0)}/{p.get('totalSteps', 15)}",
        )
    elif kind == "artifact_written":
        progress.console.print(
            f"  [green]✓[/green] {data.get('name')} ({data.get('type')}, {data.get('size')} B)"
        )
    elif kind == "result":
        progress.console.print(f"[bold green]completed[/bold green] {_summary(data)}")
    elif kind == "error":
        code, step = data.get("code"), data.get("step")
        progress.console.print(f"[bold red]{code}[/bold red] {data.get('message')} (step {step})")


def _summary(result: dict[str, Any]) -> str:
    """One line from the ``result`` event: verdict, score and what it cost."""
    data = result.get("data") or {}
    meta = result.get("meta") or {}
    score = data.get("investor_score") or {}
    parts = []
    if score.get("verdict"):
        parts.append(f"verdict {score['verdict']} (score {score.get('score_total')})")
    parts.append(f"{meta.get('llm_calls', '?')} LLM calls, {meta.get('cache_hits', 0)} cached")
    if "duration_ms" in meta:
        parts.append(f"{meta['duration_ms'] / 1000:.1f} s")
    return " · ".join(parts)


@app.command()
def status(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Print a job's status document."""
    with _client(url, api_key) as client:
        console.print_json(data=_call(client, "GET", f"/api/jobs/{job_id}"))


@app.command()
def cancel(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Cancel a job (idempotent)."""
    with _client(url, api_key) as client:
        body = _call(client, "POST", f"/api/jobs/{job_id}/cancel")
    console.print(f"job {body['jobId']}: {body['status']} ({body.get('message', '')})")


@app.command()
def artifacts(
    job_id: str,
    name: Annotated[str | None, typer.Argument(help="Print this artifact in full.")] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="json (default), or md: the dossier as Markdown (with NAME dossier).",
            case_sensitive=False,
        ),
    ] = "json",
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """List a job's artifacts, or print one (the dossier also as Markdown)."""
    output_format = output_format.lower()
    if output_format not in ("json", "md"):
        _fail("jobq: --format is json or md", 2)
    if output_format == "md" and name != "dossier":
        _fail("jobq: --format md prints the dossier: jobq artifacts ID dossier --format md", 2)
    with _client(url, api_key) as client:
        if output_format == "md":
            dossier = _call(client, "GET", f"/api/jobs/{job_id}/artifacts/dossier")["data"]
            sys.stdout.write(render_markdown(dossier))
            return
        if name is not None:
            console.print_json(data=_call(client, "GET", f"/api/jobs/{job_id}/artifacts/{name}"))
            return
        body = _call(client, "GET", f"/api/jobs/{job_id}/artifacts")
    table = Table("name", "type", "size", "hash", title=f"artifacts of {job_id}")
    for item in body["artifacts"]:
        table.add_row(item["name"], item["type"], str(item["size"]), item["hash"][:16])
    console.print(table)


if __name__ == "__main__":
    app()
