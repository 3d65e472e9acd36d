"""The HTTP API's bodies as msgspec ``Struct``s (SPEC §4, 7.3): what the framework
decodes requests into and what ``/schema/openapi.json`` names as component schemas.

``JobRequest`` is decoded strictly by :class:`handlers.strict_body.StrictBody` (no
``"2"`` for an integer, no ``1`` for a boolean). The rules that depend on trimming
(1-200 characters *after* trim, blank optional fields take their default, text that is
no Unicode) stay with the domain's ``pipeline.request.validate_request``, which also
lists every broken rule when the framework refuses a body; the schema documents them.

The response models describe what the handlers return. The handlers keep returning
the domain's plain dicts (every field of the compat shapes exactly as before; the
schema allows more fields than it names), and tests check real answers against
these schemas (schemathesis' response conformance, tests/test_openapi_contract.py).
The job document's ``streamUrl`` and the request's ``max_cost_usd`` are declared as
the handlers and the domain give them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar.openapi import ResponseSpec
from msgspec import UNSET, Meta, Struct, UnsetType

from pipeline.request import (
    DEFAULT_GEO,
    DEFAULT_PARALLEL_LIMIT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_MS,
    MAX_COST_USD_RANGE,
)
from pipeline.vocabulary import ErrorCode

StatusName = Literal["queued", "running", "completed", "failed", "cancelled"]
StepStateName = Literal["pending", "running", "completed", "cached", "failed"]


def _doc(description: str, **schema: Any) -> Meta:
    """Documentation only: ``schema`` lands in the OpenAPI document, msgspec enforces none of it."""
    return Meta(extra_json_schema={"description": description, "extra": schema or None})


# -- request -------------------------------------------------------------------------


Title = Annotated[
    str,
    Meta(pattern=r"\S"),
    _doc("1-200 characters after trimming surrounding whitespace", maxLength=200),
]
Pitch = Annotated[
    str,
    Meta(pattern=r"\S"),
    _doc("1-10,000 characters after trimming surrounding whitespace", maxLength=10_000),
]

ParallelLimit = Annotated[int, Meta(ge=1, le=16, description="Max concurrent LLM calls of this job")]
TimeoutMs = Annotated[int, Meta(ge=1_000, le=3_600_000, description="Deadline of the whole job, in ms")]
MaxCost = Annotated[
    float,
    Meta(
        gt=MAX_COST_USD_RANGE[0],
        le=MAX_COST_USD_RANGE[1],
        description="Spending cap of the job in US dollars at LLM_PRICES (> 0); a 400 without prices",
        # Litestar drops a falsy gt=0 from the schema: stated here
        extra_json_schema={"extra": {"exclusiveMinimum": MAX_COST_USD_RANGE[0]}},
    ),
]


class JobRequest(Struct, kw_only=True):
    """The body of ``POST /api/jobs`` and the legacy endpoints. Unknown fields are ignored;
    ``null`` means the default."""

    project_title: Title
    elevator_pitch: Pitch | None = None
    pitch: Annotated[str | None, _doc("Alias of elevator_pitch (used when elevator_pitch is absent)")] = None
    language: Literal["de", "en"] | None = "de"  # DEFAULT_LANGUAGE
    target: Annotated[
        str | None, _doc("At most 200 characters after trimming; blank means the default", maxLength=200)
    ] = DEFAULT_TARGET
    geo: Annotated[
        str | None, _doc("At most 100 characters after trimming; blank means the default", maxLength=100)
    ] = DEFAULT_GEO
    skip_cache: bool | None = False
    parallel_limit: ParallelLimit | None = DEFAULT_PARALLEL_LIMIT
    timeout_ms: TimeoutMs | None = DEFAULT_TIMEOUT_MS
    max_cost_usd: MaxCost | None = None


# -- errors --------------------------------------------------------------------------


class ErrorDetail(Struct):
    field: str
    message: str


class Error(Struct, kw_only=True):
    """Every 4xx/5xx answer (SPEC §4). ``error`` is a code of the README's table."""

    error: Annotated[str, _doc("invalid_request, unauthorized, not_found, rate_limited, ... (README)")]
    message: str
    details: list[ErrorDetail] | UnsetType = UNSET


