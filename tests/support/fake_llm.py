"""Local stand-ins for the OpenAI and Anthropic HTTP APIs, for driving the real SDKs.

One :class:`FakeLLMServer` listens on 127.0.0.1 (free port, background thread) and
speaks both wire formats: ``POST .../chat/completions`` (OpenAI) and
``POST .../messages`` (Anthropic). ``fake_openai_server()`` /
``fake_anthropic_server()`` only differ in which ``base_url`` they expose::

    with fake_openai_server(failure_rate=0.3, seed=7) as fake:
        provider = OpenAIProvider(api_key="sk-test", base_url=fake.base_url)
        ...
        assert fake.usage_totals["prompt_tokens"] == trace_prompt_tokens

What each request gets is a *directive*, ``kind[:key=value,...]``:

- ``ok``: 200 with a schema-valid answer generated from the request's schema
  (``response_format.json_schema.schema``, the forced tool's ``input_schema``, or a
  fenced ```json schema in the system message for ``json_object`` mode).
- ``malformed``: 200 whose answer text is not JSON (Anthropic: a text block, no tool_use).
- ``invalid``: 200 with JSON that breaks the schema (required fields dropped).
- ``badbody``: 200 whose HTTP body is not JSON at all.
- ``reset``: the connection is reset without an answer.
- ``<status>``: that HTTP error in the provider's error format, e.g. ``429``, ``500``, ``529``.

Options: ``delay`` (seconds before answering), ``retry_after`` (``Retry-After``
seconds), ``retry_after_ms``, ``retry_after_date`` (``Retry-After`` as an HTTP date
that many seconds ahead), ``prompt_tokens`` / ``completion_tokens`` (usage reported),
``truncated=1`` (the answer hit the output budget: ``finish_reason="length"`` /
``stop_reason="max_tokens"``).
Examples: ``"429:retry_after=1"``, ``"ok:delay=0.5"``, ``"500:delay=0.1"``.

Streaming: a request with ``"stream": true`` gets its answer as Server-Sent Events
in HTTP chunks, in the provider's wire format. OpenAI: ``chat.completion.chunk``
objects (a role chunk, one chunk per piece of the answer, a chunk with the
``finish_reason``, the usage chunk with empty ``choices`` when
``stream_options.include_usage`` is asked, then ``data: [DONE]``). Anthropic:
``message_start`` (input tokens), ``content_block_start`` (``tool_use`` for a
forced tool, else ``text``), one ``content_block_delta`` per piece
(``input_json_delta`` / ``text_delta``), ``content_block_stop``, ``message_delta``
(stop reason and output tokens), ``message_stop``. Status errors, ``reset`` and
``delay`` happen before the stream, as for a plain request; ``badbody`` sends an
event whose data is not JSON. Stream options:

- ``chunks``: pieces the answer is split into (default 8); ``chunk_delay``: seconds
  between events (a slow model).
- ``cut=N``: after N pieces the server closes the connection mid-body, without the
  final chunk; with ``reset=1`` it resets it instead; with ``clean=1`` it ends the
  HTTP body properly (OpenAI: after ``data: [DONE]``) but still without the final
  chunk; with ``error=<status>`` it sends the provider's mid-stream error event
  (OpenAI ``{"error": ...}``, Anthropic ``event: error``) for that status first.
- ``nousage=1``: the whole answer and its end, but no usage (OpenAI: no usage
  chunk; Anthropic: a ``message_delta`` without ``usage``).

A stream counts as delivered (``usage_totals``) only when it was written to its end.
Examples: ``"ok:cut=3"``, ``"ok:chunks=20,chunk_delay=0.05"``, ``"ok:cut=2,error=529"``.

The directive of a request is, in order: ``401`` if ``api_key`` is set and the
request does not carry it; the next entry of the plan (:meth:`FakeLLMServer.plan`);
``responder(request)`` if given; with probability ``failure_rate`` (seeded RNG) a
choice from ``failures``; else ``default``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import random
import re
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[["RecordedRequest"], str]

BODY = {
    "project_title": "Acme Robotics",
    "elevator_pitch": "Robots that fold laundry for hotels, 40% cheaper than staff, 12 pilots.",
    "language": "en",
    "parallel_limit": 4,
}
"""A job request for the LLM pipeline suites (four steps at a time)."""

DEFAULT_FAILURES = ("429:retry_after=0.05", "500")
_SCHEMA_IN_PROMPT = re.compile(r"```json\s*\n(.*?)\n```", re.DOTALL)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


# -- directives ---------------------------------------------------------------


@dataclass(frozen=True)
class Directive:
    """A parsed ``kind[:key=value,...]`` string."""

    kind: str
    options: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return int(self.kind) if self.kind.isdigit() else 200

    @classmethod
    def parse(cls, text: str) -> Directive:
        kind, _, rest = text.strip().partition(":")
        options: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"directive option without value: {text!r}")
            options[key.strip()] = float(value)
        known = {"ok", "malformed", "invalid", "badbody", "reset"}
        if kind not in known and not (kind.isdigit() and len(kind) == 3):
            raise ValueError(f"unknown directive kind {kind!r} in {text!r}")
        return cls(kind, options)


# -- records --------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request the server received and what it did with it."""

    index: int
    api: str
    """``openai`` or ``anthropic`` (by path)."""
    path: str
    headers: dict[str, str]
    """Lower-case header names."""
    body: Any
    directive: str = ""
    status: int | None = None
    """Status written, ``None`` for a reset or when the client left first."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Usage reported in the answer (0 when the answer carried none)."""
    delivered: bool = False
    """The answer was written while the client was still connected."""
    client_disconnected: bool = False
    """The client closed the connection before the answer was written."""
    received_at: float = 0.0
    answered_at: float | None = None
    streamed: bool = False
    """The answer went out as a stream of events."""
    pieces: list[str] = field(default_factory=list)
    """The pieces of answer text a stream has sent so far, in order."""
    cut: bool = False
    """The stream was ended before its final chunk, on purpose (``cut``, ``nousage``)."""

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def schema(self) -> Any:
        return request_schema(self.api, self.body)

    @property
    def schema_name(self) -> str | None:
        """``response_format.json_schema.name`` (OpenAI) or the forced tool's name
        (Anthropic): the provider's sanitised ``LLMRequest.schema_name``."""
        if not isinstance(self.body, dict):
            return None
        if self.api == "anthropic":
            return (self.body.get("tool_choice") or {}).get("name")
        fmt = self.body.get("response_format") or {}
        return (fmt.get("json_schema") or {}).get("name")

    @property
    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of every turn, Anthropic's ``system`` first as a system turn;
        a repair request has more than system + user."""
        if not isinstance(self.body, dict):
            return []
        turns = [("system", self.body["system"])] if self.body.get("system") else []
        for message in self.body.get("messages") or []:
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            turns.append((str(message.get("role")), text))
        return turns


# -- schema-valid answers ---------------------------------------------------------


def schema_example(schema: Any, *, root: Any = None, name: str = "value", variant: int = 0) -> Any:
    """A small deterministic value valid for ``schema``: every property filled,
    arrays with ``max(1, minItems)`` items, numbers inside their bounds (the middle
    when both are given), the first enum / const / non-null ``anyOf`` branch,
    local ``$ref``s (``#/$defs/...``) followed. ``pattern`` is not honoured."""
    return _example(schema, root if root is not None else schema, name, variant, 0)


def _example(schema: Any, root: Any, name: str, variant: int, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > 12:
        return None
    if "$ref" in schema:
        return _example(_resolve(root, schema["$ref"]), root, name, variant, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            branches = [s for s in schema[key] if not _is_null(s)]
            return _example((branches or schema[key])[0], root, name, variant, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(root, part["$ref"]) if "$ref" in part else part
            props = {**merged.get("properties", {}), **part.get("properties", {})}
            merged = {**merged, **part, "properties": props}
        return _example(merged, root, name, variant, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        return _array(schema, root, name, depth)
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer", variant=variant)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema, name, variant)


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _resolve(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node = root
    for part in filter(None, ref[1:].split("/")):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _object(schema: dict[str, Any], root: Any, depth: int) -> dict[str, Any]:
    props: dict[str, Any] = schema.get("properties") or {}
    out = {key: _example(sub, root, key, 0, depth + 1) for key, sub in props.items()}
    extra = schema.get("additionalProperties")
    if not props and isinstance(extra, dict) and extra:
        out["example"] = _example(extra, root, "example", 0, depth + 1)
    return out


def _array(schema: dict[str, Any], root: Any, name: str, depth: int) -> list[Any]:
    count = max(1, int(schema.get("minItems", 0)))
    if "maxItems" in schema:
        count = min(count, int(schema["maxItems"]))
    prefix = schema.get("prefixItems") or []
    items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
    count = max(count, len(prefix)) if prefix else count
    singular = name[:-1] if name.endswith("s") and len(name) > 1 else name
    return [
        _example(prefix[i] if i < len(prefix) else items, root, singular, i, depth + 1)
        for i in range(count)
    ]


def _number(schema: dict[str, Any], *, integer: bool, variant: int) -> int | float:
    lo: float | None = schema.get("minimum")
    hi: float | None = schema.get("maximum")
    step = 1 if integer else 0.01
    if schema.get("exclusiveMinimum") is not None:
        lo = float(schema["exclusiveMinimum"]) + step
    if schema.get("exclusiveMaximum") is not None:
        hi = float(schema["exclusiveMaximum"]) - step
    if lo is not None and hi is not None:
        value = lo + (hi - lo) / 2
    elif lo is not None:
        value = lo + variant
    elif hi is not None:
        value = min(hi, 1.0)
    else:
        value = 1.0 + variant
    multiple = schema.get("multipleOf")
    if multiple:
        value = -(-value // multiple) * multiple
        if hi is not None and value > hi:
            value -= multiple
    if integer:
        rounded = int(value)
        return rounded if lo is None or rounded >= lo else rounded + 1
    return round(value, 6)


def _string(schema: dict[str, Any], name: str, variant: int) -> str:
    formats = {
        "date": f"2024-01-0{1 + variant % 9}",
        "date-time": "2024-01-01T00:00:00Z",
        "time": "12:00:00",
        "email": f"person{variant}@example.com",
        "uri": f"https://example.com/{name}/{variant}",
        "url": f"https://example.com/{name}/{variant}",
        "uuid": f"00000000-0000-4000-8000-{variant:012d}",
    }
    suffix = f" {variant + 1}" if variant else ""
    text = formats.get(schema.get("format", ""), f"{name.replace('_', ' ')} example{suffix}")
    if schema.get("maxLength") is not None:
        text = text[: int(schema["maxLength"])]
    return text.ljust(int(schema.get("minLength", 0)), "x")


def broken_example(schema: Any) -> Any:
    """JSON that fails ``schema``: the example without its required fields (or a list
    in place of an object that requires nothing)."""
    example = schema_example(schema)
    required = schema.get("required") if isinstance(schema, dict) else None
    if isinstance(example, dict) and required:
        return {k: v for k, v in example.items() if k not in required}
    return [] if isinstance(example, dict) else {"unexpected": example}


def request_schema(api: str, body: Any) -> Any:
    """The JSON schema a request asks the answer to follow, or ``None``."""
    if not isinstance(body, dict):
        return None
    if api == "anthropic":
        tools = body.get("tools") or []
        wanted = (body.get("tool_choice") or {}).get("name")
        for tool in tools:
            if wanted in (None, tool.get("name")):
                return tool.get("input_schema")
        return None
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    for message in body.get("messages") or []:
        content = message.get("content")
        if message.get("role") == "system" and isinstance(content, str):
            found = _SCHEMA_IN_PROMPT.findall(content)
            if found:
                return json.loads(found[-1])
    return None


# -- the server ---------------------------------------------------------------------


@dataclass
class _Behaviour:
    default: str = "ok"
    failure_rate: float = 0.0
    failures: Sequence[str] = DEFAULT_FAILURES
    seed: int = 0
    delay_s: float = 0.0
    usage: tuple[int, int] | None = None
    api_key: str | None = None
    responder: Responder | None = None


class _QuietHTTPServer(ThreadingHTTPServer):
    """Clients that drop connections (cancel, timeout, pool close) are normal here."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeLLMServer:
    """See the module docstring. Thread-safe; use as a context manager."""

    def __init__(self, api: str = "openai", **behaviour: Any) -> None:
        if api not in ("openai", "anthropic"):
            raise ValueError(api)
        self.api = api
        self._lock = threading.Condition()
        self._behaviour = _Behaviour()
        self._rng = random.Random(0)
        self._plan: deque[str] = deque()
        self._records: list[RecordedRequest] = []
        self._counter = itertools.count()
        self._in_flight = 0
        self.max_in_flight = 0
        """Most requests the server was answering at the same time."""
        self._stopping = threading.Event()
        self._httpd = _QuietHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread: threading.Thread | None = None
        self.set_behaviour(**behaviour)

    # -- lifecycle ----------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The ``base_url`` to hand to the SDK of this server's ``api``."""
        return self.openai_base_url if self.api == "openai" else self.anthropic_base_url

    def start(self) -> FakeLLMServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour ------------------------------------------------------------

    def set_behaviour(
        self,
        *,
        default: str | None = None,
        failure_rate: float | None = None,
        failures: Sequence[str] | None = None,
        seed: int | None = None,
        delay_s: float | None = None,
        usage: tuple[int, int] | None = None,
        api_key: str | None = None,
        responder: Responder | None = None,
        plan: Iterable[str] | None = None,
    ) -> None:
        """Change what the next requests get; arguments left ``None`` keep their value.
        ``seed`` restarts the RNG; ``plan`` replaces the queued directives."""
        for text in [default or "ok", *(failures or ()), *(plan or ())]:
            Directive.parse(text)
        with self._lock:
            b = self._behaviour
            b.default = default if default is not None else b.default
            b.failure_rate = failure_rate if failure_rate is not None else b.failure_rate
            b.failures = tuple(failures) if failures is not None else b.failures
            b.delay_s = delay_s if delay_s is not None else b.delay_s
            b.usage = usage if usage is not None else b.usage
            b.api_key = api_key if api_key is not None else b.api_key
            b.responder = responder if responder is not None else b.responder
            if seed is not None:
                b.seed = seed
                self._rng = random.Random(seed)
            if plan is not None:
                self._plan = deque(plan)

    def plan(self, directives: Iterable[str]) -> None:
        """Queue directives for the next requests, one each, before any other rule."""
        items = list(directives)
        for text in items:
            Directive.parse(text)
        with self._lock:
            self._plan.extend(items)

    def reset(self) -> None:
        """Forget recorded requests, the plan and ``max_in_flight``."""
        with self._lock:
            self._records.clear()
            self._plan.clear()
            self.max_in_flight = self._in_flight

    # -- observation ------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request so far, in arrival order."""
        with self._lock:
            return list(self._records)

    @property
    def usage_totals(self) -> dict[str, int]:
        """Tokens reported in answers delivered with status 200, and their count."""
        with self._lock:
            done = [r for r in self._records if r.delivered and r.status == 200]
            prompt = sum(r.prompt_tokens for r in done)
            completion = sum(r.completion_tokens for r in done)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "calls": len(done),
        }

    def count(self, **match: Any) -> int:
        """Requests whose attributes equal ``match``, e.g. ``count(status=429)``."""
        return sum(all(getattr(r, k) == v for k, v in match.items()) for r in self.requests)

    def wait_until(self, predicate: Callable[[FakeLLMServer], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every server event)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    async def async_wait_until(
        self, predicate: Callable[[FakeLLMServer], bool], within_s: float = 5.0
    ) -> bool:
        """:meth:`wait_until` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_until, predicate, within_s)

    # -- called by the handler ----------------------------------------------------

    def _begin(
        self, api: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[RecordedRequest, Directive]:
        with self._lock:
            record = RecordedRequest(
                index=next(self._counter),
                api=api,
                path=path,
                headers=headers,
                body=body,
                received_at=time.monotonic(),
            )
            b = self._behaviour
            if b.api_key is not None and presented_key(api, headers) != b.api_key:
                text = "401"
            elif self._plan:
                text = self._plan.popleft()
            elif b.responder is not None:
                text = b.responder(record)
            elif b.failure_rate and self._rng.random() < b.failure_rate:
                text = self._rng.choice(list(b.failures))
            else:
                text = b.default
            directive = Directive.parse(text)
            if b.delay_s and "delay" not in directive.options:
                directive = Directive(directive.kind, {**directive.options, "delay": b.delay_s})
            record.directive = text
            self._records.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._lock.notify_all()
            return record, directive

    def _finish(self, record: RecordedRequest, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(record, key, value)
            record.answered_at = time.monotonic()
            self._in_flight -= 1
            self._lock.notify_all()

    def _undeliver(self, record: RecordedRequest) -> None:
        with self._lock:
            record.delivered = False
            record.client_disconnected = True
            self._lock.notify_all()

    def _usage(self, directive: Directive, body: Any, answer: str) -> tuple[int, int]:
        opts = directive.options
        with self._lock:
            fixed = self._behaviour.usage
        prompt, completion = fixed or (
            10 + len(json.dumps(body.get("messages", ""), ensure_ascii=False)) // 4,
            1 + len(answer) // 4,
        )
        return (
            int(opts.get("prompt_tokens", prompt)),
            int(opts.get("completion_tokens", completion)),
        )


def presented_key(api: str, headers: dict[str, str]) -> str | None:
    """The API key a request carries: ``Authorization: Bearer`` (OpenAI; Anthropic SDKs
    from 2.x) or ``x-api-key`` (Anthropic's classic header)."""
    if api == "anthropic" and "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None


# -- wire formats -----------------------------------------------------------------------


def _answer_text(kind: str, schema: Any) -> str:
    if kind == "malformed":
        return '{"headline": "unterminated answer, [1, 2'
    if kind == "invalid":
        return json.dumps(broken_example(schema if schema is not None else {}))
    return json.dumps(schema_example(schema) if schema is not None else {}, ensure_ascii=False)


def _openai_body(index: int, body: Any, text: str, usage: tuple[int, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
    }


def _anthropic_body(
    index: int, body: Any, kind: str, text: str, usage: tuple[int, int]
) -> dict[str, Any]:
    tools = body.get("tools") or []
    tool_name = (body.get("tool_choice") or {}).get("name") or (tools[0]["name"] if tools else None)
    block: dict[str, Any]
    if tool_name and kind != "malformed":
        block = {
            "type": "tool_use",
            "id": f"toolu_fake_{index}",
            "name": tool_name,
            "input": json.loads(text),
        }
    else:
        block = {"type": "text", "text": text}
    return {
        "id": f"msg_fake_{index}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake"),
        "content": [block],
        "stop_reason": "tool_use" if block["type"] == "tool_use" else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


def _error_body(api: str, status: int) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error")
    message = f"fake {status} ({kind})"
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _error_headers(directive: Directive) -> dict[str, str]:
    opts = directive.options
    headers: dict[str, str] = {}
    if "retry_after" in opts:
        headers["Retry-After"] = f"{opts['retry_after']:g}"
    if "retry_after_ms" in opts:
        headers["retry-after-ms"] = f"{opts['retry_after_ms']:g}"
    if "retry_after_date" in opts:
        headers["Retry-After"] = email.utils.formatdate(
            time.time() + opts["retry_after_date"], usegmt=True
        )
    return headers


def _split(text: str, count: int) -> list[str]:
    """``text`` in ``count`` pieces of (nearly) equal length, none empty."""
    count = max(1, count)
    size = len(text)
    pieces = [text[i * size // count : (i + 1) * size // count] for i in range(count)]
    return [piece for piece in pieces if piece]


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _WireStream:
    """The events of one streamed answer in a provider's wire format."""

    def __init__(
        self, index: int, body: Any, kind: str, directive: Directive, usage: tuple[int, int]
    ) -> None:
        self.index = index
        self.body = body
        self.kind = kind
        self.model = body.get("model", "fake")
        self.truncated = bool(directive.options.get("truncated"))
        self.with_usage = not directive.options.get("nousage")
        self.usage = usage

    def head(self) -> list[bytes]:
        raise NotImplementedError

    def piece(self, text: str) -> bytes:
        raise NotImplementedError

    def tail(self) -> list[bytes]:
        raise NotImplementedError

    def done(self) -> list[bytes]:
        """What ends a stream that was cut with ``clean=1``."""
        return []

    def error(self, status: int) -> bytes:
        raise NotImplementedError


class _OpenAIStream(_WireStream):
    def _chunk(self, choices: list[Any], **extra: Any) -> bytes:
        return _sse(
            None,
            {
                "id": f"chatcmpl-fake-{self.index}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            },
        )

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    @property
    def _include_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    def _usage_field(self) -> dict[str, Any]:
        return {"usage": None} if self._include_usage else {}

    def head(self) -> list[bytes]:
        delta = {"role": "assistant", "content": "", "refusal": None}
        return [self._chunk([self._choice(delta)], **self._usage_field())]

    def piece(self, text: str) -> bytes:
        return self._chunk([self._choice({"content": text})], **self._usage_field())

    def tail(self) -> list[bytes]:
        reason = "length" if self.truncated else "stop"
        events = [self._chunk([self._choice({}, reason)], **self._usage_field())]
        if self._include_usage and self.with_usage:
            prompt, completion = self.usage
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            events.append(self._chunk([], usage=usage))
        return [*events, *self.done()]

    def done(self) -> list[bytes]:
        return [b"data: [DONE]\n\n"]

    def error(self, status: int) -> bytes:
        return _sse(None, _error_body("openai", status))


class _AnthropicStream(_WireStream):
    @property
    def _tool(self) -> str | None:
        tools = self.body.get("tools") or []
        wanted = (self.body.get("tool_choice") or {}).get("name")
        name = wanted or (tools[0]["name"] if tools else None)
        return name if self.kind != "malformed" else None

    def head(self) -> list[bytes]:
        message = {
            "id": f"msg_fake_{self.index}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Like the real API: the input tokens, and a first small output count.
            "usage": {"input_tokens": self.usage[0], "output_tokens": 1},
        }
        tool = self._tool
        block = (
            {"type": "tool_use", "id": f"toolu_fake_{self.index}", "name": tool, "input": {}}
            if tool
            else {"type": "text", "text": ""}
        )
        return [
            _sse("message_start", {"type": "message_start", "message": message}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
            _sse("ping", {"type": "ping"}),
        ]

    def piece(self, text: str) -> bytes:
        delta = (
            {"type": "input_json_delta", "partial_json": text}
            if self._tool
            else {"type": "text_delta", "text": text}
        )
        return _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def tail(self) -> list[bytes]:
        stop = "max_tokens" if self.truncated else "tool_use" if self._tool else "end_turn"
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
        }
        if self.with_usage:
            delta["usage"] = {"output_tokens": self.usage[1]}
        return [
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse("message_delta", delta),
            _sse("message_stop", {"type": "message_stop"}),
        ]

    def error(self, status: int) -> bytes:
        return _sse("error", _error_body("anthropic", status))


# -- HTTP handling ----------------------------------------------------------------------------


def _client_gone(sock: socket.socket) -> bool:
    """True when the peer closed its side: readable, and a peek reads EOF (or errors)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _handler_for(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the records are the log."""

        def finish(self) -> None:
            with contextlib.suppress(OSError):
                super().finish()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = None
            path = self.path.split("?", 1)[0]
            api = "anthropic" if path.endswith("/messages") else "openai"
            if not path.endswith(("/chat/completions", "/messages")):
                self.send_error(404, f"no route {path}")
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            record, directive = server._begin(api, path, headers, body)
            if not self._wait(directive.options.get("delay", 0.0)):
                server._finish(record, client_disconnected=True)
                return
            self._answer(record, directive, body if isinstance(body, dict) else {})

        def _wait(self, seconds: float) -> bool:
            """Sleep ``seconds`` unless the client leaves (False) or the server stops."""
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0 and not server._stopping.is_set():
                with contextlib.suppress(OSError):
                    select.select([self.connection], [], [], min(left, 0.02))
                if _client_gone(self.connection):
                    return False
            return not _client_gone(self.connection)

        def _answer(
            self, record: RecordedRequest, directive: Directive, body: dict[str, Any]
        ) -> None:
            kind = directive.kind
            if kind == "reset":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                self.close_connection = True
                server._finish(record, status=None)
                return
            streaming = body.get("stream") is True
            if kind == "badbody":
                if streaming:
                    event = _sse("message_start" if record.api == "anthropic" else None, None)
                    self._stream(record, directive, [], [event.replace(b"null", b"{ not json")], ())
                else:
                    self._reply(record, 200, b'{"choices": [ this is not json', {}, (0, 0))
                return
            if directive.status != 200:
                status = directive.status
                payload = json.dumps(_error_body(record.api, status)).encode()
                self._reply(record, status, payload, _error_headers(directive), (0, 0))
                return
            text = _answer_text(kind, record.schema)
            usage = server._usage(directive, body, text)
            if streaming:
                wire = _AnthropicStream if record.api == "anthropic" else _OpenAIStream
                events = wire(record.index, body, kind, directive, usage)
                pieces = _split(text, int(directive.options.get("chunks", 8)))
                self._stream(record, directive, pieces, events.head(), events.tail(), events)
                return
            answer = (
                _anthropic_body(record.index, body, kind, text, usage)
                if record.api == "anthropic"
                else _openai_body(record.index, body, text, usage)
            )
            self._reply(record, 200, json.dumps(answer).encode(), {}, usage)

        def _stream(
            self,
            record: RecordedRequest,
            directive: Directive,
            pieces: list[str],
            head: Sequence[bytes],
            tail: Sequence[bytes],
            events: _WireStream | None = None,
        ) -> None:
            """Write ``head``, one event per piece, then ``tail`` as a chunked SSE body,
            honouring ``chunk_delay``, ``cut`` (and its ``reset`` / ``clean`` /
            ``error``) and ``nousage``; record the outcome before the final events."""
            opts = directive.options
            if _client_gone(self.connection):
                self.close_connection = True
                server._finish(record, client_disconnected=True)
                return
            cut = int(opts["cut"]) if "cut" in opts else None
            incomplete = cut is not None or bool(opts.get("nousage"))
            gap = float(opts.get("chunk_delay", 0.0))
            record.streamed = True
            sent: list[str] = []
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in head:
                    self._chunk(event)
                for n, piece in enumerate(pieces):
                    if cut is not None and n >= cut:
                        break
                    if gap and not self._wait(gap):
                        raise ConnectionResetError("client left mid-stream")
                    assert events is not None
                    self._chunk(events.piece(piece))
                    with server._lock:
                        sent.append(piece)
                        record.pieces = list(sent)
                        server._lock.notify_all()
                if cut is not None:
                    self._cut(record, directive, events)
                    return
                if gap and not self._wait(gap):
                    raise ConnectionResetError("client left mid-stream")
                server._finish(
                    record,
                    status=200,
                    delivered=not incomplete,
                    cut=incomplete,
                    prompt_tokens=0 if incomplete else (events.usage[0] if events else 0),
                    completion_tokens=0 if incomplete else (events.usage[1] if events else 0),
                )
                for event in tail:
                    self._chunk(event)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True
                if record.answered_at is None:
                    server._finish(record, status=200, client_disconnected=True)
                else:
                    server._undeliver(record)

        def _cut(
            self, record: RecordedRequest, directive: Directive, events: _WireStream | None
        ) -> None:
            """End a stream before its final chunk, as ``directive`` says."""
            opts = directive.options
            server._finish(record, status=200, cut=True)
            if "error" in opts and events is not None:
                self._chunk(events.error(int(opts["error"])))
            # A body ended properly keeps the connection (the client may reuse it at
            # once: closing it after would race the client's next request).
            self.close_connection = not (opts.get("clean") or "error" in opts)
            if opts.get("reset"):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                return
            if opts.get("clean") or "error" in opts:
                if events is not None and opts.get("clean"):
                    for event in events.done():
                        self._chunk(event)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            # Otherwise the connection closes with the chunked body unfinished.

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _reply(
            self,
            record: RecordedRequest,
            status: int,
            data: bytes,
            headers: dict[str, str],
            usage: tuple[int, int],
        ) -> None:
            """Record the outcome, then write it: a client that has read the answer
            always finds the record complete. A failed write is corrected after."""
            if _client_gone(self.connection):
                self.close_connection = True
                server._finish(record, client_disconnected=True)
                return
            server._finish(
                record,
                status=status,
                delivered=True,
                prompt_tokens=usage[0],
                completion_tokens=usage[1],
            )
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                self.close_connection = True
                server._undeliver(record)

    return Handler


@contextlib.contextmanager
def fake_openai_server(**behaviour: Any) -> Iterator[FakeLLMServer]:
    """A running :class:`FakeLLMServer` whose ``base_url`` is for ``AsyncOpenAI``
    (``http://127.0.0.1:<port>/v1``). Keyword arguments as for ``set_behaviour``."""
    with FakeLLMServer("openai", **behaviour) as server:
        yield server


@contextlib.contextmanager
def fake_anthropic_server(**behaviour: Any) -> Iterator[FakeLLMServer]:
    """A running :class:`FakeLLMServer` whose ``base_url`` is for ``AsyncAnthropic``
    (``http://127.0.0.1:<port>``). Keyword arguments as for ``set_behaviour``."""
    with FakeLLMServer("anthropic", **behaviour) as server:
        yield server
