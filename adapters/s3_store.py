"""The aws backend's store: every record is an S3 object, races are settled by
conditional writes.

Layout under ``<prefix>/``::

    jobs/<job>.json                      the job document; updated with If-Match on its ETag
    idem/<tenant>/<sha256(key)>.json     idempotency claim, written with If-None-Match: *
    index/all/<inverted ms>_<job>        empty; lists newest first (global)
    index/t/<tenant>/<inverted ms>_<job> empty; lists newest first (per tenant)
    status/<status>/<job>                empty; counts by status without reading jobs
    artifacts/<job>/<name>.json          one object per artifact
    cache/<key>.json                     step cache entries
    events/<job>/<id:010d>.json          one object per event, claimed with If-None-Match: *
    trace/<job>/<ns>-<rand>.json         one object per LLM call record
    cancel/<job>                         the cancel flag
    spend/<counter>.json                 a spend counter (cost caps): compare-and-set on its ETag

S3 is strongly consistent for reads and lists after a write, and rejects a
conditional PUT whose precondition fails with 412 (or 409 while another
conditional write to the key is in flight), so compare-and-set and "claim the
next id" are real. Expiry is the bucket's lifecycle rule (``serverless.yml``,
``JOB_TTL_S`` in days); reads also treat a job older than ``ttl_s`` as gone.
The ``status/`` markers follow the job document after each status change; a
crash between the two writes can leave a count off by one (they are stats).

The bucket access itself (boto3 in threads, JSON objects, listings, what a lost race
looks like) is :mod:`adapters.s3_objects`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
import uuid
from urllib.parse import quote, unquote

import structlog
from botocore.exceptions import ClientError

from adapters.constants import (
    ARTIFACT_KEY,
    CACHE_KEY,
    CANCEL_KEY,
    EVENTS_KEY,
    IDEMPOTENCY_KEY,
    INDEX_KEY,
    JOB_KEY,
    SPEND_KEY,
    TRACE_KEY,
)
from adapters.s3_feed import S3EventFeed
from adapters.s3_objects import S3Objects, lost_race, missing
from pipeline.model import JSON, Artifact, Conflict, Event, Expect, Job
from pipeline.ports import JobStore
from pipeline.vocabulary import ACTIVE_STATUSES, IDEMPOTENCY_TTL_S, STATUSES

log = structlog.get_logger("jobq.s3")

CAS_ATTEMPTS = 50
MAX_INDEX_SCAN = 1000
"""At most this many index keys are read per ``list_jobs`` call (status filters)."""
INVERT_MS = 10**13
LAST_EVENT_HINTS = 10_000
STATUS_MARKERS = "status"
CURSOR_RE = re.compile(r"\d{13}_[A-Za-z0-9%._~-]{1,300}")
"""An index entry name: inverted creation ms, ``_``, the quoted job id."""


class S3Store(JobStore):
    """``JobStore`` on one S3 bucket under ``prefix``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        ttl_s: int = 604800,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.ttl_s = ttl_s
        self._s3 = S3Objects(bucket, self.prefix, endpoint_url, region)
        self._last_event: dict[str, int] = {}
        self._feed = S3EventFeed(self._fetch_events)

    def _key(self, *parts: str) -> str:
        """``prefix/part/...``; a trailing ``""`` part makes a listing prefix ending in ``/``."""
        return self._s3.key(*parts)

    async def ping(self) -> None:
        await self._s3.ping()

    async def close(self) -> None:
        await self._feed.aclose()
        self._s3.close()

    # -- jobs -------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return self._key(JOB_KEY, f"{quote(job_id, safe='')}.json")

    def _index_keys(self, job: Job) -> tuple[str, str]:
        name = f"{INVERT_MS - int(job.created_at * 1000):013d}_{quote(job.id, safe='')}"
        return (
            self._key(INDEX_KEY, "all", name),
            self._key(INDEX_KEY, "t", quote(job.tenant, safe=""), name),
        )

    def _idem_key(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._key(IDEMPOTENCY_KEY, quote(tenant, safe=""), f"{digest}.json")

    def _status_key(self, status: str, job_id: str) -> str:
        return self._key(STATUS_MARKERS, status, quote(job_id, safe=""))

    async def _create(self, job: Job) -> tuple[Job, bool]:
        await self._s3.put(self._job_key(job.id), job.to_dict(), IfNoneMatch="*")
        if job.idempotency_key:
            existing = await self._claim_idempotency(job)
            if existing is not None:
                await self._s3.delete(self._job_key(job.id))
                return existing, False
        for key in (*self._index_keys(job), self._status_key(job.status, job.id)):
            await self._s3.put(key, None)
        return job, True

    async def _claim_idempotency(self, job: Job) -> Job | None:
        """Claim the tenant's key for ``job``; the earlier job when another holds it.

        The job document is written before the claim, so a claim that wins is
        always backed by a readable job."""
        assert job.idempotency_key is not None
        key = self._idem_key(job.tenant, job.idempotency_key)
        claim = {"job_id": job.id, "created_at": time.time()}
        for _ in range(CAS_ATTEMPTS):
            try:
                await self._s3.put(key, claim, IfNoneMatch="*")
                return None
            except ClientError as exc:
                if not lost_race(exc):
                    raise
            held = await self._s3.get_json(key)
            if held is None:
                continue
            (record, etag) = held
            if time.time() - float(record["created_at"]) < IDEMPOTENCY_TTL_S:
                earlier = await self._get(str(record["job_id"]))
                if earlier is not None:
                    return earlier
            try:  # expired, or its job is gone: take it over
                await self._s3.put(key, claim, IfMatch=etag)
                return None
            except ClientError as exc:
                if not (lost_race(exc) or missing(exc)):
                    raise
        raise Conflict(f"idempotency key of job {job.id} stayed contended")

    async def _get(self, job_id: str) -> Job | None:
        found = await self._s3.get_json(self._job_key(job_id))
        if found is None:
            return None
        job = Job.from_dict(found[0])
        if time.time() - job.created_at > self.ttl_s:
            return None  # expired; the bucket's lifecycle rule removes it within a day
        return job

    async def _update(self, job_id: str, expect: Expect, changes: JSON) -> Job | None:
        key = self._job_key(job_id)
        for attempt in range(CAS_ATTEMPTS):
            found = await self._s3.get_json(key)
            if found is None:
                return None
            current = Job.from_dict(found[0])
            if not expect.holds(current):
                return None
            updated = Job.from_dict({**current.to_dict(), **changes})
            try:
                await self._s3.put(key, updated.to_dict(), IfMatch=found[1])
            except ClientError as exc:
                if not (lost_race(exc) or missing(exc)):
                    raise
                await asyncio.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
                continue
            if updated.status != current.status:
                await self._s3.put(self._status_key(updated.status, job_id), None)
                await self._s3.delete(self._status_key(current.status, job_id))
            return updated
        raise Conflict(f"job {job_id} stayed contended for {CAS_ATTEMPTS} attempts")

    async def _delete(self, job_id: str) -> None:
        found = await self._s3.get_json(self._job_key(job_id))
        keys = [self._job_key(job_id), self._key(CANCEL_KEY, quote(job_id, safe=""))]
        if found is not None:
            job = Job.from_dict(found[0])
            keys += [*self._index_keys(job), self._status_key(job.status, job_id)]
            if job.idempotency_key:
                idem = self._idem_key(job.tenant, job.idempotency_key)
                claim = await self._s3.get_json(idem)
                if claim is not None and claim[0].get("job_id") == job_id:
                    keys.append(idem)
        for part in (ARTIFACT_KEY, EVENTS_KEY, TRACE_KEY):
            keys += await self._s3.list_keys(self._key(part, quote(job_id, safe=""), ""))
        await self._s3.delete_keys(keys)
        self._last_event.pop(job_id, None)

    async def _list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Walk the newest-first index; the cursor is the last index entry returned."""
        base = self._key(INDEX_KEY, "all", "") if tenant is None else self._key(
            INDEX_KEY, "t", quote(tenant, safe=""), ""
        )
        if cursor and not CURSOR_RE.fullmatch(cursor):
            raise ValueError("not a cursor this store issued")
        start = base + cursor if cursor else None
        jobs: list[Job] = []
        jobs_cursor = ""
        scanned = 0
        while scanned < MAX_INDEX_SCAN:
            keys = await self._s3.list_keys(base, start_after=start, limit=limit + 1)
            scanned += len(keys)
            job_ids = [unquote(k[len(base) :].partition("_")[2]) for k in keys]
            found = await asyncio.gather(*(self._get(j) for j in job_ids))
            for key, job in zip(keys, found, strict=True):
                if job is None or (status and job.status != status):
                    continue
                if len(jobs) == limit:
                    return jobs, jobs_cursor
                jobs.append(job)
                jobs_cursor = key[len(base) :]
            if len(keys) < limit + 1:
                return jobs, None
            start = keys[-1]
        # The scan budget ran out: the cursor continues from where it stopped.
        return jobs, start[len(base) :] if start else None

    async def _count_by_status(self) -> dict[str, int]:
        counts = await asyncio.gather(
            *(self._s3.list_keys(self._key(STATUS_MARKERS, s, "")) for s in STATUSES)
        )
        return {status: len(keys) for status, keys in zip(STATUSES, counts, strict=True)}

    async def _unfinished_job_ids(self) -> list[str]:
        ids: list[str] = []
        for status in sorted(ACTIVE_STATUSES):
            base = self._key(STATUS_MARKERS, status, "")
            ids += [unquote(k[len(base) :]) for k in await self._s3.list_keys(base)]
        jobs = [j for j in await asyncio.gather(*(self._get(i) for i in ids)) if j is not None]
        return [j.id for j in sorted(jobs, key=lambda j: j.created_at) if j.active]

    # -- artifacts and cache ---------------------------------------------

    def _artifact_key(self, job_id: str, name: str) -> str:
        return self._key(ARTIFACT_KEY, quote(job_id, safe=""), f"{name}.json")

    async def _put_artifact(self, job_id: str, artifact: Artifact) -> None:
        record = {**artifact.to_dict(), "_written_ns": time.time_ns()}
        await self._s3.put(self._artifact_key(job_id, artifact.name), record)

    async def _get_artifact(self, job_id: str, name: str) -> Artifact | None:
        found = await self._s3.get_json(self._artifact_key(job_id, name))
        return Artifact.from_dict(found[0]) if found else None

    async def _list_artifacts(self, job_id: str) -> list[Artifact]:
        keys = await self._s3.list_keys(self._key(ARTIFACT_KEY, quote(job_id, safe=""), ""))
        records = await self._s3.get_many(keys)
        records.sort(key=lambda r: int(r.get("_written_ns", 0)))
        return [Artifact.from_dict(r) for r in records]

    def _cache_key(self, key: str) -> str:
        return self._key(CACHE_KEY, f"{quote(key, safe='')}.json")

    async def _cache_get(self, key: str) -> Artifact | None:
        found = await self._s3.get_json(self._cache_key(key))
        return Artifact.from_dict(found[0]) if found else None

    async def _cache_put(self, key: str, artifact: Artifact) -> None:
        await self._s3.put(self._cache_key(key), artifact.to_dict())

    # -- events and trace -------------------------------------------------

    def _events_prefix(self, job_id: str) -> str:
        return self._key(EVENTS_KEY, quote(job_id, safe=""), "")

    async def _last_event_id(self, job_id: str) -> int:
        known = self._last_event.get(job_id)
        if known is not None:
            return known
        keys = await self._s3.list_keys(self._events_prefix(job_id))
        return int(keys[-1].rsplit("/", 1)[1].split(".")[0]) if keys else 0

    async def _append_event(self, job_id: str, type: str, data: JSON) -> Event:
        """Claim id ``last + 1`` with If-None-Match: *; on 412 someone else has it, try
        the next. An id is only tried after the one before it exists, so readers
        never see a gap."""
        event_id = await self._last_event_id(job_id) + 1
        for _ in range(CAS_ATTEMPTS * 4):
            try:
                await self._s3.put(
                    f"{self._events_prefix(job_id)}{event_id:010d}.json",
                    {"id": event_id, "type": type, "data": data},
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                if not lost_race(exc):
                    raise
                event_id += 1
                continue
            if len(self._last_event) > LAST_EVENT_HINTS:
                self._last_event.clear()  # only a hint: a miss costs one LIST
            self._last_event[job_id] = max(event_id, self._last_event.get(job_id, 0))
            return Event(event_id, type, data)
        raise Conflict(f"could not claim an event id for job {job_id}")

    async def _fetch_events(self, job_id: str, after: int) -> list[Event]:
        prefix = self._events_prefix(job_id)
        start = f"{prefix}{after:010d}.json" if after > 0 else None
        records = await self._s3.get_many(await self._s3.list_keys(prefix, start_after=start))
        return [Event(int(r["id"]), str(r["type"]), r["data"]) for r in records]

    async def _read_events(self, job_id: str, after: int, wait_s: float) -> list[Event]:
        """S3 cannot block until an object appears: a read that may wait goes to the
        job's shared poller (``adapters.s3_feed``), which backs off while the job is idle."""
        return await self._feed.read(job_id, after, wait_s)

    async def _add_trace(self, job_id: str, record: JSON) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        await self._s3.put(self._key(TRACE_KEY, quote(job_id, safe=""), name), record)

    async def _get_trace(self, job_id: str) -> list[JSON]:
        keys = await self._s3.list_keys(self._key(TRACE_KEY, quote(job_id, safe=""), ""))
        return [dict(r) for r in await self._s3.get_many(keys)]

    # -- cancellation -----------------------------------------------------

    async def _request_cancel(self, job_id: str) -> None:
        await self._s3.put(self._key(CANCEL_KEY, quote(job_id, safe="")), {"at": time.time()})

    async def _cancel_requested(self, job_id: str) -> bool:
        return await self._s3.exists(self._key(CANCEL_KEY, quote(job_id, safe="")))

    # -- spend counters -----------------------------------------------------

    def _spend_key(self, counter: str) -> str:
        return self._key(SPEND_KEY, f"{quote(counter, safe='')}.json")

    async def _add_spend(self, counter: str, micro_usd: int, cap: int | None, ttl_s: int) -> int | None:
        """Read, check, and write back with If-Match on the ETag (If-None-Match: * for
        a new counter); a lost race reads again. Every add to one counter is a
        conditional write of the same object, so concurrent adds queue on it."""
        key = self._spend_key(counter)
        for attempt in range(CAS_ATTEMPTS):
            found = await self._s3.get_json(key)
            now = time.time()
            current = 0
            if found is not None and float(found[0]["expires_at"]) > now:
                current = int(found[0]["micro_usd"])
            total = current + micro_usd
            if cap is not None and micro_usd > 0 and total > cap:
                return None
            record = {"micro_usd": total, "expires_at": now + ttl_s}
            condition = {"IfMatch": found[1]} if found is not None else {"IfNoneMatch": "*"}
            try:
                await self._s3.put(key, record, **condition)
            except ClientError as exc:
                if not (lost_race(exc) or missing(exc)):
                    raise
                await asyncio.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
                continue
            return total
        raise Conflict(f"spend counter {counter} stayed contended for {CAS_ATTEMPTS} attempts")

    async def _spent(self, counter: str) -> int:
        found = await self._s3.get_json(self._spend_key(counter))
        if found is None or float(found[0]["expires_at"]) <= time.time():
            return 0
        return int(found[0]["micro_usd"])