class LegacyError(Struct, kw_only=True):
    """A legacy endpoint's failed job: ``error`` is the job's error code."""

    error: str
    message: str
    trace_id: str


# -- jobs ----------------------------------------------------------------------------


class Progress(Struct):
    """``percentage`` and ``currentStep`` never go down."""

    step: str
    percentage: Annotated[int, Meta(ge=0, le=100)]
    currentStep: int
    totalSteps: int


class JobError(Struct):
    """``error`` of a failed or cancelled job, and the ``error`` SSE event."""

    code: Annotated[str, _doc("One of the job error codes: " + ", ".join(ErrorCode))]
    message: str
    step: str | None


class ResultMeta(Struct, kw_only=True):
    duration_ms: int
    cache_hits: int
    llm_calls: int
    provider: str | UnsetType = UNSET
    offline: bool | UnsetType = UNSET


class JobResult(Struct):
    """``result`` of a completed job, and the ``result`` SSE event."""

    success: bool
    data: Annotated[dict[str, Any], _doc("The dossier")]
    meta: ResultMeta


class ArtifactSummary(Struct):
    type: str
    hash: Annotated[str, _doc("sha256 hex of the canonical JSON of the data")]
    timestamp: Annotated[int, _doc("Epoch milliseconds")]
    size: int


class JobSummary(Struct, kw_only=True):
    """A job without ``artifacts`` and ``result``: list entries and the ``status`` SSE event."""

    jobId: str
    status: StatusName
    progress: Progress
    steps: Annotated[dict[str, StepStateName], _doc("Step name -> state")]
    createdAt: Annotated[str | None, _doc("ISO-8601")]
    startedAt: str | None
    completedAt: str | None
    attempts: int
    error: JobError | None


class Job(JobSummary, kw_only=True):
    """``GET /api/jobs/{jobId}``; ``result`` only when completed, ``error`` only when failed
    or cancelled."""

    artifacts: Annotated[dict[str, ArtifactSummary], _doc("Artifact name -> metadata")]
    streamUrl: str
    result: JobResult | UnsetType = UNSET


class JobAccepted(Struct, kw_only=True):
    """202 of ``POST /api/jobs``."""

    jobId: str
    status: StatusName
    message: str
    streamUrl: Annotated[str, _doc("Where to follow the job's events (with a short-lived token under auth)")]


class CancelResult(Struct):
    """The answer of ``POST /api/jobs/{jobId}/cancel``."""

    jobId: str
    status: StatusName
    message: str


class JobList(Struct):
    jobs: list[JobSummary]
    nextCursor: Annotated[str | None, _doc("Pass as ?cursor= for the next page; null on the last")]


class Artifact(Struct):
    """An artifact's metadata: ``GET .../artifacts`` entries and the ``artifact_written`` event."""

    name: str
    type: str
    hash: str
    timestamp: int
    size: int


class ArtifactList(Struct):
    jobId: str
    artifacts: list[Artifact]
    count: int


class ArtifactData(Struct):
    """``GET /api/jobs/{jobId}/artifacts/{name}``."""

    name: str
    type: str
    data: Any
    hash: str
    timestamp: int


# -- trace ---------------------------------------------------------------------------


class TraceCall(Struct, kw_only=True):
    """One LLM call (or a step served from the cache) of a job's trace."""

    step: str
    provider: str
    model: str
    attempt: int
    kind: Literal["call", "repair", "cache"]
    cache_hit: bool
    prompt_tokens: int
    completion_tokens: int
    duration_ms: float
    outcome: Annotated[str, _doc("ok, aborted, or an error code")]
    cost_usd: float | None
    ts: Annotated[int, _doc("Epoch milliseconds")]
    error: str | UnsetType | None = UNSET
    ctx_max: int | UnsetType = UNSET
    prompt_tokens_est: int | UnsetType = UNSET
    truncate_applied: bool | UnsetType = UNSET
    sources_dropped: int | UnsetType = UNSET
    tokens_estimated: Annotated[
        bool | UnsetType, _doc("completion_tokens estimated from the text streamed before an abort")
    ] = UNSET


class TraceTotals(Struct):
    calls: int
    llm_calls: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    duration_ms: float
    cost_usd: float | None


