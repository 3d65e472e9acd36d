"""The code steps: ``input`` (step 1) and ``assemble`` (step 15). ``validate`` lives in
:mod:`pipeline.validation`."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from pipeline.graph import SECTION_STEPS
from pipeline.hashing import sha256_hex
from pipeline.prompts import PROMPT_VERSION
from pipeline.request import JobRequest

_SPACES = re.compile(r"[ \t\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise_pitch(text: str) -> str:
    """NFC, Unix newlines, single spaces, at most one blank line, trimmed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def build_pitch(request: JobRequest) -> dict[str, Any]:
    """The ``pitch`` artifact: what every later step knows about the input."""
    title = unicodedata.normalize("NFC", " ".join(request.project_title.split()))
    pitch = normalise_pitch(request.elevator_pitch)
    return {
        "title": title,
        "pitch": pitch,
        "pitch_hash": sha256_hex(pitch),
        "language": request.language,
        "target": request.target,
        "geo": request.geo,
    }


def assemble_dossier(
    artifacts: Mapping[str, Any], *, provider: str, models: Mapping[str, str]
) -> dict[str, Any]:
    """The ``dossier`` artifact from all others (artifact name -> data). Holds no job
    id or clock time, so the same input yields the same dossier hash."""
    pitch = artifacts["pitch"]
    return {
        "title": pitch["title"],
        "language": pitch["language"],
        "target": pitch["target"],
        "geo": pitch["geo"],
        "pitch": pitch["pitch"],
        "brief": artifacts["brief"],
        "evidence": artifacts["sources"],
        "sections": {name: artifacts[f"section_{name}"] for name in SECTION_STEPS},
        "validation": artifacts["validation"],
        "investor_score": artifacts["investor_score"],
        "meta": {
            "provider": provider,
            "offline": provider == "offline",
            "models": dict(models),
            "prompt_version": PROMPT_VERSION,
            "pitch_hash": pitch["pitch_hash"],
        },
    }
