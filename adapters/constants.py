"""The adapters' own magic strings: key prefixes of the key-value backends and queue names."""

from __future__ import annotations

# Key prefixes for key-value backends (redis, s3).
KEY_PREFIX = "jobq"
JOB_KEY = "job"
ARTIFACT_KEY = "artifacts"
CACHE_KEY = "cache"
EVENTS_KEY = "events"
TRACE_KEY = "trace"
CANCEL_KEY = "cancel"
CANCEL_MARK_KEY = "cancel-mark"
IDEMPOTENCY_KEY = "idem"
INDEX_KEY = "index"
SPEND_KEY = "spend"

SAQ_QUEUE_NAME = "jobq"
