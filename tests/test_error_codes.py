"""One source for the error codes: the README's two tables (a failed job's codes, the HTTP
error codes) list exactly the enums the code emits, and the HTTP layer writes no code
that is not in its enum."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from handlers.http_common import HTTP_ERROR_CODES, HttpErrorCode
from pipeline.vocabulary import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
HTTP_MODULES = ("app.py", "http_common.py", "routes_jobs.py", "routes_ops.py", "sse.py", "aws.py", "auth.py")


def readme_tables() -> dict[str, set[str]]:
    """First-column codes of each table in the README's "Error codes" section, by header cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, set[str]] = {}
    header = None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells[0]
            tables[header] = set()
        elif match := re.fullmatch(r"`([a-z_]+)`", cells[0]):
            tables[header].add(match[1])
    return tables


def test_readme_job_error_codes_are_the_enum() -> None:
    """The README's table of job error codes is exactly pipeline.vocabulary.ErrorCode."""
    assert readme_tables()["code"] == {c.value for c in ErrorCode}


def test_readme_http_error_codes_are_the_enum() -> None:
    """The README's table of HTTP error codes is exactly HttpErrorCode, and every status maps into it."""
    assert readme_tables()["HTTP code"] == {c.value for c in HttpErrorCode}
    assert set(HTTP_ERROR_CODES.values()) <= set(HttpErrorCode)


def _literal_codes(path: Path) -> list[str]:
    """String literals written as an error code: ``{"error": "..."}`` values and the code
    argument of ``error_response``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "error" and isinstance(value, ast.Constant):
                    found.append(f"{path.name}:{node.lineno} {value.value!r}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == (
            "error_response"
        ):
            code = node.args[1] if len(node.args) > 1 else None
            if isinstance(code, ast.Constant):
                found.append(f"{path.name}:{node.lineno} {code.value!r}")
    return found


def test_http_layer_writes_codes_only_from_the_enum() -> None:
    """No handler module writes an error code as a bare string (so none escapes the table)."""
    literals = [hit for name in HTTP_MODULES for hit in _literal_codes(ROOT / "handlers" / name)]
    assert literals == []
