"""OpenAI chat completions (and any OpenAI-compatible server) as an :class:`LLMProvider`.

- The SDK's own retries are off (``max_retries=0``): the pipeline retries, so every
  attempt shows up in the job's trace.
- Each call is bounded by ``LLMRequest.timeout_s``, both as the SDK's HTTP timeout
  and as an overall ``asyncio.timeout`` (an HTTP read timeout alone restarts with
  every byte a slow server trickles).
- Cancelling the awaiting task cancels the SDK's ``httpx`` request, which closes
  the connection: the server sees the client go away.

The answer streams (``stream=True``, ``stream_options={"include_usage": True}``):
each piece of ``delta.content`` goes to ``on_text`` as it arrives. The token counts
are the final usage chunk's (empty ``choices``, sent before ``data: [DONE]``). A
stream that ends without a ``finish_reason`` or without that usage chunk (the
connection reset, the server closing mid-answer, a proxy ending the body early) is
a transient ``llm_unavailable``: the partial text is never an answer.

Structured output, ``json_mode``:

``json_schema`` (default)
    ``response_format={"type": "json_schema", "json_schema": {name, schema, strict: False}}``.
    OpenAI and recent vLLM / Ollama / LM Studio versions honour it.
``json_object``
    For OpenAI-compatible servers without ``json_schema`` support:
    ``response_format={"type": "json_object"}`` and the schema goes into the
    system message. Chosen with ``OPENAI_JSON_MODE=json_object``.

Against the official endpoint (no ``base_url``) the output budget is sent as
``max_completion_tokens`` (newer OpenAI models reject ``max_tokens``); against a
compatible server as ``max_tokens``, which they all understand.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import structlog
from openai import AsyncOpenAI, omit

from adapters import llm_errors
from pipeline.model import LLMError, LLMReply, LLMRequest
from pipeline.ports import TextSink

log = structlog.get_logger(__name__)

JSON_MODES = ("json_schema", "json_object")
NO_KEY = "not-needed"
"""Local OpenAI-compatible servers often need no key, but the SDK insists on one."""

_NAME_RE = re.compile(r"[^a-zA-Z0-9_-]")


def schema_name(name: str) -> str:
    """OpenAI and Anthropic accept ``[a-zA-Z0-9_-]{1,64}`` as schema / tool names."""
    return _NAME_RE.sub("_", name)[:64] or "answer"


def schema_instruction(schema: dict[str, Any]) -> str:
    """The schema spelled out in the prompt, for servers that cannot enforce it."""
    return (
        "Answer with one JSON object only, no prose, matching this JSON schema:\n"
        f"```json\n{json.dumps(schema, ensure_ascii=False)}\n```"
    )


class OpenAIProvider:
    """``complete()`` answers one :class:`LLMRequest` through ``/chat/completions``."""

    name = "openai"

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None = None,
        *,
        json_mode: str = "json_schema",
        client: AsyncOpenAI | None = None,
    ) -> None:
        if json_mode not in JSON_MODES:
            raise ValueError(f"OPENAI_JSON_MODE={json_mode!r} must be one of {JSON_MODES}")
        self.json_mode = json_mode
        self.base_url = base_url
        self._client = client or AsyncOpenAI(
            api_key=api_key or NO_KEY, base_url=base_url, max_retries=0
        )

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        answer = _Answer()
        try:
            async with asyncio.timeout(request.timeout_s):
                stream: Any = await self._client.chat.completions.create(
                    model=request.model,
                    messages=self._messages(request),
                    response_format=self._response_format(request),
                    timeout=request.timeout_s,
                    max_tokens=request.max_tokens if self.base_url else omit,
                    max_completion_tokens=omit if self.base_url else request.max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async with stream:  # closes the response however the reading ends
                    async for chunk in stream:
                        answer.add(chunk, on_text)
        except TimeoutError:
            raise llm_errors.timeout_error(self.name, request.step, request.timeout_s) from None
        except _NotAChunk as exc:
            raise llm_errors.invalid_output(self.name, request.step, str(exc)) from None
        except Exception as exc:
            raise llm_errors.classify(self.name, request.step, exc, request.timeout_s) from exc
        return self._reply(request, answer)

    async def aclose(self) -> None:
        await self._client.close()

    # -- request ----------------------------------------------------------

    def _messages(self, request: LLMRequest) -> list[Any]:
        system = request.system
        if self.json_mode == "json_object":
            system = f"{system}\n\n{schema_instruction(request.schema)}".strip()
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        messages += [{"role": role, "content": content} for role, content in request.history]
        messages.append({"role": "user", "content": request.prompt})
        return messages

    def _response_format(self, request: LLMRequest) -> Any:
        if self.json_mode == "json_object":
            return {"type": "json_object"}
        return {
            "type": "json_schema",
            "json_schema": {
                "name": schema_name(request.schema_name),
                "schema": request.schema,
                "strict": False,
            },
        }

    # -- reply ------------------------------------------------------------

    def _reply(self, request: LLMRequest, answer: _Answer) -> LLMReply:
        if answer.finish_reason is None or answer.usage is None:
            missing = "finish_reason" if answer.finish_reason is None else "usage"
            raise llm_errors.cut_stream(self.name, request.step, missing, len(answer.text))
        if not answer.has_content:
            refusal = "".join(answer.refusal)
            why = f"refused: {refusal}" if refusal else "no message content"
            raise llm_errors.invalid_output(self.name, request.step, why)
        model = answer.model or request.model
        if answer.finish_reason == "length":
            log.warning("llm_output_truncated", provider=self.name, step=request.step, model=model)
        return LLMReply(
            text=answer.text,
            model=str(model),
            prompt_tokens=_int(_get(answer.usage, "prompt_tokens")),
            completion_tokens=_int(_get(answer.usage, "completion_tokens")),
        )


class _NotAChunk(Exception):
    """A stream event that is not a ``chat.completion.chunk``."""


class _Answer:
    """What the chunks of one stream said so far. Read defensively: the SDK does
    not validate chunks, so a compatible server's odd ones arrive as loose objects,
    dicts or bare values."""

    __slots__ = ("finish_reason", "has_content", "model", "pieces", "refusal", "usage")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.refusal: list[str] = []
        self.has_content = False
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.model: Any = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, chunk: Any, on_text: TextSink | None) -> None:
        choices = _get(chunk, "choices")
        if not isinstance(choices, list):
            raise _NotAChunk(f"not a chat completion chunk ({type(chunk).__name__})")
        self.model = self.model or _get(chunk, "model")
        usage = _get(chunk, "usage")
        if usage is not None:
            self.usage = usage  # the last one is the whole request's
        for choice in choices:
            if _get(choice, "index") not in (0, None):
                continue
            delta = _get(choice, "delta")
            content = _get(delta, "content")
            if isinstance(content, str):
                self.has_content = True
                if content:
                    self.pieces.append(content)
                    if on_text is not None:
                        on_text(content)
            refusal = _get(delta, "refusal")
            if isinstance(refusal, str):
                self.refusal.append(refusal)
            reason = _get(choice, "finish_reason")
            if reason:
                self.finish_reason = str(reason)


def _get(obj: Any, key: str) -> Any:
    """Attribute or key: the SDK builds loose objects (or leaves dicts) from odd chunks."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


__all__ = ["LLMError", "OpenAIProvider", "schema_instruction", "schema_name"]
