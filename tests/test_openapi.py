"""The machine-readable contract (SPEC 7.3): ``/schema/openapi.json`` is a valid OpenAPI
document naming every body, and a real ``jobq serve`` answers as it says (schemathesis'
response conformance over every operation; a finished job's every answer and stream
event checked against the named component schemas)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from handlers.app import create_app
from handlers.bootstrap import bootstrap
from handlers.settings import Settings
from tests.contract.helpers import body, submit, wait_for
from tests.support.service import Service, local_service, running

NAMED = ("JobRequest", "Job", "Progress", "Artifact", "ArtifactData", "Trace", "Error")
EVENT_SCHEMAS = {
    "status": "JobSummary",
    "artifact_written": "Artifact",
    "delta": "DeltaEvent",
    "result": "JobResult",
    "error": "JobError",
    "done": "DoneEvent",
}


def openapi() -> dict[str, Any]:
    """The document the app serves at /schema/openapi.json, built in-process."""
    app = create_app(bootstrap(Settings.from_env({"JOBS_STORE_URL": "memory://"})))
    document: dict[str, Any] = app.openapi_schema.to_schema()
    return document


DOCUMENT = openapi()


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method, operation


def conforms(instance: Any, component: str) -> None:
    """``instance`` is valid against ``#/components/schemas/<component>`` (JSON Schema 2020-12)."""
    schema = {"$ref": f"#/components/schemas/{component}", "components": DOCUMENT["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_the_document_is_valid_openapi() -> None:
    """openapi-spec-validator accepts the served document."""
    validate(DOCUMENT)


def test_every_operation_names_its_bodies() -> None:
    """Every operation: request bodies and JSON answers (2xx and every 4xx/5xx) are named components,
    errors are ``Error``-shaped and every route may answer 500."""
    schemas = DOCUMENT["components"]["schemas"]
    assert set(NAMED) <= set(schemas), sorted(schemas)
    assert {"error", "message"} <= set(schemas["Error"]["required"])
    for path, method, operation in operations():
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        assert any(code.startswith("2") for code in responses), where
        assert "500" in responses, where
        for code, response in responses.items():
            assert response.get("description"), (where, code)
            for media, content in response.get("content", {}).items():
                if media == "application/json":
                    text = json.dumps(content["schema"])
                    assert "#/components/schemas/" in text, (where, code, text)
                    if code.startswith(("4", "5")):
                        # the health 503 and a failed legacy job carry `error` too (SPEC §4)
                        named = ("schemas/Error", "schemas/LegacyError", "schemas/Health")
                        assert any(n in text for n in named), (where, code)
        if method == "post" and path in ("/api/jobs", "/api/v2/auto", "/api/v2/dossier/generate"):
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/JobRequest", where
            assert {"400", "401", "413", "415", "429", "503"} <= set(responses), where


def test_request_limits_are_in_the_schema() -> None:
    """SPEC §4's limits are stated: body field ranges and lengths, the list's query parameters."""
    fields = DOCUMENT["components"]["schemas"]["JobRequest"]["properties"]
    assert (fields["parallel_limit"]["minimum"], fields["parallel_limit"]["maximum"]) == (1, 16)
    assert (fields["timeout_ms"]["minimum"], fields["timeout_ms"]["maximum"]) == (1_000, 3_600_000)
    assert fields["project_title"]["maxLength"] == 200
    assert fields["elevator_pitch"]["maxLength"] == 10_000
    assert fields["language"]["enum"][:2] == ["de", "en"]
    assert fields["max_cost_usd"]["exclusiveMinimum"] == 0
    assert DOCUMENT["components"]["schemas"]["JobRequest"]["required"] == ["project_title"]
    params = {p["name"]: p["schema"] for p in DOCUMENT["paths"]["/api/jobs"]["get"]["parameters"]}
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 200)
    assert "completed" in params["status"]["enum"]


def test_stream_events_are_documented() -> None:
    """The stream answers text/event-stream, describes each event and names each event's data schema."""
    ok = DOCUMENT["paths"]["/api/jobs/{job_id}/stream"]["get"]["responses"]["200"]
    stream = ok["content"]["text/event-stream"]["schema"]
    refs = {entry["$ref"].rsplit("/", 1)[1] for entry in stream["oneOf"]}
    assert refs == set(EVENT_SCHEMAS.values())
    for event, component in EVENT_SCHEMAS.items():
        assert f"`{event}`" in ok["description"] and f"`{component}`" in ok["description"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("openapi")
    with running(local_service(workdir, SUBMIT_RATE_PER_MIN="0", LEGACY_WAIT_S="0")) as service:
        yield service


@pytest.fixture(scope="module")
def finished(live: Service) -> str:
    """A completed job (its trace, artifacts and stream exist)."""
    with live.client() as client:
        job_id = submit(client)
        wait_for(client, job_id)
    return job_id


def test_a_finished_job_answers_as_documented(live: Service, finished: str) -> None:
    """Every answer about a completed job validates against its component schema."""
    with live.client() as client:
        accepted = client.post("/api/jobs", json=body())
        assert accepted.status_code == 202
        conforms(accepted.json(), "JobAccepted")
        job = client.get(f"/api/jobs/{finished}").json()
        assert job["status"] == "completed" and "result" in job
        conforms(job, "Job")
        conforms(client.get("/api/jobs", params={"limit": 5}).json(), "JobList")
        conforms(client.get(f"/api/jobs/{finished}/artifacts").json(), "ArtifactList")
        conforms(client.get(f"/api/jobs/{finished}/artifacts/dossier").json(), "ArtifactData")
        trace = client.get(f"/api/jobs/{finished}/trace").json()
        assert trace["calls"]
        conforms(trace, "Trace")
        conforms(client.post(f"/api/jobs/{finished}/cancel").json(), "CancelResult")
        conforms(client.get("/api/jobs/stats").json(), "Stats")
        conforms(client.get("/api/config").json(), "Config")
        conforms(client.get("/api/jobs/health").json(), "Health")
        conforms(client.post("/api/v2/auto", json=body()).json(), "LegacyAccepted")
        bad = client.post("/api/jobs", json={"project_title": "", "parallel_limit": "2"})
        assert bad.status_code == 400
        conforms(bad.json(), "Error")


def sse_events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines and "data" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_event_data_matches_the_documented_schemas(live: Service, finished: str) -> None:
    """Each event of a finished job's stream carries data valid against its event's schema."""
    with live.client() as client:
        text = client.get(f"/api/jobs/{finished}/stream").text
    events = sse_events(text)
    kinds = {kind for kind, _ in events}
    assert {"status", "artifact_written", "result", "done"} <= kinds, kinds
    for kind, data in events:
        conforms(data, EVENT_SCHEMAS[kind])


schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: schemathesis.Case, live: Service) -> None:
    """schemathesis: for generated requests (valid and not) every answer's status code, content type,
    headers and body are what the document declares, and none is a 5xx."""
    case.call_and_validate(
        base_url=live.base_url,
        timeout=30,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )
