"""Magic strings in one place: statuses, key prefixes, defaults."""

from __future__ import annotations

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})
ACTIVE_STATUSES = frozenset({QUEUED, RUNNING})

# Event types of the SSE stream (SPEC §4).
EV_STATUS = "status"
EV_ARTIFACT = "artifact_written"
EV_RESULT = "result"
EV_ERROR = "error"
EV_DONE = "done"

# Key prefixes for key-value backends (redis, s3).
KEY_PREFIX = "jobq"
JOB_KEY = "job"
ARTIFACT_KEY = "artifacts"
CACHE_KEY = "cache"
EVENTS_KEY = "events"
TRACE_KEY = "trace"
CANCEL_KEY = "cancel"
IDEMPOTENCY_KEY = "idem"
INDEX_KEY = "index"

IDEMPOTENCY_TTL_S = 24 * 3600
DEFAULT_TENANT = "public"
SAQ_QUEUE_NAME = "jobq"
