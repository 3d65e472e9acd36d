"""Anthropic Messages API as an :class:`LLMProvider`.

JSON is enforced with one forced tool whose ``input_schema`` is the step's schema
(``tool_choice={"type": "tool", "name": ...}``); the ``tool_use`` block's input is
serialised back to JSON text so the pipeline parses and validates it like any
other provider's answer. A reply without a ``tool_use`` block falls back to its
text. SDK retries are off and each call is bounded by ``LLMRequest.timeout_s``,
as in :mod:`adapters.llm_openai`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from anthropic import AsyncAnthropic

from adapters import llm_errors
from adapters.llm_openai import schema_name
from pipeline.model import LLMReply, LLMRequest

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

    async def complete(self, request: LLMRequest) -> LLMReply:
        tool = schema_name(request.schema_name)
        system, messages = _conversation(request)
        try:
            async with asyncio.timeout(request.timeout_s):
                message: Any = await self._client.messages.create(
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
                )
        except TimeoutError:
            raise llm_errors.timeout_error(self.name, request.step, request.timeout_s) from None
        except Exception as exc:
            raise llm_errors.classify(self.name, request.step, exc, request.timeout_s) from exc
        return self._reply(request, message)

    async def aclose(self) -> None:
        await self._client.close()

    def _reply(self, request: LLMRequest, message: Any) -> LLMReply:
        try:
            blocks = list(message.content)
            usage = message.usage
            model = message.model or request.model
        except (AttributeError, TypeError) as exc:
            raise llm_errors.invalid_output(
                self.name, request.step, f"not a message ({type(exc).__name__})"
            ) from exc
        text = _tool_input(blocks)
        if text is None:
            text = _text(blocks)
        if text is None:
            raise llm_errors.invalid_output(self.name, request.step, "neither tool_use nor text")
        if _get(message, "stop_reason") == "max_tokens":
            log.warning("llm_output_truncated", provider=self.name, step=request.step, model=model)
        prompt_tokens = sum(
            _int(_get(usage, key))
            for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        return LLMReply(
            text=text,
            model=str(model),
            prompt_tokens=prompt_tokens,
            completion_tokens=_int(_get(usage, "output_tokens")),
        )


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


def _tool_input(blocks: list[Any]) -> str | None:
    for block in blocks:
        if _get(block, "type") == "tool_use":
            return json.dumps(_get(block, "input"), ensure_ascii=False)
    return None


def _text(blocks: list[Any]) -> str | None:
    texts = [_get(b, "text") for b in blocks if _get(b, "type") == "text"]
    strings = [t for t in texts if isinstance(t, str)]
    return "".join(strings) if strings else None


def _get(obj: Any, key: str) -> Any:
    """Attribute or key: the SDK builds loose objects (or leaves dicts) from odd bodies."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
