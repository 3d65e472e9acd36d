"""SQLite store specifics: one connection shared by every task must still give each
reader only committed data, and a failed write must leave nothing behind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.sqlite_store import SqliteStore
from pipeline.model import Artifact, Job
from pipeline.vocabulary import JobStatus


class _SlowEvents(SqliteStore):
    """Pauses inside a commit's transaction, after its artifacts are written."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.inside = asyncio.Event()

    async def _insert_events(self, job_id: str, events: Any) -> Any:
        self.inside.set()
        await asyncio.sleep(0.2)
        return await super()._insert_events(job_id, events)


def _artifact(name: str) -> Artifact:
    return Artifact(name=name, type="section", data={"n": name}, hash="0" * 64, timestamp=1, size=10)


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[_SlowEvents]:
    store = _SlowEvents(str(tmp_path / "jobs.db"))
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def on_file(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "jobs.db"))
    await store.open()
    yield store
    await store.close()


async def test_a_reader_never_sees_a_commit_that_has_not_ended(slow: _SlowEvents) -> None:
    """An artifact read while its commit is still open is not returned before the commit ends."""
    job, _ = await slow.create(Job(id=uuid.uuid4().hex, tenant="t", request={}))
    commit = asyncio.create_task(
        slow.commit(job.id, artifacts=[_artifact("brief")], events=[("status", {"n": 1})])
    )
    await slow.inside.wait()
    seen = await slow.list_artifacts(job.id)
    assert commit.done() or seen == [], "read an artifact of a transaction still open"
    assert await commit


async def test_a_failed_commit_leaves_nothing_for_the_next_write_to_store(
    on_file: SqliteStore,
) -> None:
    """A commit that fails half-way is rolled back: a later write does not store its first half."""
    job, _ = await on_file.create(Job(id=uuid.uuid4().hex, tenant="t", request={}))
    with pytest.raises(TypeError):
        await on_file.commit(job.id, artifacts=[_artifact("brief")], traces=[{"not json": object()}])
    assert await on_file.update(job.id, expect={JobStatus.QUEUED}, progress={"percentage": 7})
    assert await on_file.list_artifacts(job.id) == []
