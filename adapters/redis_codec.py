"""How the redis store's records map onto Redis: key names, values, script arguments.

The key layout is described in :mod:`adapters.redis_store`. A job is a hash with one
field per :class:`Job` field, each JSON except ``status`` and ``tenant`` (raw, so the
Lua scripts read them without decoding JSON).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from adapters.constants import (
    ARTIFACT_KEY,
    CACHE_KEY,
    CANCEL_KEY,
    CANCEL_MARK_KEY,
    EVENTS_KEY,
    IDEMPOTENCY_KEY,
    INDEX_KEY,
    JOB_KEY,
    TRACE_KEY,
)
from adapters.redis_clients import lua_script
from pipeline.model import JSON, Artifact, Commit, Event, Job
from pipeline.vocabulary import IDEMPOTENCY_TTL_S, STATUSES

RAW_FIELDS = frozenset({"status", "tenant"})
EVENT_SEQ_KEY = "evseq"
_LUA_STATUSES = "{" + ",".join(f"'{s}'" for s in STATUSES) + "}"


def unindexing_script(name: str) -> str:
    """``lua/<name>.lua`` after the ``unindex`` function it calls (``lua/store_unindex.lua``,
    with every job status filled in)."""
    return lua_script("store_unindex", name).replace("__STATUSES__", _LUA_STATUSES)


class RedisKeys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def job(self, job_id: str) -> str:
        return self.key(JOB_KEY, job_id)

    def cancel_mark(self) -> str:
        """A counter raised with every cancel flag (:meth:`JobStore.cancel_mark`)."""
        return f"{self.prefix}:{CANCEL_MARK_KEY}"

    def job_keys(self, job_id: str) -> list[str]:
        """The job hash first, then every key the job owns (for expiry and delete)."""
        return [
            self.key(JOB_KEY, job_id),
            self.key(ARTIFACT_KEY, job_id),
            self.key(EVENTS_KEY, job_id),
            self.key(EVENT_SEQ_KEY, job_id),
            self.key(TRACE_KEY, job_id),
            self.key(CANCEL_KEY, job_id),
        ]

    def idempotency(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()
        return self.key(IDEMPOTENCY_KEY, digest)

    def index(self, tenant: str | None, status: str | None) -> str:
        base = f"{self.prefix}:{INDEX_KEY}:"
        if tenant is None:
            return base + (f"status:{status}" if status else "all")
        return base + (f"tstatus:{status}:{tenant}" if status else f"tenant:{tenant}")


def dumps(value: Any) -> bytes:
    """JSON for Redis values: msgspec encodes several times faster than ``json.dumps``
    and writes what ``json.loads`` reads back the same."""
    return msgspec.json.encode(value)


loads = msgspec.json.Decoder().decode


def loads_event_data(payload: bytes) -> Any:
    """An event's stored data: msgspec's decoder, falling back to ``json.loads`` for what
    ``json.dumps`` writes and strict JSON has not (``NaN``, ``Infinity``, a number beyond
    a double; an older writer used it), so every payload decodes as ``json.loads`` would."""
    try:
        return loads(payload)
    except msgspec.DecodeError:  # ValidationError (a number out of range) included
        return json.loads(payload)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def members(rows: Any) -> list[tuple[str, float]]:
    """``ZRANGE ... WITHSCORES`` rows as (member, score)."""
    return [(text(member), float(score)) for member, score in rows]


def encode_job(job: Job) -> dict[str, str | bytes]:
    return {name: value if name in RAW_FIELDS else dumps(value) for name, value in job.to_dict().items()}


def decode_job(raw: dict[bytes, bytes] | dict[str, str] | list[Any]) -> Job | None:
    if isinstance(raw, list):  # HGETALL from Lua: a flat [field, value, ...] list
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    if not raw:
        return None
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = text(key)
        data[name] = text(value) if name in RAW_FIELDS else loads(text(value))
    return Job.from_dict(data)


def parse_stream(reply: Any) -> list[Event]:
    """An XREAD reply as events (entry id ``<n>-0`` is event n)."""
    events: list[Event] = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            number = int(text(entry_id).split("-", 1)[0])
            events.append(Event(number, fields[b"type"].decode(), loads_event_data(fields[b"data"])))
    return events


def create_args(
    keys: RedisKeys, job: Job, events: tuple[tuple[str, JSON], ...], ttl_s: int
) -> tuple[list[str], list[str | float | int | bytes]]:
    """KEYS and ARGV of ``lua/store_create.lua``."""
    args: list[str | float | int | bytes] = [
        keys.prefix,
        job.id,
        job.tenant,
        job.status,
        repr(job.created_at),
        ttl_s,
        IDEMPOTENCY_TTL_S,
        len(events),
    ]
    for type, data in events:
        args += [type, dumps(data)]
    for name, value in encode_job(job).items():
        args += [name, value]
    idem_key = keys.idempotency(job.tenant, job.idempotency_key) if job.idempotency_key else ""
    script_keys = [
        keys.job(job.id),
        idem_key,
        keys.key(EVENT_SEQ_KEY, job.id),
        keys.key(EVENTS_KEY, job.id),
    ]
    return script_keys, args


def commit_args(
    keys: RedisKeys, job_id: str, batch: Commit, ttl_s: int, *, want_job: bool
) -> tuple[list[str], list[str | int | bytes]]:
    """KEYS and ARGV of ``lua/store_commit.lua``."""
    expect = batch.expect
    args: list[str | int | bytes] = [
        keys.prefix,
        job_id,
        ttl_s,
        "1" if want_job else "0",
        -1 if expect.attempts is None else expect.attempts,
    ]
    if expect.statuses is None:
        args.append(-1)
    else:
        args += [len(expect.statuses), *sorted(expect.statuses)]
    args.append(len(batch.changes))
    for name, value in batch.changes.items():
        args += [name, value if name in RAW_FIELDS else dumps(value)]
    args.append(len(batch.events))
    for type, data in batch.events:
        args += [type, dumps(data)]
    docs: dict[int, bytes] = {}  # an artifact also cached is encoded once

    def doc(artifact: Artifact) -> bytes:
        found = docs.get(id(artifact))
        if found is None:
            found = docs[id(artifact)] = dumps(artifact.to_dict())
        return found

    args.append(len(batch.artifacts))
    for artifact in batch.artifacts:
        args += [artifact.name, doc(artifact)]
    args.append(len(batch.cache))
    args += [doc(artifact) for _, artifact in batch.cache]
    args.append(len(batch.traces))
    args += [dumps(record) for record in batch.traces]
    script_keys = [*keys.job_keys(job_id), *(keys.key(CACHE_KEY, key) for key, _ in batch.cache)]
    return script_keys, args
