"""Prompt templates: ``pipeline/prompts/<language>/<step>.md``, loaded as package data.

A template has a system part and a user part, split by ``<!-- user -->``. Its
``$placeholders`` are filled only from the step's input artifacts (plus the job
language), so a template that reaches for anything else fails to render. The JSON
schema of the answer is appended by code, so template and schema cannot drift.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from functools import cache
from importlib import resources
from string import Template
from typing import Any

import msgspec

from pipeline.graph import SECTION_STEPS
from pipeline.hashing import sha256_hex

PROMPT_VERSION = "1"
"""Bump on a change of meaning that the template text alone does not show (e.g. the
schema's interpretation); every template's own digest enters the cache key anyway."""

LANGUAGES = ("de", "en")
LANGUAGE_NAMES = {
    "de": {"de": "deutsch", "en": "englisch"},
    "en": {"de": "German", "en": "English"},
}
SYSTEM_MARK = "<!-- system -->"
USER_MARK = "<!-- user -->"


@cache
def _text(language: str, name: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"unsupported language {language!r}")
    return resources.files("pipeline").joinpath(f"prompts/{language}/{name}.md").read_text("utf-8")


@cache
def template(step: str, language: str) -> tuple[str, str]:
    """(system, user) template texts of ``step`` in ``language``."""
    raw = _text(language, step)
    system, sep, user = raw.partition(USER_MARK)
    if not sep:
        raise ValueError(f"prompt {language}/{step}.md has no {USER_MARK} line")
    return system.replace(SYSTEM_MARK, "").strip(), user.strip()


@cache
def prompt_version(step: str, language: str) -> str:
    """Version of one step's prompt for the cache key: constant plus template digest."""
    digest = sha256_hex(_text(language, step) + _text(language, "_format"))[:16]
    return f"{PROMPT_VERSION}:{digest}"


TEXT_CACHE_SIZE = 1024
"""Rendered artifacts kept per process, by content hash. Most inputs (brief,
sources) feed ten steps of the same job; rendering them once saves the pure-Python
JSON encoder (``indent`` disables the C one) nine times."""

_texts: OrderedDict[str, str] = OrderedDict()


def _as_text(value: Any) -> str:
    """JSON with one-space indentation, as ``json.dumps(value, indent=1)`` writes it
    (keys in their order, text unescaped), encoded and indented by msgspec in C:
    ``indent`` switches json's C encoder off."""
    return msgspec.json.format(msgspec.json.encode(value), indent=1).decode()


def _artifact_text(value: Any, digest: str | None) -> str:
    """``_as_text(value)``, remembered by the artifact's content hash when known."""
    if digest is None:
        return _as_text(value)
    text = _texts.get(digest)
    if text is None:
        text = _texts[digest] = _as_text(value)
        if len(_texts) > TEXT_CACHE_SIZE:
            _texts.popitem(last=False)
    else:
        _texts.move_to_end(digest)
    return text


@cache
def used_placeholders(step: str, language: str) -> frozenset[str]:
    """The ``$names`` the user template of ``step`` refers to."""
    return frozenset(Template(template(step, language)[1]).get_identifiers())


def placeholders(
    language: str,
    inputs: dict[str, Any],
    hashes: Mapping[str, str] | None = None,
    needed: Collection[str] | None = None,
) -> dict[str, str]:
    """Values for ``$names`` from the step's input artifacts (name -> data).
    ``hashes`` (artifact name -> content hash) lets renderings be reused across
    steps; ``needed`` limits the work to the names a template uses."""
    hashes = hashes or {}
    pitch = inputs.get("pitch")
    pitch_fields = ("title", "pitch", "target", "geo") if isinstance(pitch, dict) else ()
    values = {
        name: _artifact_text(data, hashes.get(name))
        for name, data in inputs.items()
        if (needed is None or name in needed) and name not in pitch_fields
    }
    if isinstance(pitch, dict):
        for key in pitch_fields:
            values[key] = str(pitch.get(key, ""))
    if needed is None or "sections" in needed:
        sections = {
            name: inputs[f"section_{name}"] for name in SECTION_STEPS if f"section_{name}" in inputs
        }
        if len(sections) == len(SECTION_STEPS):
            values["sections"] = _as_text(sections)
    values["language"] = language
    values["language_name"] = LANGUAGE_NAMES[language][language]
    return values


def render(
    step: str,
    language: str,
    inputs: dict[str, Any],
    schema: dict[str, Any],
    hashes: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """(system, prompt) for one LLM call of ``step``. Raises ``KeyError`` if the template
    uses a placeholder the step's inputs do not provide. ``hashes``: see ``placeholders``."""
    system, user = template(step, language)
    values = placeholders(language, inputs, hashes, used_placeholders(step, language))
    body = Template(user).substitute(values)
    answer_format = _text(language, "_format").strip()
    schema_text = msgspec.json.encode(schema).decode()
    return system, f"{body}\n\n{answer_format}\n{schema_text}"


def repair_prompt(language: str, error: str) -> str:
    """The follow-up turn after an invalid answer, quoting what was wrong."""
    return Template(_text(language, "_repair").strip()).substitute(error=error)
