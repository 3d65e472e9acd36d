"""The domain's words: job statuses, step states, event types, error codes.

Each is a ``StrEnum``: a member *is* its string, so it compares equal to what a
store or a client holds and is written as that string by every JSON encoder.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class StepState(StrEnum):
    """A step's state in a job's ``steps`` map."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CACHED = "cached"
    FAILED = "failed"


class EventType(StrEnum):
    """Event types of a job's event log, the SSE stream (SPEC §4)."""

    STATUS = "status"
    ARTIFACT = "artifact_written"
    RESULT = "result"
    ERROR = "error"
    DONE = "done"
    DELTA = "delta"
    """A running step's streamed text (SPEC 7.1); clients that do not know it ignore it."""


class ErrorCode(StrEnum):
    """``error.code`` of a failed or cancelled job (the README's table)."""

    LLM_RATE_LIMITED = "llm_rate_limited"
    LLM_AUTH = "llm_auth"
    LLM_BAD_REQUEST = "llm_bad_request"
    LLM_UNAVAILABLE = "llm_unavailable"
    LLM_INVALID_OUTPUT = "llm_invalid_output"
    LLM_CONTEXT_OVERFLOW = "llm_context_overflow"
    """The prompt does not fit the model's context window even with no evidence left."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """The next LLM call's worst-case cost does not fit the job's ``max_cost_usd`` or
    the tenant's ``TENANT_MAX_COST_USD_PER_DAY`` (what was spent before stays spent)."""
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    WORKER_LOST = "worker_lost"
    INVALID_REQUEST = "invalid_request"
    INTERNAL_ERROR = "internal_error"


DEFAULT_TENANT = "public"
"""The tenant of every job when ``API_KEYS`` is not set."""
IDEMPOTENCY_TTL_S = 24 * 3600
"""How long an ``Idempotency-Key`` returns the same job (SPEC §4)."""
