"""Artifact hashes (sha256 of canonical JSON, SPEC §5) and step cache keys."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from adapters.ports import Artifact, canonical_json, now_ms


def sha256_hex(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


def content_hash(value: Any) -> str:
    return sha256_hex(canonical_json(value))


def make_artifact(name: str, type: str, data: Any) -> Artifact:
    """An artifact stamped now; ``size`` is the byte length of its canonical JSON."""
    raw = canonical_json(data)
    return Artifact(
        name=name, type=type, data=data, hash=sha256_hex(raw), timestamp=now_ms(), size=len(raw)
    )


def verify_artifact(artifact: Artifact) -> bool:
    return content_hash(artifact.data) == artifact.hash


def cache_key(
    step: str, prompt_version: str, model: str, language: str, inputs: Mapping[str, str]
) -> str:
    """Step cache key: the step, its prompt version, model, language and the hashes of
    the artifacts it reads (``inputs`` maps artifact name to hash)."""
    return content_hash(
        {
            "step": step,
            "prompt_version": prompt_version,
            "model": model,
            "language": language,
            "inputs": dict(inputs),
        }
    )
