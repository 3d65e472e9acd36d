"""Bad requests: every SPEC §4 rule, wrong types, bad bodies, unknown ids and names.
Each answers 4xx with an ``error`` field, never a stack trace, and creates nothing."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.contract.helpers import body, job_count, submit, wait_for
from tests.support.service import Service

OK_TITLE = "Valid title"
OK_PITCH = "A valid pitch."


def _b(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"project_title": OK_TITLE, "elevator_pitch": OK_PITCH}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


RULES = [
    ("project_title", _b(project_title=...)),
    ("project_title", _b(project_title="")),
    ("project_title", _b(project_title="   \n\t ")),
    ("project_title", _b(project_title="x" * 201)),
    ("project_title", _b(project_title=42)),
    ("project_title", _b(project_title=["a"])),
    ("project_title", _b(project_title="a\ud800")),  # a lone surrogate: valid JSON, no text
    ("elevator_pitch", _b(elevator_pitch="x \udfff y")),
    ("elevator_pitch", _b(elevator_pitch=...)),
    ("elevator_pitch", _b(elevator_pitch="  ")),
    ("elevator_pitch", _b(elevator_pitch="p" * 10_001)),
    ("elevator_pitch", _b(elevator_pitch={"text": "x"})),
    ("elevator_pitch", {"project_title": OK_TITLE, "pitch": 7}),
    ("language", _b(language="fr")),
    ("language", _b(language="")),
    ("language", _b(language=1)),
    ("target", _b(target="t" * 201)),
    ("target", _b(target=5)),
    ("target", _b(target="\ud83d")),
    ("geo", _b(geo="g" * 101)),
    ("geo", _b(geo=False)),
    ("skip_cache", _b(skip_cache="yes")),
    ("skip_cache", _b(skip_cache=1)),
    ("parallel_limit", _b(parallel_limit=0)),
    ("parallel_limit", _b(parallel_limit=17)),
    ("parallel_limit", _b(parallel_limit="2")),
    ("parallel_limit", _b(parallel_limit=2.5)),
    ("parallel_limit", _b(parallel_limit=True)),
    ("timeout_ms", _b(timeout_ms=999)),
    ("timeout_ms", _b(timeout_ms=3_600_001)),
    ("timeout_ms", _b(timeout_ms="60000")),
    ("timeout_ms", _b(timeout_ms=None) | {"timeout_ms": [1000]}),
    ("body", ["project_title", "elevator_pitch"]),
    ("body", "just a string"),
    ("body", None),
    ("body", 12),
]


@pytest.fixture
def unchanged(service: Service) -> Iterator[None]:
    """Assert that the test created no job."""
    with service.client() as client:
        before = job_count(client)
    yield
    with service.client() as client:
        assert job_count(client) == before, "a rejected request created a job"


def _assert_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload: dict[str, Any] = response.json()
    assert isinstance(payload.get("error"), str) and payload["error"]
    assert "Traceback" not in response.text
    return payload


@pytest.mark.parametrize(("field", "payload"), RULES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(RULES)])
@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("path", ["/api/jobs", "/api/v2/auto"])
def test_each_rule_is_a_400_naming_the_field(service: Service, field: str, payload: Any, path: str) -> None:
    """A body breaking one rule answers 400 with details naming that field."""
    with service.client() as client:
        response = client.post(
            path, content=json.dumps(payload), headers={"Content-Type": "application/json"}
        )
    details = _assert_error(response, 400)["details"]
    assert field in [d["field"] for d in details], details
    assert all(d["message"] for d in details)


@pytest.mark.usefixtures("unchanged")
def test_every_broken_rule_is_reported_at_once(service: Service) -> None:
    """Several broken rules are all listed in details."""
    with service.client() as client:
        response = client.post(
            "/api/jobs", json={"project_title": "", "language": "xx", "parallel_limit": 99}
        )
    fields = {d["field"] for d in _assert_error(response, 400)["details"]}
    assert {"project_title", "elevator_pitch", "language", "parallel_limit"} <= fields


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"   ",
        b'{"project_title": "x",',
        b"\xff\xfe\x00garbage",
        b"[" * 50_000 + b"]" * 50_000,
    ],
    ids=["unclosed", "empty", "blank", "cut", "binary", "nested-too-deep"],
)
def test_non_json_body_is_a_400(service: Service, raw: bytes) -> None:
    """A body that is not JSON answers 400 with details on the body."""
    with service.client() as client:
        response = client.post("/api/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert _assert_error(response, 400)["details"][0]["field"] == "body"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_wrong_content_type_is_a_415(service: Service, content_type: str) -> None:
    """A body declared as something other than JSON answers 415."""
    with service.client() as client:
        response = client.post(
            "/api/jobs", content=json.dumps(body()), headers={"Content-Type": content_type}
        )
    _assert_error(response, 415)


@pytest.mark.usefixtures("unchanged")
def test_three_megabyte_body_is_a_413(service: Service) -> None:
    """A 3 MB body (declared by Content-Length) answers 413."""
    huge = json.dumps(body(elevator_pitch="x" * 3_000_000))
    with service.client() as client:
        response = client.post("/api/jobs", content=huge, headers={"Content-Type": "application/json"})
    _assert_error(response, 413)


@pytest.mark.usefixtures("unchanged")
def test_oversized_chunked_body_without_length_is_a_413(service: Service) -> None:
    """A body over the limit without Content-Length (chunked) is cut off with 413 too."""

    def chunks() -> Iterator[bytes]:
        yield b'{"project_title": "t", "elevator_pitch": "'
        for _ in range(30):
            yield b"y" * 100_000
        yield b'"}'

    with service.client() as client:
        response = client.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    _assert_error(response, 413)


UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/jobs/{UNKNOWN}"),
        ("GET", f"/api/jobs/{UNKNOWN}/artifacts"),
        ("GET", f"/api/jobs/{UNKNOWN}/artifacts/pitch"),
        ("GET", f"/api/jobs/{UNKNOWN}/trace"),
        ("GET", f"/api/jobs/{UNKNOWN}/stream"),
        ("POST", f"/api/jobs/{UNKNOWN}/cancel"),
        ("GET", "/api/jobs/not-a-job"),
        ("GET", "/api/jobs/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/api/jobs/%2e%2e"),
        ("GET", "/api/jobs/" + "a" * 300),
        ("GET", "/no/such/route"),
    ],
)
def test_unknown_ids_and_routes_are_404(service: Service, method: str, path: str) -> None:
    """Unknown jobs, malformed ids and unknown routes answer 404 with an error body."""
    with service.client() as client:
        response = client.request(method, path)
    assert _assert_error(response, 404)["error"] == "not_found"


@pytest.fixture
def finished_job(service: Service) -> str:
    with service.client() as client:
        job_id = submit(client)
        wait_for(client, job_id)
    return job_id


@pytest.mark.parametrize(
    "name",
    ["..%2Fx", "..%2F..%2Fjob", "%2e%2e", "x.json", "PITCH", "pitch%00", "no_such_artifact", "a" * 80, "-x"],
)
def test_bad_artifact_names_are_404(service: Service, finished_job: str, name: str) -> None:
    """Artifact names that are unknown or not plain identifiers answer 404."""
    with service.client() as client:
        before = job_count(client)
        response = client.get(f"/api/jobs/{finished_job}/artifacts/{name}")
        _assert_error(response, 404)
        assert client.get(f"/api/jobs/{finished_job}/artifacts/pitch").status_code == 200
        assert job_count(client) == before


@pytest.mark.parametrize("raw_path", ["../x", "../../pitch", "..", "./pitch"])
def test_dot_segments_in_raw_artifact_paths_are_404(
    service: Service, finished_job: str, raw_path: str
) -> None:
    """Raw dot segments (sent unnormalised, as a hostile client would) never reach an artifact."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        conn.request("GET", f"/api/jobs/{finished_job}/artifacts/{raw_path}")
        response = conn.getresponse()
        payload = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 404 and payload["error"] == "not_found"


@pytest.mark.usefixtures("unchanged")
def test_wrong_method_is_405_json(service: Service) -> None:
    """A wrong method answers 405 with an error body."""
    with service.client() as client:
        response = client.delete("/api/jobs")
    _assert_error(response, 405)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1000"},
        {"limit": "many"},
        {"status": "done"},
        *({"cursor": c} for c in ["garbage", "nan~x", "NaN", "inf~x", "1e999~x", "-inf~", "1.5~", "1.5~a/b"]),
    ],
)
def test_bad_list_queries_are_400(service: Service, params: dict[str, str]) -> None:
    """List query parameters out of range or malformed answer 400."""
    with service.client() as client:
        response = client.get("/api/jobs", params=params)
    _assert_error(response, 400)


@pytest.mark.usefixtures("unchanged")
def test_bad_idempotency_key_is_400(service: Service) -> None:
    """An Idempotency-Key that is not 1-255 visible ASCII characters answers 400."""
    with service.client() as client:
        response = client.post("/api/jobs", json=body(), headers={"Idempotency-Key": "k" * 300})
    _assert_error(response, 400)
