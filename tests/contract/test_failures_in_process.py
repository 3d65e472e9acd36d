"""Failures of the backends as the HTTP layer shows them: 503, bounded health, no stack trace.

These need a store or queue that breaks on purpose, so they run the app in process
(Litestar's TestClient over the real ASGI app) on the SQLite store, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from adapters.local_queue import LocalQueue
from adapters.sqlite_store import SqliteStore
from handlers.app import create_app
from handlers.bootstrap import bootstrap
from handlers.settings import Settings
from pipeline.model import JSON, Job, StoreUnavailable
from tests.contract.helpers import body


class BrokenQueue(LocalQueue):
    """A queue whose broker is down."""

    async def ping(self) -> None:
        raise StoreUnavailable("broker refused the connection")

    async def _enqueue(self, job_id: str, timeout_s: float, tenant: str) -> None:
        raise StoreUnavailable("broker refused the connection")


class HangingStore(SqliteStore):
    """A store whose server accepts connections and never answers a ping."""

    async def ping(self) -> None:
        await asyncio.sleep(30)


class ExplodingStore(SqliteStore):
    async def _list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        raise RuntimeError("secret internal detail /etc/jobq.conf")

    async def _get_trace(self, job_id: str) -> list[JSON]:
        raise StoreUnavailable("store went away")


def _client(tmp_path: Path, *, store: SqliteStore, broken_queue: bool = False) -> TestClient[Litestar]:
    settings = Settings.from_env({"JOBS_STORE_URL": f"sqlite:///{tmp_path / 'jobs.db'}"})
    queue = None
    if broken_queue:
        queue = BrokenQueue(lambda _job_id: asyncio.sleep(0), store)
    container = bootstrap(settings, store=store, queue=queue)
    return TestClient(create_app(container), raise_server_exceptions=False)


@pytest.fixture
def broken_queue_client(tmp_path: Path) -> Iterator[tuple[TestClient[Litestar], SqliteStore]]:
    store = SqliteStore(str(tmp_path / "jobs.db"))
    with _client(tmp_path, store=store, broken_queue=True) as client:
        yield client, store


def test_submit_when_queue_is_down_is_503_and_leaves_nothing(
    broken_queue_client: tuple[TestClient[Litestar], SqliteStore],
) -> None:
    """POST /api/jobs with the queue unreachable answers 503 and no job remains."""
    client, store = broken_queue_client
    for path in ("/api/jobs", "/api/v2/auto"):
        response = client.post(path, json=body())
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert "Retry-After" in response.headers
    assert client.get("/api/jobs").json()["jobs"] == []
    with client.portal() as portal:
        assert sum(portal.call(store.count_by_status).values()) == 0


def test_health_reports_503_when_the_queue_is_down(
    broken_queue_client: tuple[TestClient[Litestar], SqliteStore],
) -> None:
    """Health answers 503 with status error and the reason."""
    client, _ = broken_queue_client
    for path in ("/api/jobs/health", "/api/v2/health"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.json()["status"] == "error" and "refused" in response.json()["error"]


def test_health_answers_even_when_the_store_hangs(tmp_path: Path) -> None:
    """A store that never answers a ping makes health answer 503 instead of hanging."""
    with _client(tmp_path, store=HangingStore(str(tmp_path / "jobs.db"))) as client:
        response = client.get("/api/jobs/health", timeout=10)
    assert response.status_code == 503
    assert "did not answer" in response.json()["error"]


def test_unexpected_errors_are_500_json_without_internals(tmp_path: Path) -> None:
    """An unexpected exception answers 500 {"error": ...} with no trace or internal detail."""
    with _client(tmp_path, store=ExplodingStore(str(tmp_path / "jobs.db"))) as client:
        response = client.get("/api/jobs")
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error", "message": "internal server error"}
        assert "secret" not in response.text and "Traceback" not in response.text
        job_id = client.post("/api/jobs", json=body()).json()["jobId"]
        unavailable = client.get(f"/api/jobs/{job_id}/trace")
        assert unavailable.status_code == 503 and unavailable.json()["error"] == "unavailable"
