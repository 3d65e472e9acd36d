"""Artifact hashes (sha256 of canonical JSON, SPEC §5) and step cache keys."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import msgspec

from pipeline.model import Artifact, now_ms


class _FloatFormDiffers(Exception):
    pass


def _python_float_form(literal: str) -> float:
    """Reject a float literal that Python's ``repr`` would write differently: msgspec
    writes ``1e-7`` for ``1e-07``, ``1e16`` for ``1e+16``, ``0.00001`` for ``1e-05``."""
    if "e" in literal or "0.0000" in literal:
        raise _FloatFormDiffers
    return 0.0


_float_check = msgspec.json.Decoder(float_hook=_python_float_form)
"""Reads msgspec's output back (in C, a tenth or less of the time a regex scan over
it took) only to see its float literals."""


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, compact separators, UTF-8 (SPEC §5), floats as
    Python writes them and NaN/infinity as ``null`` (as msgspec, the Redis store and the
    API write them; answers validated by pydantic never hold them).

    Encoded by msgspec in C (it was a twentieth of a worker's CPU per step); where its
    float form could differ from Python's, ``json.dumps`` writes it instead."""
    try:
        raw = msgspec.json.encode(value, order="sorted")
        _float_check.decode(raw)
        return raw
    except (TypeError, OverflowError, _FloatFormDiffers):  # or ints beyond 64 bits
        pass
    return json.dumps(
        _finite(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``, as msgspec writes them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


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
