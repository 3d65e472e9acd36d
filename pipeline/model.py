"""The domain's records: jobs, artifacts, events, trace records, LLM requests and
replies, and the errors that cross the ports. Stores and queues speak in these."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.vocabulary import ACTIVE_STATUSES, JobStatus

JSON = dict[str, Any]

ARTIFACT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_LIST_CURSOR_RE = re.compile(r"([0-9.e+-]{1,32})~([A-Za-z0-9_-]{1,100})")


def list_cursor(last: Job) -> str:
    """The cursor after ``last`` in a newest-first listing: ``created_at~id``."""
    return f"{last.created_at!r}~{last.id}"


def parse_list_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, id) of a :func:`list_cursor`; ``ValueError`` for anything else
    (``nan~x`` or ``inf~x`` would reach the store as a bound no job has)."""
    match = _LIST_CURSOR_RE.fullmatch(cursor)
    created = float(match[1]) if match else math.nan
    if match is None or not math.isfinite(created):
        raise ValueError("not a cursor this store issued")
    return created, match[2]


class StoreUnavailable(Exception):
    """The job store (or queue) cannot be reached; the HTTP layer answers 503."""


class Conflict(Exception):
    """A conditional write lost a race it cannot retry."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Job:
    """A job as stored. Timestamps are epoch seconds; ``request`` is the validated body."""

    id: str
    tenant: str
    request: JSON
    status: str = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    handoffs: int = 0
    """Deliveries that handed the job back on shutdown: not lost, so ``worker_lost``
    counts ``attempts`` minus these."""
    progress: JSON = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    error: JSON | None = None
    result: JSON | None = None
    idempotency_key: str | None = None

    def to_dict(self) -> JSON:
        """A shallow dict of the fields: nested values are shared with the job, not
        copied (``dataclasses.asdict`` deep-copies the request and the whole dossier;
        every caller serialises the dict right away)."""
        return {name: getattr(self, name) for name in _JOB_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        return cls(**{k: v for k, v in data.items() if k in _JOB_FIELD_SET})

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


_JOB_FIELDS = tuple(f.name for f in fields(Job))
_JOB_FIELD_SET = frozenset(_JOB_FIELDS)


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


def check_job_changes(changes: JSON) -> None:
    """Only Job fields other than ``id`` change; stamps ``updated_at`` (unless given:
    a writer that predicts the stored job passes the stamp it predicted)."""
    unknown = set(changes) - _JOB_FIELD_SET - {"id"}
    if unknown or "id" in changes:
        raise ValueError(f"cannot update fields {sorted(unknown | {'id'} & set(changes))}")
    changes.setdefault("updated_at", time.time())


@dataclass(frozen=True)
class Expect:
    """The condition of a job write (a compare-and-set): the job's status is one of
    ``statuses`` (any when ``None``) and, when ``attempts`` is set, the job's
    ``attempts`` still equals it. A delivery writes with the attempt it counted, so
    once a later delivery of the same job has counted its own (the first worker was
    presumed lost, but only stalled), nothing the earlier one writes lands."""

    statuses: frozenset[str] | None = None
    attempts: int | None = None

    def holds(self, job: Job) -> bool:
        return (self.statuses is None or job.status in self.statuses) and (
            self.attempts is None or job.attempts == self.attempts
        )


ANY = Expect()


def make_expect(statuses: Iterable[str] | None, attempts: int | None) -> Expect:
    if statuses is None and attempts is None:
        return ANY
    return Expect(frozenset(statuses) if statuses is not None else None, attempts)


@dataclass(frozen=True)
class Commit:
    """The writes of :meth:`JobStore.commit`, validated, for a backend's ``_commit``."""

    expect: Expect
    changes: JSON
    events: tuple[tuple[str, JSON], ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    cache: tuple[tuple[str, Artifact], ...] = ()
    traces: tuple[TraceRecord, ...] = ()


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




TraceRecord = dict[str, Any]
"""One entry of a job's LLM trace (``GET /api/jobs/{id}/trace``): an LLM call or a
step served from the cache. Keys: ``step``, ``provider``, ``model``, ``attempt``,
``kind`` (``call``, ``repair``, ``cache``), ``cache_hit``, ``prompt_tokens`` and
``completion_tokens`` (as the provider reported them), ``duration_ms``, ``outcome``
(``ok``, an error code, or ``aborted`` for a call stopped from outside), ``error``,
``cost_usd`` (``None`` without ``LLM_PRICES``) and ``ts`` (epoch milliseconds). A
plain dict, as stores keep and the API returns it."""
