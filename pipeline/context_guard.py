"""The context guard (SPEC 7.3): before each LLM call, the prompt's tokens are
estimated against the model's context window minus the output reserve; a prompt
that would not fit loses its least relevant evidence until it does, and one that
cannot fit even with no evidence left fails the step with ``llm_context_overflow``
before any request is made.

Tokens are *estimated*, not counted: OpenAI's tokenizer (tiktoken) downloads its
BPE tables at run time and Anthropic has no local tokenizer, so the estimate is
one token per 3.5 characters of ASCII text and one per 2.5 UTF-8 bytes of any
other text (German umlauts, CJK), rounded up, plus a few tokens per message. Real
tokenizers give about 4 characters per token for English prose and 3-3.5 for
JSON, so the estimate errs on the large side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

CHARS_PER_TOKEN_ASCII = 3.5
BYTES_PER_TOKEN_OTHER = 2.5
MESSAGE_OVERHEAD_TOKENS = 8
"""Role markers and framing per message, and the request's own framing once."""

DEFAULT_CONTEXT_WINDOW = 8192
"""Tokens assumed for a model the table below does not know (``LLM_CONTEXT_<MODEL>``
sets the real one)."""

CONTEXT_ENV_PREFIX = "LLM_CONTEXT_"
MAX_OUTPUT_TOKENS = 4096
"""The answer's reserve (``LLMRequest.max_tokens``) where the window is large enough."""


def output_reserve(ctx_max: int) -> int:
    """Tokens kept free for the answer (and asked for as ``max_tokens``): 4096, or half
    the window when that is smaller (a 4k local model keeps 2k for the prompt)."""
    return min(MAX_OUTPUT_TOKENS, ctx_max // 2)


KNOWN_CONTEXT_WINDOWS: dict[str, int] = {
    # the offline provider has no model: no limit worth guarding
    "offline": 1_000_000,
    # OpenAI
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
    "o1-mini": 128_000,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    # Anthropic
    "claude-3-5": 200_000,
    "claude-3-7": 200_000,
    "claude-3": 200_000,
    "claude-sonnet-4": 200_000,
    "claude-opus-4": 200_000,
    "claude-haiku-4": 200_000,
    "claude-sonnet": 200_000,
    "claude-opus": 200_000,
    "claude-haiku": 200_000,
    "claude": 200_000,
    # common local models (Ollama / llama.cpp names); servers often run them smaller
    "llama3.1": 131_072,
    "llama3.2": 131_072,
    "llama3.3": 131_072,
    "llama3": 8_192,
    "llama2": 4_096,
    "mistral-nemo": 131_072,
    "mistral-small": 32_768,
    "mistral-large": 131_072,
    "mistral": 32_768,
    "mixtral": 32_768,
    "qwen3": 40_960,
    "qwen2.5": 32_768,
    "qwen2": 32_768,
    "qwen": 32_768,
    "gemma3": 131_072,
    "gemma2": 8_192,
    "phi4": 16_384,
    "phi3": 4_096,
    "deepseek-r1": 131_072,
}
"""Context windows in tokens by model name, matched exactly or as the longest prefix
(``gpt-4o-mini-2024-07-18`` -> ``gpt-4o``, ``qwen3:8b`` -> ``qwen3``); a provider
prefix (``openai/``, ``ollama/``) is ignored."""

_NOT_WORD = re.compile(r"[^A-Za-z0-9]")
_WORD = re.compile(r"\w{3,}")


@cache
def context_env_key(model: str) -> str:
    """The ``<MODEL>`` part of ``LLM_CONTEXT_<MODEL>``: upper case, every character
    other than a letter or digit as ``_`` (``gpt-4o-mini`` -> ``GPT_4O_MINI``)."""
    return _NOT_WORD.sub("_", model.upper())


@cache
def known_context_window(model: str) -> int:
    """The shipped context window of ``model``, or :data:`DEFAULT_CONTEXT_WINDOW`."""
    name = model.lower().rsplit("/", 1)[-1]
    if name in KNOWN_CONTEXT_WINDOWS:
        return KNOWN_CONTEXT_WINDOWS[name]
    best = max((p for p in KNOWN_CONTEXT_WINDOWS if name.startswith(p)), key=len, default=None)
    return KNOWN_CONTEXT_WINDOWS[best] if best is not None else DEFAULT_CONTEXT_WINDOW


def context_window(model: str, overrides: Mapping[str, int]) -> int:
    """Tokens of ``model``'s context window: ``LLM_CONTEXT_<MODEL>`` (``overrides``,
    keyed by :func:`context_env_key`) first, then the shipped table."""
    if overrides:
        found = overrides.get(context_env_key(model))
        if found is not None:
            return found
    return known_context_window(model)


def estimate_text(text: str) -> int:
    """Estimated tokens of one text (see the module's docstring)."""
    if text.isascii():  # O(1) in CPython: the string knows its kind
        return math.ceil(len(text) / CHARS_PER_TOKEN_ASCII)
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_OTHER)


