"""The ports every backend implements: job store, queue, LLM provider, rate limiter.

Style follows SAQ's ``Queue``: each public method does the shared bookkeeping
(validation, (de)serialisation, ordering) once and calls a small abstract
``_method`` that a backend implements. The backends live in ``adapters/``.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Protocol

from pipeline.model import (
    ARTIFACT_NAME_RE,
    JSON,
    Artifact,
    Commit,
    Event,
    Expect,
    Job,
    LLMReply,
    LLMRequest,
    TraceRecord,
    check_artifact_name,
    check_job_changes,
    make_expect,
)
from pipeline.vocabulary import DEFAULT_TENANT, STATUSES

SPEND_COUNTER_RE = re.compile(r"^[A-Za-z0-9_.:/%~-]{1,300}$")
"""Names of spend counters (``job/<id>``, ``tenant/<tenant>/<UTC day>``): they
become keys and object names, so only these characters get through."""


class JobStore(ABC):
    """Jobs, artifacts, step cache, per-job event log and LLM trace.

    Jobs change only through :meth:`update`, a compare-and-set on the status, so
    a cancel from the web and the worker's progress cannot overwrite each other.
    """

    # -- jobs -------------------------------------------------------------

    async def create(
        self, job: Job, *, events: Sequence[tuple[str, JSON]] = ()
    ) -> tuple[Job, bool]:
        """Store a new job, and append ``events`` to its log if (and only if) it was
        created: atomically where the backend can. With ``job.idempotency_key``
        set, a second create by the same tenant within 24 h returns
        ``(existing_job, False)`` instead."""
        if job.status not in STATUSES:
            raise ValueError(job.status)
        if not events:
            return await self._create(job)
        return await self._create_with_events(job, tuple(events))

    async def get(self, job_id: str) -> Job | None:
        return await self._get(job_id)

    async def tenant_of(self, job_id: str) -> str | None:
        """The job's tenant, ``None`` when there is no such job: who may see it, without
        loading the whole job where the backend can (a stream checks this on every open
        and reconnect)."""
        return await self._tenant_of(job_id)

    async def update(
        self,
        job_id: str,
        expect: Iterable[str] | None = None,
        *,
        expect_attempts: int | None = None,
        events: Sequence[tuple[str, JSON]] = (),
        **changes: Any,
    ) -> Job | None:
        """Apply ``changes`` if the job exists, its status is in ``expect`` (any
        status when ``None``) and, when ``expect_attempts`` is given, its
        ``attempts`` equals it (see :class:`Expect`); then append ``events``
        (``(type, data)`` pairs) if and only if the change held: in one atomic step
        where the backend can. Returns the new job, or ``None`` when the condition
        failed or the job is unknown."""
        check_job_changes(changes)
        expected = make_expect(expect, expect_attempts)
        if not events:
            return await self._update(job_id, expected, changes)
        return await self._update_with_events(job_id, expected, changes, tuple(events))

    async def delete(self, job_id: str) -> None:
        """Remove a job and everything it owns (used when enqueueing failed)."""
        await self._delete(job_id)

    async def list_jobs(
        self, tenant: str | None, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Newest first. ``tenant=None`` lists every tenant's jobs. Returns the page
        and the cursor of the next page (``None`` at the end)."""
        return await self._list_jobs(tenant, status, max(1, min(limit, 200)), cursor)

    async def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {s: 0 for s in STATUSES}
        counts.update(await self._count_by_status())
        return counts

    async def unfinished_job_ids(self) -> list[str]:
        """Jobs queued or running, oldest first: a restarted local worker resumes them."""
        return await self._unfinished_job_ids()

    # -- artifacts and cache ---------------------------------------------

    async def put_artifact(self, job_id: str, artifact: Artifact) -> None:
        check_artifact_name(artifact.name)
        await self._put_artifact(job_id, artifact)

    async def get_artifact(self, job_id: str, name: str) -> Artifact | None:
        if not ARTIFACT_NAME_RE.match(name):
            return None
        return await self._get_artifact(job_id, name)

    async def list_artifacts(self, job_id: str) -> list[Artifact]:
        """All artifacts of a job, in the order they were written."""
        return await self._list_artifacts(job_id)

    async def cache_get(self, key: str) -> Artifact | None:
        return await self._cache_get(key)

    async def cache_get_many(self, keys: Sequence[str]) -> list[Artifact | None]:
        """``cache_get`` of each key, in order: one round trip where the backend can."""
        if not keys:
            return []
        return await self._cache_get_many(list(keys))

    async def cache_put(self, key: str, artifact: Artifact) -> None:
        await self._cache_put(key, artifact)

    # -- events and trace -------------------------------------------------

    async def append_event(self, job_id: str, type: str, data: JSON) -> Event:
        """Append an event; the store assigns the next id of this job atomically."""
        return await self._append_event(job_id, type, data)

    def read_events(
        self, job_id: str, after: int = 0, wait_s: float = 0.0
    ) -> Coroutine[Any, Any, list[Event]]:
        """Events with ``id > after``, in order. When there are none, wait up to
        ``wait_s`` for the next one (without a busy loop where the backend can).

        Not a coroutine of its own: it hands back the backend's, so each of the
        thousands of streams waiting here holds one coroutine less per wait."""
        return self._read_events(job_id, after, max(0.0, wait_s))

    async def add_trace(self, job_id: str, record: TraceRecord) -> None:
        await self._add_trace(job_id, record)

    async def get_trace(self, job_id: str) -> list[TraceRecord]:
        return await self._get_trace(job_id)

    # -- cancellation -----------------------------------------------------

    async def request_cancel(self, job_id: str) -> None:
        """Raise the cancel flag a running worker watches (kept apart from the job
        document so no job write can lose it)."""
        await self._request_cancel(job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        return await self._cancel_requested(job_id)

    async def cancel_requested_many(self, job_ids: Collection[str]) -> set[str]:
        """Which of ``job_ids`` have their cancel flag up: one round trip where the
        backend can, so one poller can watch every job a worker runs."""
        if not job_ids:
            return set()
        return await self._cancel_requested_many(list(job_ids))

    async def cancel_mark(self) -> str | None:
        """A value that changes whenever a cancel flag is raised on this store, so a
        poller whose jobs' flags were all down at one mark need not read them again
        until it changes; ``None`` where the backend keeps no such value (every poll
        then reads every flag)."""
        return await self._cancel_mark()

    # -- spend counters (cost caps, SPEC 7.4) ------------------------------

    async def add_spend(
        self, counter: str, micro_usd: int, *, cap: int | None = None, ttl_s: int
    ) -> int | None:
        """Add ``micro_usd`` (millionths of a USD; negative gives back) to ``counter``
        in one atomic step, shared by every process on the store: with ``cap``, only
        if the new total is at most ``cap``. Returns the new total, or ``None`` when
        the cap refused the amount (the counter is then unchanged). A counter
        expires ``ttl_s`` seconds after its last write and then reads as 0."""
        if not SPEND_COUNTER_RE.match(counter):
            raise ValueError(f"invalid spend counter: {counter!r}")
        return await self._add_spend(counter, int(micro_usd), cap, max(1, int(ttl_s)))

    async def spent(self, counter: str) -> int:
        """The total of ``counter`` in micro-USD (0 when never written or expired)."""
        if not SPEND_COUNTER_RE.match(counter):
            raise ValueError(f"invalid spend counter: {counter!r}")
        return await self._spent(counter)

    # -- batched writes ---------------------------------------------------

    async def commit(
        self,
        job_id: str,
        *,
        expect: Iterable[str] | None = None,
        expect_attempts: int | None = None,
        changes: Mapping[str, Any] | None = None,
        events: Sequence[tuple[str, JSON]] = (),
        artifacts: Sequence[Artifact] = (),
        cache: Sequence[tuple[str, Artifact]] = (),
        traces: Sequence[TraceRecord] = (),
    ) -> bool:
        """Write what a step produced together, in one round trip where the backend
        can, in this order: ``artifacts`` of the job, step ``cache`` entries
        (key, artifact) and ``traces`` records whatever the job's status; then the
        job ``changes`` as :meth:`update` does (compare-and-set on ``expect``) and,
        only if that held, ``events``. Returns whether the update held.

        With ``expect_attempts`` given and no longer the job's ``attempts``, nothing
        at all is written: the job belongs to a later delivery (see :class:`Expect`).

        The order makes artifacts checkpoints: a job never counts a step done whose
        artifact is not stored yet."""
        for artifact in artifacts:
            check_artifact_name(artifact.name)
        for _, artifact in cache:
            check_artifact_name(artifact.name)
        fields = dict(changes or {})
        check_job_changes(fields)
        batch = Commit(
            expect=make_expect(expect, expect_attempts),
            changes=fields,
            events=tuple(events),
            artifacts=tuple(artifacts),
            cache=tuple(cache),
            traces=tuple(traces),
        )
        return await self._commit(job_id, batch)

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:  # noqa: B027 - optional hook, most backends connect lazily
        """Connect / create tables. Called once by ``bootstrap``'s owner."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the backend does not answer."""

    # -- backend hooks ----------------------------------------------------

    @abstractmethod
    async def _create(self, job: Job) -> tuple[Job, bool]: ...
    @abstractmethod
    async def _get(self, job_id: str) -> Job | None: ...
    @abstractmethod
    async def _update(self, job_id: str, expect: Expect, changes: JSON) -> Job | None: ...
    @abstractmethod
    async def _delete(self, job_id: str) -> None: ...
    @abstractmethod
    async def _list_jobs(
        self, tenant: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]: ...
    @abstractmethod
    async def _count_by_status(self) -> dict[str, int]: ...
    @abstractmethod
    async def _unfinished_job_ids(self) -> list[str]: ...
    @abstractmethod
    async def _put_artifact(self, job_id: str, artifact: Artifact) -> None: ...
    @abstractmethod
    async def _get_artifact(self, job_id: str, name: str) -> Artifact | None: ...
    @abstractmethod
    async def _list_artifacts(self, job_id: str) -> list[Artifact]: ...
    @abstractmethod
    async def _cache_get(self, key: str) -> Artifact | None: ...
    @abstractmethod
    async def _cache_put(self, key: str, artifact: Artifact) -> None: ...
    @abstractmethod
    async def _append_event(self, job_id: str, type: str, data: JSON) -> Event: ...
    @abstractmethod
    async def _read_events(self, job_id: str, after: int, wait_s: float) -> list[Event]: ...
    @abstractmethod
    async def _add_trace(self, job_id: str, record: TraceRecord) -> None: ...
    @abstractmethod
    async def _get_trace(self, job_id: str) -> list[TraceRecord]: ...
    @abstractmethod
    async def _request_cancel(self, job_id: str) -> None: ...
    @abstractmethod
    async def _cancel_requested(self, job_id: str) -> bool: ...
    @abstractmethod
    async def _add_spend(self, counter: str, micro_usd: int, cap: int | None, ttl_s: int) -> int | None: ...
    @abstractmethod
    async def _spent(self, counter: str) -> int: ...

    # Hooks with a default built from the ones above; backends override them to
    # save round trips (and to make the event appends atomic with the update).

    async def _create_with_events(
        self, job: Job, events: tuple[tuple[str, JSON], ...]
    ) -> tuple[Job, bool]:
        stored, created = await self._create(job)
        if created:
            for type, data in events:
                await self._append_event(job.id, type, data)
        return stored, created

    async def _update_with_events(
        self,
        job_id: str,
        expect: Expect,
        changes: JSON,
        events: tuple[tuple[str, JSON], ...],
    ) -> Job | None:
        job = await self._update(job_id, expect, changes)
        if job is not None:
            for type, data in events:
                await self._append_event(job_id, type, data)
        return job

    async def _commit(self, job_id: str, batch: Commit) -> bool:
        # Not atomic here: a delivery taken over meanwhile may still store these
        # artifacts, but its job update below fails (the update is a CAS).
        if batch.expect.attempts is not None:
            job = await self._get(job_id)
            if job is None or job.attempts != batch.expect.attempts:
                return False
        # Side by side, not one after another: a worker killed mid-commit then rarely
        # leaves an artifact stored without the trace record of its call.
        await asyncio.gather(
            *(self._put_artifact(job_id, artifact) for artifact in batch.artifacts),
            *(self._cache_put(key, artifact) for key, artifact in batch.cache),
            *(self._add_trace(job_id, record) for record in batch.traces),
        )
        job = await self._update_with_events(job_id, batch.expect, batch.changes, batch.events)
        return job is not None

    async def _cache_get_many(self, keys: list[str]) -> list[Artifact | None]:
        return [await self._cache_get(key) for key in keys]

    async def _cancel_requested_many(self, job_ids: list[str]) -> set[str]:
        return {job_id for job_id in job_ids if await self._cancel_requested(job_id)}

    async def _cancel_mark(self) -> str | None:
        return None

    async def _tenant_of(self, job_id: str) -> str | None:
        job = await self._get(job_id)
        return None if job is None else job.tenant


class Queue(ABC):
    """Delivers job ids to workers. The worker side is backend specific (in-process
    tasks, a SAQ worker, a Lambda on SQS) and always ends in ``pipeline.run_job``."""

    name: str = "queue"

    async def enqueue(self, job_id: str, timeout_s: float, tenant: str = DEFAULT_TENANT) -> None:
        """Hand a job of ``tenant`` to the workers. ``timeout_s`` bounds one delivery's
        run time. Queues that schedule fairly let tenants take turns for free slots.
        Raises :class:`StoreUnavailable` when the queue cannot be reached."""
        await self._enqueue(job_id, timeout_s, tenant)

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    def stopping(self) -> bool:
        """True once this process's workers shut down: a delivery interrupted then is
        handed back, not lost."""
        return False

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the queue does not answer."""

    @abstractmethod
    async def stats(self) -> JSON:
        """At least ``{"workers": <live worker count>, "queued": <waiting deliveries>}``."""

    @abstractmethod
    async def _enqueue(self, job_id: str, timeout_s: float, tenant: str) -> None: ...


# -- LLM providers ----------------------------------------------------------

TextSink = Callable[[str], None]
"""Receives each piece of a streaming answer's text, in order, as it arrives."""


class LLMProvider(Protocol):
    name: str

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        """Answer ``request`` or raise :class:`LLMError`. The answer streams: with
        ``on_text`` each piece of the answer's text is passed on as it arrives, and the
        pieces concatenated are the reply's ``text`` (for a forced tool call, the
        tool input's JSON text). Token counts are the provider's own, from the stream's
        usage. A stream cut before its end is a transient ``llm_unavailable``. Cancelling
        the awaiting task aborts the HTTP call in flight."""
        ...


class RateLimiter(Protocol):
    async def acquire(self, model: str, tokens: int) -> None:
        """Wait until one request of ``tokens`` tokens for ``model`` fits the limits."""
        ...
