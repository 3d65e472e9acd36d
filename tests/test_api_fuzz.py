"""Property-based fuzzing of every operation in the app's own OpenAPI schema (schemathesis),
against a real ``jobq serve`` over HTTP: no generated request may get a 5xx, and every
4xx must carry the ``{"error": ...}`` body the frontends rely on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from handlers.app import create_app
from handlers.bootstrap import bootstrap
from handlers.settings import Settings
from tests.support.service import Service, local_service, running


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("fuzz")
    with running(local_service(workdir, SUBMIT_RATE_PER_MIN="0", LEGACY_WAIT_S="0")) as service:
        yield service


def _openapi() -> dict[str, Any]:
    """The schema the app serves at /schema/openapi.json, built in-process at collection."""
    app = create_app(bootstrap(Settings.from_env({"JOBS_STORE_URL": "memory://"})))
    return app.openapi_schema.to_schema()


schema = schemathesis.openapi.from_dict(_openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, fuzz_service: Service) -> None:
    """Whatever the schema admits (and what it does not), the answer is never 5xx and errors carry 'error'."""
    response = case.call(base_url=fuzz_service.base_url, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])
    if 400 <= response.status_code < 500:
        assert "error" in response.json(), (case.method, case.formatted_path, response.text[:300])
