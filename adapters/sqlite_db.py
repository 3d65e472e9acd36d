"""The local backend's SQLite connection: one aiosqlite connection per store, its
schema, and the transaction and read discipline every query of the store follows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from pipeline.model import StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, id)
);
CREATE TABLE IF NOT EXISTS trace (
    job_id TEXT NOT NULL,
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trace_job ON trace (job_id);
CREATE TABLE IF NOT EXISTS cancels (
    job_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS spend (
    counter TEXT PRIMARY KEY,
    micro_usd INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""



class SqliteDatabase:
    """One SQLite file (or ``":memory:"``) through aiosqlite, shared by every task of
    the process; writes are transactions under one lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(self.path)
        except Exception as exc:  # aiosqlite raises sqlite3 errors of several kinds
            raise StoreUnavailable(f"sqlite: cannot open {self.path}: {exc}") from exc
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        await db.commit()
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("sqlite store is not open")
        return self._db

    async def ping(self) -> None:
        try:
            await self.db.execute("SELECT 1")
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query, read in one call on aiosqlite's thread, by a caller
        that holds ``_lock`` (a read inside a write). A cursor read in two steps
        (execute, then fetch) lets another task's write on the same connection run in
        between, and SQLite leaves such a read undefined (a ``GROUP BY status`` once
        counted a job under ``NULL``)."""
        return list(await self.db.execute_fetchall(sql, params))

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One transaction under ``_lock``: committed when the block ends, rolled back
        when it raises. Without the rollback, the next write's commit would store the
        half of a failed commit that ran (artifacts without their job update)."""
        async with self._lock:
            try:
                yield
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()

    async def _read_rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """``_rows`` for a reader: under ``_lock``, so never between the statements of
        a write. Every task shares one connection, which sees its own uncommitted
        rows: the API could show an artifact that a crash before the commit then lost."""
        async with self._lock:
            return await self._rows(sql, params)

    async def _read_row(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._read_rows(sql, params)
        return rows[0] if rows else None

    async def _rows_in(self, sql: str, values: list[str]) -> list[Any]:
        """Rows of ``sql``, whose ``IN ({marks})`` is filled with ``values`` in chunks
        (SQLite caps the bound parameters of one statement)."""
        rows: list[Any] = []
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            rows.extend(
                await self._read_rows(sql.format(marks=",".join("?" * len(chunk))), chunk)
            )
        return rows
