"""A TypeScript client generated from /schema/openapi.json compiles (SPEC 7.3): types from
``openapi-typescript``, checked by ``tsc --noEmit`` on a small program that builds a
``JobRequest``, reads ``Job.progress`` and expects a type error for a wrong language.

The two npm packages (pinned) are installed once into a cache directory
(``$XDG_CACHE_HOME/jobq/openapi-ts``, else ``~/.cache/...``). Skipped, with the reason,
only where node or npm is absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_openapi import DOCUMENT

PACKAGES = ("openapi-typescript@7.13.0", "typescript@5.9.3")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jobq" / "openapi-ts"

PROGRAM = """
import type { components, paths } from "./api";

type JobRequest = components["schemas"]["JobRequest"];
type Job = components["schemas"]["Job"];
type Created = paths["/api/jobs"]["post"]["responses"][202]["content"]["application/json"];
type Failure = paths["/api/jobs"]["post"]["responses"][400]["content"]["application/json"];
type Event = components["schemas"]["JobSummary"] | components["schemas"]["DoneEvent"];

export const request: JobRequest = {
  project_title: "Solar Mesh",
  elevator_pitch: "Community solar micro-grids.",
  language: "en",
  parallel_limit: 4,
};

export function percentage(job: Job): number {
  const step: string = job.progress.step;
  return step.length >= 0 ? job.progress.percentage : 0;
}

export function firstProblem(failure: Failure): string | undefined {
  return failure.details?.[0]?.field;
}

export const created: Created = {
  jobId: "j",
  status: "queued",
  message: "job accepted",
  streamUrl: "/api/jobs/j/stream",
};
export const events: Event[] = [{ status: "completed" }];

// @ts-expect-error: language is "de" or "en"
export const wrong: JobRequest = { project_title: "x", language: "fr" };
"""


def _tools() -> Path:
    """The cache's node_modules/.bin, installing the pinned packages when missing."""
    bin_dir = CACHE / "node_modules" / ".bin"
    stamp = CACHE / "installed.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == list(PACKAGES)):
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), *PACKAGES],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm install failed:\n{done.stderr[-3000:]}"
        stamp.write_text(json.dumps(list(PACKAGES)))
    return bin_dir


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node/npm not installed: the TypeScript client is not generated here",
)
def test_generated_typescript_client_compiles(tmp_path: Path) -> None:
    """openapi-typescript turns the document into types a strict tsc accepts for real use."""
    tools = _tools()
    (tmp_path / "openapi.json").write_text(json.dumps(DOCUMENT))
    generate = subprocess.run(
        # request fields with a default stay optional (by default it makes them required)
        [str(tools / "openapi-typescript"), "openapi.json", "-o", "api.ts", "--default-non-nullable=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert generate.returncode == 0, generate.stderr
    api = (tmp_path / "api.ts").read_text()
    assert "JobRequest: {" in api and "Progress: {" in api
    (tmp_path / "main.ts").write_text(PROGRAM)
    compile_ = subprocess.run(
        [
            str(tools / "tsc"),
            "--noEmit",
            "--strict",
            "--target",
            "es2020",
            "--module",
            "esnext",
            "--moduleResolution",
            "bundler",
            "main.ts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
