"""The local backend's store: one SQLite file (or ``:memory:``) through aiosqlite.

Readers of the event log wait on an in-process condition, which is enough here:
on the local backend the worker runs in the web process.
"""

from __future__ import annotations

import asyncio
import json
import time

from adapters.sqlite_db import SqliteDatabase
from pipeline.model import (
    JSON,
    Artifact,
    Commit,
    Event,
    Expect,
    Job,
    list_cursor,
    parse_list_cursor,
)
from pipeline.ports import JobStore
from pipeline.vocabulary import ACTIVE_STATUSES, IDEMPOTENCY_TTL_S


class SqliteStore(SqliteDatabase, JobStore):
    """``JobStore`` on SQLite. ``path`` is a file path or ``":memory:"``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._event_waiters: dict[str, asyncio.Condition] = {}

    async def _load(self, job_id: str) -> Job | None:
        """The job, for a caller that holds ``_lock``."""
        row = await self._row("SELECT doc FROM jobs WHERE id=?", (job_id,))
        return Job.from_dict(json.loads(row[0])) if row else None

    async def _create(self, job: Job) -> tuple[Job, bool]:
        return await self._create_with_events(job, ())

    async def _create_with_events(
        self, job: Job, events: tuple[tuple[str, JSON], ...]
    ) -> tuple[Job, bool]:
        async with self._write():
            if job.idempotency_key:
                row = await self._row(
                    "SELECT job_id, created_at FROM idempotency WHERE tenant=? AND key=?",
                    (job.tenant, job.idempotency_key),
                )
                if row and time.time() - row[1] < IDEMPOTENCY_TTL_S:
                    existing = await self._load(row[0])
                    if existing is not None:
                        return existing, False
                await self.db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                    (job.tenant, job.idempotency_key, job.id, time.time()),
                )
            await self.db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?)",
                (job.id, job.tenant, job.status, job.created_at, json.dumps(job.to_dict())),
            )
            if events:
                await self._insert_events(job.id, events)
        if events:
            await self._notify(job.id)
        return job, True

    async def _get(self, job_id: str) -> Job | None:
        async with self._lock:
            return await self._load(job_id)

    async def _update(self, job_id: str, expect: Expect, changes: JSON) -> Job | None:
        return await self._update_with_events(job_id, expect, changes, ())

    async def _update_with_events(
        self,
        job_id: str,
        expect: Expect,
        changes: JSON,
        events: tuple[tuple[str, JSON], ...],
    ) -> Job | None:
        async with self._write():
            updated = await self._apply_update(job_id, expect, changes)
            if updated is not None and events:
                await self._insert_events(job_id, events)
        if updated is not None and events:
            await self._notify(job_id)
        return updated

    async def _commit(self, job_id: str, batch: Commit) -> bool:
        """One transaction for the whole batch."""
        async with self._write():
            job = await self._load(job_id)
            if batch.expect.attempts is not None and (
                job is None or job.attempts != batch.expect.attempts
            ):
                return False
            for artifact in batch.artifacts:
                await self._insert_artifact(job_id, artifact)
            for key, artifact in batch.cache:
                await self.db.execute(
                    "INSERT OR REPLACE INTO cache VALUES (?, ?)", (key, json.dumps(artifact.to_dict()))
                )
            if batch.traces:
                await self.db.executemany(
                    "INSERT INTO trace (job_id, doc) VALUES (?, ?)",
                    [(job_id, json.dumps(record)) for record in batch.traces],
                )
            # the artifact, cache and trace rows above leave the job row as loaded
            updated = await self._apply(job, batch.expect, batch.changes)
            if updated is not None and batch.events:
                await self._insert_events(job_id, batch.events)
        if updated is not None and batch.events:
            await self._notify(job_id)
        return updated is not None

    async def _apply_update(self, job_id: str, expect: Expect, changes: JSON) -> Job | None:
        """The compare-and-set, inside the caller's lock and transaction."""
        return await self._apply(await self._load(job_id), expect, changes)

    async def _apply(self, job: Job | None, expect: Expect, changes: JSON) -> Job | None:
        """``_apply_update`` of a job the caller loaded in the same transaction."""
        if job is None or not expect.holds(job):
            return None
        updated = Job.from_dict({**job.to_dict(), **changes})
        await self.db.execute(
            "UPDATE jobs SET status=?, doc=? WHERE id=?",
            (updated.status, json.dumps(updated.to_dict()), job.id),
        )
        return updated

    async def _delete(self, job_id: str) -> None:
        async with self._write():
            for table, column in (
                ("jobs", "id"),
                ("idempotency", "job_id"),
                ("artifacts", "job_id"),
                ("events", "job_id"),
                ("trace", "job_id"),
                ("cancels", "job_id"),
            ):
                await self.db.execute(f"DELETE FROM {table} WHERE {column}=?", (job_id,))

    async def _list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        where: list[str] = []
        args: list[str | float] = []
        if tenant is not None:
            where.append("tenant=?")
            args.append(tenant)
        if status:
            where.append("status=?")
            args.append(status)
        if cursor:
            created, job_id = parse_list_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [created, created, job_id]
        sql = "SELECT doc FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = await self._read_rows(sql, (*args, limit + 1))
        jobs = [Job.from_dict(json.loads(r[0])) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = jobs[-1]
            next_cursor = list_cursor(last)
        return jobs, next_cursor

    async def _count_by_status(self) -> dict[str, int]:
        rows = await self._read_rows("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {status: count for status, count in rows}

    async def _unfinished_job_ids(self) -> list[str]:
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        rows = await self._read_rows(
            f"SELECT id FROM jobs WHERE status IN ({marks}) ORDER BY created_at",
            tuple(sorted(ACTIVE_STATUSES)),
        )
        return [row[0] for row in rows]

    # -- artifacts and cache ---------------------------------------------

    async def _put_artifact(self, job_id: str, artifact: Artifact) -> None:
        async with self._write():
            await self._insert_artifact(job_id, artifact)

    async def _insert_artifact(self, job_id: str, artifact: Artifact) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO artifacts VALUES (?, ?, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM artifacts WHERE job_id=?), ?)",
            (job_id, artifact.name, job_id, json.dumps(artifact.to_dict())),
        )

    async def _get_artifact(self, job_id: str, name: str) -> Artifact | None:
        row = await self._read_row(
            "SELECT doc FROM artifacts WHERE job_id=? AND name=?", (job_id, name)
        )
        return Artifact.from_dict(json.loads(row[0])) if row else None

    async def _list_artifacts(self, job_id: str) -> list[Artifact]:
        rows = await self._read_rows(
            "SELECT doc FROM artifacts WHERE job_id=? ORDER BY seq", (job_id,)
        )
        return [Artifact.from_dict(json.loads(r[0])) for r in rows]

    async def _cache_get(self, key: str) -> Artifact | None:
        row = await self._read_row("SELECT doc FROM cache WHERE key=?", (key,))
        return Artifact.from_dict(json.loads(row[0])) if row else None

    async def _cache_get_many(self, keys: list[str]) -> list[Artifact | None]:
        rows = await self._rows_in("SELECT key, doc FROM cache WHERE key IN ({marks})", keys)
        found = {key: Artifact.from_dict(json.loads(doc)) for key, doc in rows}
        return [found.get(key) for key in keys]

    async def _cache_put(self, key: str, artifact: Artifact) -> None:
        async with self._write():
            await self.db.execute(
                "INSERT OR REPLACE INTO cache VALUES (?, ?)", (key, json.dumps(artifact.to_dict()))
            )

    # -- events and trace -------------------------------------------------

    def _condition(self, job_id: str) -> asyncio.Condition:
        cond = self._event_waiters.get(job_id)
        if cond is None:
            cond = self._event_waiters[job_id] = asyncio.Condition()
        return cond

    async def _append_event(self, job_id: str, type: str, data: JSON) -> Event:
        async with self._write():
            (event,) = await self._insert_events(job_id, ((type, data),))
        await self._notify(job_id)
        return event

    async def _insert_events(
        self, job_id: str, events: tuple[tuple[str, JSON], ...]
    ) -> list[Event]:
        """Append with the next ids of this job, inside the caller's lock and transaction."""
        row = await self._row("SELECT COALESCE(MAX(id), 0) FROM events WHERE job_id=?", (job_id,))
        last = int(row[0]) if row else 0
        appended = [Event(last + n, type, data) for n, (type, data) in enumerate(events, 1)]
        await self.db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?)",
            [(job_id, e.id, e.type, json.dumps(e.data)) for e in appended],
        )
        return appended

    async def _notify(self, job_id: str) -> None:
        cond = self._condition(job_id)
        async with cond:
            cond.notify_all()

    async def _fetch_events(self, job_id: str, after: int) -> list[Event]:
        rows = await self._read_rows(
            "SELECT id, type, data FROM events WHERE job_id=? AND id>? ORDER BY id", (job_id, after)
        )
        return [Event(r[0], r[1], json.loads(r[2])) for r in rows]

    async def _read_events(self, job_id: str, after: int, wait_s: float) -> list[Event]:
        events = await self._fetch_events(job_id, after)
        if events or wait_s <= 0:
            return events
        cond = self._condition(job_id)
        async with cond:
            events = await self._fetch_events(job_id, after)
            if events:
                return events
            try:
                async with asyncio.timeout(wait_s):  # not wait_for: it can swallow a cancel
                    await cond.wait()
            except TimeoutError:
                return []
        return await self._fetch_events(job_id, after)

    async def _add_trace(self, job_id: str, record: JSON) -> None:
        async with self._write():
            await self.db.execute(
                "INSERT INTO trace (job_id, doc) VALUES (?, ?)", (job_id, json.dumps(record))
            )

    async def _get_trace(self, job_id: str) -> list[JSON]:
        rows = await self._read_rows("SELECT doc FROM trace WHERE job_id=? ORDER BY seq", (job_id,))
        return [json.loads(r[0]) for r in rows]

    # -- cancellation -----------------------------------------------------

    async def _request_cancel(self, job_id: str) -> None:
        async with self._write():
            await self.db.execute("INSERT OR IGNORE INTO cancels VALUES (?)", (job_id,))

    async def _cancel_requested(self, job_id: str) -> bool:
        return await self._read_row("SELECT 1 FROM cancels WHERE job_id=?", (job_id,)) is not None

    # -- spend counters -----------------------------------------------------

    async def _add_spend(self, counter: str, micro_usd: int, cap: int | None, ttl_s: int) -> int | None:
        """One upsert statement, so the check and the add are atomic even with other
        processes on the same file; an expired row counts as 0."""
        now = time.time()
        capped = cap is not None and micro_usd > 0
        limit = cap if cap is not None else 0
        async with self._write():
            row = await self._row(_ADD_SPEND, (
                counter, micro_usd, now + ttl_s, capped, micro_usd, limit,
                now, capped, now, limit,
            ))
            if row is not None and int(row[0]) == micro_usd:  # a new counter: drop expired ones
                await self.db.execute("DELETE FROM spend WHERE expires_at <= ?", (now,))
        return None if row is None else int(row[0])

    async def _spent(self, counter: str) -> int:
        row = await self._read_row(
            "SELECT micro_usd FROM spend WHERE counter=? AND expires_at > ?", (counter, time.time())
        )
        return int(row[0]) if row else 0

    async def _cancel_requested_many(self, job_ids: list[str]) -> set[str]:
        rows = await self._rows_in("SELECT job_id FROM cancels WHERE job_id IN ({marks})", job_ids)
        return {row[0] for row in rows}


_ADD_SPEND = """
INSERT INTO spend (counter, micro_usd, expires_at)
SELECT ?, ?, ? WHERE NOT ? OR ? <= ?
ON CONFLICT (counter) DO UPDATE SET
    micro_usd = (CASE WHEN spend.expires_at > ? THEN spend.micro_usd ELSE 0 END) + excluded.micro_usd,
    expires_at = excluded.expires_at
WHERE NOT ? OR (CASE WHEN spend.expires_at > ? THEN spend.micro_usd ELSE 0 END) + excluded.micro_usd <= ?
RETURNING micro_usd
"""
"""Add to a spend counter; with the cap flag set, only while the total stays within the
cap (a refused add returns no row). Parameters: counter, amount, expiry, capped,
amount, cap (a new row), then now (the update), capped, now, cap (its condition)."""