def estimate_tokens(system: str, prompt: str, history: tuple[tuple[str, str], ...] = ()) -> int:
    """Estimated prompt tokens of a request: system, prompt and earlier turns."""
    total = estimate_text(system) + estimate_text(prompt) + MESSAGE_OVERHEAD_TOKENS * (3 + len(history))
    for _, content in history:
        total += estimate_text(content)
    return total


class ContextOverflow(Exception):
    """Even without any evidence the prompt does not fit the context window."""

    def __init__(self, tokens: int, budget: int, trimmed: bool = False) -> None:
        super().__init__(f"~{tokens} prompt tokens, {budget} available")
        self.tokens = tokens
        self.budget = budget
        self.trimmed = trimmed
        """Whether the evidence was dropped before giving up."""


@dataclass(frozen=True)
class Fitted:
    """A prompt that fits: its texts, the inputs it was rendered from, the estimate."""

    system: str
    prompt: str
    inputs: dict[str, Any]
    tokens: int
    dropped: int = 0
    """Sources left out of the evidence (0: nothing was trimmed)."""


def _words(value: Any, out: set[str]) -> None:
    if isinstance(value, str):
        out.update(w.lower() for w in _WORD.findall(value))
    elif isinstance(value, dict):
        for item in value.values():
            _words(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _words(item, out)


def topic_words(inputs: Mapping[str, Any]) -> set[str]:
    """Words of what the step is about: the pitch (title, pitch), the brief's title
    and text and the evidence's topics, lower-cased, three letters or more."""
    words: set[str] = set()
    pitch = inputs.get("pitch")
    if isinstance(pitch, dict):
        _words([pitch.get("title"), pitch.get("pitch")], words)
    brief = inputs.get("brief")
    if isinstance(brief, dict):
        _words([brief.get("project_title"), brief.get("brief")], words)
    sources = inputs.get("sources")
    if isinstance(sources, dict):
        _words(sources.get("topics"), words)
    return words


def drop_order(sources: list[Any], topic: set[str]) -> list[int]:
    """Indexes of ``sources``, least relevant first: by ``reliability_score``
    ascending, then by how few words they share with the step's topic, then the
    later one first."""

    def rank(index: int) -> tuple[float, int, int]:
        source = sources[index]
        if not isinstance(source, dict):
            return (-1.0, -1, -index)
        score = source.get("reliability_score")
        reliability = float(score) if isinstance(score, (int, float)) else 0.0
        words: set[str] = set()
        _words([source.get("title"), source.get("key_findings"), source.get("usage_note")], words)
        return (reliability, len(words & topic), -index)

    return sorted(range(len(sources)), key=rank)


Render = Callable[[dict[str, Any], bool], tuple[str, str]]
"""(inputs, changed) -> (system, prompt); ``changed`` says the evidence is no longer
the artifact as stored (renderings cached by its hash must not be used)."""


def fit(
    system: str,
    prompt: str,
    inputs: dict[str, Any],
    budget: int,
    render: Render,
) -> Fitted:
    """``(system, prompt)`` if its estimate is within ``budget`` tokens (the common
    case: one length check). Otherwise the fewest least-relevant sources dropped from
    the ``sources`` input (binary search over how many) for the re-rendered prompt to
    fit; :class:`ContextOverflow` when even none left does not fit."""
    tokens = estimate_tokens(system, prompt)
    if tokens <= budget:
        return Fitted(system, prompt, inputs, tokens)
    evidence = inputs.get("sources")
    sources = evidence.get("sources") if isinstance(evidence, dict) else None
    if not isinstance(evidence, dict) or not isinstance(sources, list) or not sources:
        raise ContextOverflow(tokens, budget)
    order = drop_order(sources, topic_words(inputs))

    def attempt(drop: int) -> Fitted:
        gone = set(order[:drop])
        kept = [s for i, s in enumerate(sources) if i not in gone]
        trimmed = {**inputs, "sources": {**evidence, "sources": kept}}
        new_system, new_prompt = render(trimmed, True)
        return Fitted(new_system, new_prompt, trimmed, estimate_tokens(new_system, new_prompt), drop)

    smallest = attempt(len(sources))
    if smallest.tokens > budget:
        raise ContextOverflow(smallest.tokens, budget, trimmed=True)
    lo, hi, best = 1, len(sources) - 1, smallest
    while lo <= hi:  # fewest drops that fit; fitting is monotone in the number dropped
        mid = (lo + hi) // 2
        candidate = attempt(mid)
        if candidate.tokens <= budget:
            best, hi = candidate, mid - 1
        else:
            lo = mid + 1
    return best
