"""Anthropic Messages API as an :class:`LLMProvider`.

JSON is enforced with one forced tool whose ``input_schema`` is the step's schema
(``tool_choice={"type": "tool", "name": ...}``). The answer streams (``stream=True``,
raw events): the tool input arrives as ``input_json_delta`` partial JSON, each piece
goes to ``on_text``, and the pieces joined are the answer's JSON text, parsed and
validated by the pipeline like any other provider's answer. A reply without a
``tool_use`` block falls back to its text blocks (``text_delta`` pieces). SDK
retries are off and each call is bounded by ``LLMRequest.timeout_s``, as in
:mod:`adapters.llm_openai`.

Usage is exact: ``message_start`` carries the input tokens (and a first output
count), ``message_delta`` the final cumulative counts, whose fields win. A stream
without ``message_stop``, or whose ``message_delta`` brought no usage, was cut
before its end: a transient ``llm_unavailable``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from anthropic import AsyncAnthropic

from adapters import llm_errors
from adapters.llm_openai import schema_name
from pipeline.model import LLMReply, LLMRequest
from pipeline.ports import TextSink

log = structlog.get_logger(__name__)

CONTINUE = "(continue)"
"""Opening user turn when the history starts with the assistant: the API wants a user first."""


class AnthropicProvider:
    """``complete()`` answers one :class:`LLMRequest` through ``/v1/messages``."""

    name = "anthropic"

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None = None,
        *,
        client: AsyncAnthropic | None = None,
    ) -> None:
        self._client = client or AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0)

    async def complete(self, request: LLMRequest, on_text: TextSink | None = None) -> LLMReply:
        tool = schema_name(request.schema_name)
        system, messages = _conversation(request)
        answer = _Answer(on_text)
        try:
            async with asyncio.timeout(request.timeout_s):
                stream: Any = await self._client.messages.create(
                    model=request.model,
                    max_tokens=request.max_tokens,
                    system=system,
                    messages=messages,
                    tools=[
                        {
                            "name": tool,
                            "description": f"Record the {request.step} result.",
                            "input_schema": request.schema,
                        }
                    ],
                    tool_choice={"type": "tool", "name": tool},
                    timeout=request.timeout_s,
                    stream=True,
                )
                async with stream:  # closes the response however the reading ends
                    async for event in stream:
                        answer.add(event)
        except TimeoutError:
            raise llm_errors.timeout_error(self.name, request.step, request.timeout_s) from None
        except Exception as exc:
            raise llm_errors.classify(self.name, request.step, exc, request.timeout_s) from exc
        return self._reply(request, answer)

    async def aclose(self) -> None:
        await self._client.close()

    def _reply(self, request: LLMRequest, answer: _Answer) -> LLMReply:
        if not answer.stopped or not answer.final_usage:
            missing = "message_stop" if not answer.stopped else "message_delta usage"
            raise llm_errors.cut_stream(self.name, request.step, missing, answer.received)
        text = answer.text()
        if text is None:
            raise llm_errors.invalid_output(self.name, request.step, "neither tool_use nor text")
        model = answer.model or request.model
        if answer.stop_reason == "max_tokens":
            log.warning("llm_output_truncated", provider=self.name, step=request.step, model=model)
        usage = answer.usage
        prompt_tokens = sum(
            _int(usage.get(key))
            for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        return LLMReply(
            text=text,
            model=str(model),
            prompt_tokens=prompt_tokens,
            completion_tokens=_int(usage.get("output_tokens")),
        )


_USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


class _Answer:
    """What the events of one stream said so far. Read defensively (attributes or
    keys): the SDK does not validate events. The first ``tool_use`` block's partial
    JSON is the answer and goes to ``on_text``; text blocks do too, as the fallback
    answer (with a forced tool the model writes no text before the tool call)."""

    def __init__(self, on_text: TextSink | None) -> None:
        self.on_text = on_text
        self.tool_index: Any = None
        self.tool_json: list[str] = []
        self.texts: list[str] = []
        self.kinds: dict[Any, Any] = {}
        self.usage: dict[str, Any] = {}
        self.final_usage = False
        self.model: Any = None
        self.stop_reason: Any = None
        self.stopped = False
        self.received = 0

    def add(self, event: Any) -> None:
        kind = _get(event, "type")
        if kind == "content_block_delta":
            self._delta(_get(event, "index"), _get(event, "delta"))
        elif kind == "content_block_start":
            index, block = _get(event, "index"), _get(event, "content_block")
            self.kinds[index] = _get(block, "type")
            if self.kinds[index] == "tool_use" and self.tool_index is None:
                self.tool_index = index
        elif kind == "message_start":
            message = _get(event, "message")
            self.model = _get(message, "model")
            self._usage(_get(message, "usage"))
        elif kind == "message_delta":
            self.stop_reason = _get(_get(event, "delta"), "stop_reason")
            self.final_usage = self._usage(_get(event, "usage")) or self.final_usage
        elif kind == "message_stop":
            self.stopped = True

    def _delta(self, index: Any, delta: Any) -> None:
        if index == self.tool_index and _get(delta, "type") == "input_json_delta":
            piece = _get(delta, "partial_json")
            parts = self.tool_json
        elif self.kinds.get(index) == "text" and _get(delta, "type") == "text_delta":
            piece = _get(delta, "text")
            parts = self.texts
        else:
            return
        if isinstance(piece, str) and piece:
            parts.append(piece)
            self.received += len(piece)
            if self.on_text is not None:
                self.on_text(piece)

    def _usage(self, usage: Any) -> bool:
        """Take the counts ``usage`` reports (cumulative: later ones win)."""
        found = False
        for key in _USAGE_KEYS:
            value = _get(usage, key)
            if value is not None:
                self.usage[key] = value
                found = True
        return found

    def text(self) -> str | None:
        """The answer's text, once the stream ended."""
        if self.tool_index is not None:
            if not self.tool_json:  # an empty tool input streams no JSON: it is ``{}``
                self._delta(self.tool_index, {"type": "input_json_delta", "partial_json": "{}"})
            return "".join(self.tool_json)
        return "".join(self.texts) if self.kinds and "text" in self.kinds.values() else None


def _conversation(request: LLMRequest) -> tuple[str, list[Any]]:
    """System text and alternating user/assistant turns ending with the prompt.
    Consecutive turns of one role are joined; ``system`` turns join the system text."""
    system = [request.system] if request.system else []
    turns: list[dict[str, str]] = []
    for role, content in (*request.history, ("user", request.prompt)):
        if role == "system":
            system.append(content)
            continue
        role = "assistant" if role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += f"\n\n{content}"
        else:
            turns.append({"role": role, "content": content})
    if turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": CONTINUE})
    return "\n\n".join(system), turns


def _get(obj: Any, key: str) -> Any:
    """Attribute or key: the SDK builds loose objects (or leaves dicts) from odd bodies."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
