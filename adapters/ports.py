"""The ports every backend implements, and the records that cross them.

Style follows SAQ's ``Queue``: each public method does the shared bookkeeping
(validation, (de)serialisation, ordering) once and calls a small abstract
``_method`` that a backend implements. Backends: ``adapters.sqlite_store``,
``adapters.redis_store``, ``adapters.s3_store`` and the queues beside them.
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from adapters.constants import ACTIVE_STATUSES, QUEUED, STATUSES

JSON = dict[str, Any]

ARTIFACT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class StoreUnavailable(Exception):
    """The job store (or queue) cannot be reached; the HTTP layer answers 503."""


class Conflict(Exception):
    """A conditional write lost a race it cannot retry."""


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, compact separators, UTF-8 (SPEC §5)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Job:
    """A job as stored. Timestamps are epoch seconds; ``request`` is the validated body."""

    id: str
    tenant: str
    request: JSON
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    progress: JSON = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    error: JSON | None = None
    result: JSON | None = None
    idempotency_key: str | None = None

    def to_dict(self) -> JSON:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass(frozen=True)
class Artifact:
    """An intermediate result of one step. ``hash`` is sha256 of canonical JSON of ``data``."""

    name: str
    type: str
    data: Any
    hash: str
    timestamp: int
    size: int

    def meta(self) -> JSON:
        return {
            "name": self.name,
            "type": self.type,
            "hash": self.hash,
            "timestamp": self.timestamp,
            "size": self.size,
        }

    def to_dict(self) -> JSON:
        return {**self.meta(), "data": self.data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(
            name=data["name"],
            type=data["type"],
            data=data["data"],
            hash=data["hash"],
            timestamp=int(data["timestamp"]),
            size=int(data["size"]),
        )


@dataclass(frozen=True)
class Event:
    """One SSE event of a job. ``id`` increases by one per job, starting at 1."""

    id: int
    type: str
    data: JSON


def check_artifact_name(name: str) -> str:
    """Artifact names become keys and paths: only ``[a-z][a-z0-9_]*`` gets through."""
    if not ARTIFACT_NAME_RE.match(name):
        raise ValueError(f"invalid artifact name: {name!r}")
    return name


class JobStore(ABC):
    """Jobs, artifacts, step cache, per-job event log and LLM trace.

    Jobs change only through :meth:`update`, a compare-and-set on the status, so
    a cancel from the web and the worker's progress cannot overwrite each other.
    """

    # -- jobs -------------------------------------------------------------

    async def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job. With ``job.idempotency_key`` set, a second create by the
        same tenant within 24 h returns ``(existing_job, False)`` instead."""
        if job.status not in STATUSES:
            raise ValueError(job.status)
        return await self._create(job)

    async def get(self, job_id: str) -> Job | None:
        return await self._get(job_id)

    async def update(
        self, job_id: str, expect: Iterable[str] | None = None, **changes: Any
    ) -> Job | None:
        """Apply ``changes`` if the job exists and its status is in ``expect``
        (any status when ``None``). Returns the new job, or ``None`` when the
        condition failed or the job is unknown."""
        unknown = set(changes) - {f.name for f in fields(Job)} - {"id"}
        if unknown or "id" in changes:
            raise ValueError(f"cannot update fields {sorted(unknown | {'id'} & set(changes))}")
        changes["updated_at"] = time.time()
        return await self._update(job_id, frozenset(expect) if expect is not None else None, changes)

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
        counts = {s: 0 for s in STATUSES}
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

    async def cache_put(self, key: str, artifact: Artifact) -> None:
        await self._cache_put(key, artifact)

    # -- events and trace -------------------------------------------------

    async def append_event(self, job_id: str, type: str, data: JSON) -> Event:
        """Append an event; the store assigns the next id of this job atomically."""
        return await self._append_event(job_id, type, data)

    async def read_events(self, job_id: str, after: int = 0, wait_s: float = 0.0) -> list[Event]:
        """Events with ``id > after``, in order. When there are none, wait up to
        ``wait_s`` for the next one (without a busy loop where the backend can)."""
        return await self._read_events(job_id, after, max(0.0, wait_s))

    async def add_trace(self, job_id: str, record: JSON) -> None:
        await self._add_trace(job_id, record)

    async def get_trace(self, job_id: str) -> list[JSON]:
        return await self._get_trace(job_id)

    # -- cancellation -----------------------------------------------------

    async def request_cancel(self, job_id: str) -> None:
        """Raise the cancel flag a running worker watches (kept apart from the job
        document so no job write can lose it)."""
        await self._request_cancel(job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        return await self._cancel_requested(job_id)

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
    async def _update(
        self, job_id: str, expect: frozenset[str] | None, changes: JSON
    ) -> Job | None: ...
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
    async def _add_trace(self, job_id: str, record: JSON) -> None: ...
    @abstractmethod
    async def _get_trace(self, job_id: str) -> list[JSON]: ...
    @abstractmethod
    async def _request_cancel(self, job_id: str) -> None: ...
    @abstractmethod
    async def _cancel_requested(self, job_id: str) -> bool: ...


class Queue(ABC):
    """Delivers job ids to workers. The worker side is backend specific (in-process
    tasks, a SAQ worker, a Lambda on SQS) and always ends in ``pipeline.run_job``."""

    name: str = "queue"

    async def enqueue(self, job_id: str, timeout_s: float) -> None:
        """Hand a job to the workers. ``timeout_s`` bounds one delivery's run time.
        Raises :class:`StoreUnavailable` when the queue cannot be reached."""
        await self._enqueue(job_id, timeout_s)

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the queue does not answer."""

    @abstractmethod
    async def stats(self) -> JSON:
        """At least ``{"workers": <live worker count>, "queued": <waiting deliveries>}``."""

    @abstractmethod
    async def _enqueue(self, job_id: str, timeout_s: float) -> None: ...


# -- LLM providers ----------------------------------------------------------


@dataclass(frozen=True)
class LLMRequest:
    """One structured-output request. ``schema`` is a JSON schema the answer must match;
    ``context`` carries the step's inputs for providers that derive answers from them
    (the offline provider); network providers ignore it."""

    step: str
    model: str
    system: str
    prompt: str
    schema: JSON
    schema_name: str
    language: str
    max_tokens: int = 4096
    timeout_s: float = 120.0
    context: JSON = field(default_factory=dict)
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (role, content) turns, e.g. the invalid answer before a repair request."""


@dataclass(frozen=True)
class LLMReply:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMError(Exception):
    """A classified provider failure. ``code`` is one of ``llm_rate_limited``,
    ``llm_auth``, ``llm_bad_request``, ``llm_unavailable``, ``llm_invalid_output``,
    ``timeout``. ``transient`` errors are retried inside the job's deadline."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        transient: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        self.status = status


class LLMProvider(Protocol):
    name: str

    async def complete(self, request: LLMRequest) -> LLMReply:
        """Answer ``request`` or raise :class:`LLMError`. Cancelling the awaiting task
        aborts the HTTP call in flight."""
        ...


class RateLimiter(Protocol):
    async def acquire(self, model: str, tokens: int) -> None:
        """Wait until one request of ``tokens`` tokens for ``model`` fits the limits."""
        ...