class Trace(Struct):
    jobId: str
    calls: list[TraceCall]
    totals: TraceTotals


# -- ops -----------------------------------------------------------------------------


class Health(Struct, kw_only=True):
    status: Literal["ok", "error"]
    backend: str
    queue: str
    error: str | UnsetType = UNSET


class Stats(Struct, kw_only=True):
    jobs: Annotated[dict[str, int], _doc("Job counts by status")]
    active: int
    running: int
    queue: Annotated[dict[str, Any], _doc("The queue backend's own counters")]
    workers: int | None
    backend: str
    provider: str


class StepRouting(Struct):
    provider: str
    model: str
    ctx_max: int
    max_output_tokens: int


class RateGate(Struct):
    LLM_RPM: int
    LLM_TPM: int
    enabled: bool


class Limit(Struct):
    default: int
    min: int
    max: int


class Limits(Struct):
    parallel_limit: Limit
    timeout_ms: Limit


class Config(Struct):
    """``GET /api/config``: the effective configuration, no secret in it (SPEC 7.3)."""

    backend: str
    provider: str
    default_model: str
    step_models: dict[str, str]
    effective_routing: dict[str, StepRouting]
    default_context_window: int
    rate_gate: RateGate
    limits: Limits


# -- legacy --------------------------------------------------------------------------


class LegacyMeta(Struct):
    trace_id: str
    duration_ms: int
    cache_hits: int
    steps_completed: int


class LegacyResult(Struct):
    success: bool
    data: Any
    meta: LegacyMeta


class LegacyAccepted(Struct):
    """The job is still running when ``LEGACY_WAIT_S`` is over."""

    jobId: str
    status: StatusName
    message: str
    statusUrl: str
    streamUrl: str
    trace_id: str


# -- Server-Sent Events (the data of each event) -------------------------------------


class DeltaEvent(Struct):
    """``delta``: a running step's streamed text (SPEC 7.1)."""

    step: str
    attempt: int
    offset: Annotated[int, _doc("Characters of this attempt's text sent before this piece")]
    text: str


class DoneEvent(Struct):
    """``done``: the last event; the stream ends after it."""

    status: str


StreamEventData: Any = JobSummary | Artifact | JobResult | JobError | DoneEvent | DeltaEvent
"""The data of one event (typed ``Any``: a union is no ``ResponseSpec.data_container`` to mypy)."""

STREAM_DESCRIPTION = """Server-Sent Events. `retry:` first, a comment heartbeat every 15 s.
Every event has an `id:` increasing per job; reconnect with `Last-Event-ID` (header or
`?lastEventId=`) to continue after it. Each event's `data:` is JSON:

| event | data |
|---|---|
| `status` | `JobSummary` |
| `artifact_written` | `Artifact` |
| `delta` | `DeltaEvent` (left out with `?deltas=0`) |
| `result` | `JobResult` |
| `error` | `JobError` |
| `done` | `DoneEvent`; the stream ends |
"""


# -- OpenAPI responses ---------------------------------------------------------------

ERROR_DESCRIPTIONS = {
    400: "Bad input: `details` names each field and what is wrong with it",
    401: "No valid API key (`Authorization: Bearer` or `X-API-Key`)",
    403: "The route needs an operator key (`OPERATOR_KEYS`)",
    404: "Unknown job or artifact, or another tenant's",
    409: "The job has no dossier yet",
    413: "Body larger than `MAX_BODY_BYTES`",
    415: "Body not declared as JSON",
    429: "Too many submissions per minute; see `Retry-After`",
    500: "Internal error (never a stack trace)",
    503: "Job store or queue unreachable; nothing was created; see `Retry-After`",
}


def responses(ok: dict[int, tuple[Any, str]], *errors: int) -> dict[int, ResponseSpec]:
    """The ``responses`` of a route: its 2xx answers (model, description) and its errors
    as ``Error``; every route may answer 500."""
    specs = {
        status: ResponseSpec(data_container=model, description=text, generate_examples=False)
        for status, (model, text) in ok.items()
    }
    for status in (*errors, 500):
        specs[status] = ResponseSpec(
            data_container=Error, description=ERROR_DESCRIPTIONS[status], generate_examples=False
        )
    return specs
