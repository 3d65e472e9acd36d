"""GET /api/jobs/{id}/dossier.md: the finished dossier as Markdown, on every backend."""

from __future__ import annotations

from pipeline.dossier_markdown import render_markdown
from tests.conftest import ServiceFactory
from tests.contract.helpers import submit, wait_for
from tests.support.service import Service

ALICE = {"X-API-Key": "key-alice"}
BOB = {"X-API-Key": "key-bob"}
UNKNOWN_JOB = "00000000-0000-4000-8000-000000000000"


def test_a_completed_job_serves_its_dossier_as_markdown(service: Service) -> None:
    """A completed job's dossier.md is text/markdown (UTF-8), shown inline under a file name made
    from the title, and is exactly the dossier artifact rendered by the shared renderer."""
    with service.client() as client:
        job_id = submit(client, project_title="Gärtnerei | Nord", language="de")
        assert wait_for(client, job_id)["status"] == "completed"
        response = client.get(f"/api/jobs/{job_id}/dossier.md")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/markdown; charset=utf-8"
        assert response.headers["content-disposition"] == 'inline; filename="gartnerei-nord.md"'
        dossier = client.get(f"/api/jobs/{job_id}/artifacts/dossier").json()["data"]
        assert response.content.decode("utf-8") == render_markdown(dossier)
        assert response.text.startswith("# Gärtnerei \\| Nord\n")
        assert "## Quellen" in response.text


def test_dossier_markdown_of_an_unfinished_or_cancelled_job_is_409(slow_service: Service) -> None:
    """While a job runs, and after it was cancelled, dossier.md answers 409 with an error body."""
    with slow_service.client() as client:
        job_id = submit(client, parallel_limit=1)
        running = client.get(f"/api/jobs/{job_id}/dossier.md")
        assert running.status_code == 409, running.text
        assert running.headers["content-type"].startswith("application/json")
        body = running.json()
        assert body["error"] == "no_dossier" and "no dossier yet" in body["message"]
        client.post(f"/api/jobs/{job_id}/cancel")
        assert wait_for(client, job_id)["status"] == "cancelled"
        cancelled = client.get(f"/api/jobs/{job_id}/dossier.md")
        assert cancelled.status_code == 409
        assert cancelled.json()["message"] == "the job is cancelled and has no dossier yet"


def test_dossier_markdown_of_an_unknown_job_is_404(service: Service) -> None:
    """An unknown job id, or one that could never have been issued, is 404 with the usual body."""
    with service.client() as client:
        for job_id in (UNKNOWN_JOB, "no.such.job"):
            response = client.get(f"/api/jobs/{job_id}/dossier.md")
            assert response.status_code == 404, (job_id, response.text)
            assert response.json() == {"error": "not_found", "message": "job not found"}


def test_another_tenants_dossier_markdown_is_404(service_factory: ServiceFactory) -> None:
    """With API keys, only the job's own tenant reads its dossier.md; anyone else gets 404, no key 401."""
    secured = service_factory({"API_KEYS": "key-alice:alice,key-bob:bob", "SUBMIT_RATE_PER_MIN": "0"})
    with secured.client(headers=ALICE) as alice, secured.client(headers=BOB) as bob:
        job_id = submit(alice)
        assert wait_for(alice, job_id)["status"] == "completed"
        assert alice.get(f"/api/jobs/{job_id}/dossier.md").status_code == 200
        denied = bob.get(f"/api/jobs/{job_id}/dossier.md")
        assert denied.status_code == 404 and denied.json()["error"] == "not_found"
        with secured.client() as anonymous:
            assert anonymous.get(f"/api/jobs/{job_id}/dossier.md").status_code == 401
