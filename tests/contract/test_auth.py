"""API keys, tenant isolation, Idempotency-Key, the submit rate limit and CORS."""

from __future__ import annotations

import pytest

from tests.conftest import ServiceFactory
from tests.contract.helpers import body, job_count, submit, wait_for
from tests.support.service import Service

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"X-API-Key": "key-bob"}
CAROL = {"X-API-Key": "key-carol"}
ORIGIN = "https://app.example.com"
OPERATOR_KEY = "key-operator"
OPERATOR = {"X-API-Key": OPERATOR_KEY}


@pytest.fixture
def secured(service_factory: ServiceFactory) -> Service:
    return service_factory(
        {
            "API_KEYS": "key-alice:alice,key-bob:bob,key-carol:carol",
            "OPERATOR_KEYS": OPERATOR_KEY,
            "SUBMIT_RATE_PER_MIN": "4",
            "CORS_ORIGINS": ORIGIN,
        }
    )


def test_missing_or_wrong_key_is_401_and_creates_nothing(secured: Service) -> None:
    """Without a valid key every job route answers 401 with an error body; health stays open."""
    bad_headers: tuple[dict[str, str], ...] = (
        {},
        {"X-API-Key": "nope"},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic a2V5LWFsaWNl"},
    )
    routes = (
        ("POST", "/api/jobs"),
        ("GET", "/api/jobs"),
        ("POST", "/api/v2/auto"),
        ("GET", "/api/jobs/stats"),
    )
    with secured.client() as anonymous, secured.client(headers=OPERATOR) as operator:
        before = job_count(operator)
        for headers in bad_headers:
            for method, path in routes:
                response = anonymous.request(method, path, json=body(), headers=headers)
                assert response.status_code == 401, (headers, path, response.text)
                assert response.json()["error"] == "unauthorized"
        assert anonymous.get("/api/jobs/health").status_code == 200
        assert job_count(operator) == before


def test_tenants_see_only_their_own_jobs(secured: Service) -> None:
    """Bob gets 404 for every route of Alice's job and does not see it in his list."""
    with secured.client(headers=ALICE) as alice, secured.client(headers=BOB) as bob:
        job_id = submit(alice)
        wait_for(alice, job_id)
        for suffix in ("", "/artifacts", "/artifacts/pitch", "/trace", "/stream"):
            assert alice.get(f"/api/jobs/{job_id}{suffix}").status_code == 200
            denied = bob.get(f"/api/jobs/{job_id}{suffix}")
            assert denied.status_code == 404 and denied.json()["error"] == "not_found"
        assert bob.post(f"/api/jobs/{job_id}/cancel").status_code == 404
        assert job_id in {j["jobId"] for j in alice.get("/api/jobs").json()["jobs"]}
        assert job_id not in {j["jobId"] for j in bob.get("/api/jobs").json()["jobs"]}


def test_stream_url_token_opens_that_job_only(secured: Service) -> None:
    """The streamUrl token opens its own job's stream without headers, and nothing else."""
    with secured.client(headers=ALICE) as alice, secured.client() as anonymous:
        created = alice.post("/api/jobs", json=body()).json()
        first, url = created["jobId"], created["streamUrl"]
        assert url.startswith(f"/api/jobs/{first}/stream?token=")
        wait_for(alice, first)
        opened = anonymous.get(url)
        assert opened.status_code == 200 and "event: done" in opened.text
        again = anonymous.get(alice.get(f"/api/jobs/{first}").json()["streamUrl"])
        assert again.status_code == 200 and "event: done" in again.text
        second = submit(alice)
        token = url.split("token=", 1)[1]
        for path in (
            f"/api/jobs/{second}/stream?token={token}",  # another job
            f"/api/jobs/{first}/stream?token={token[:-2]}xx",  # tampered
            f"/api/jobs/{first}/stream?token=nonsense",
            f"/api/jobs/{first}?token={token}",  # another route
            f"/api/jobs/{first}/artifacts?token={token}",
        ):
            refused = anonymous.get(path)
            assert refused.status_code == 401, (path, refused.text)
            assert refused.json()["error"] == "unauthorized"


def test_api_key_in_a_url_is_refused(secured: Service) -> None:
    """?api_key= is 401 on every route, even with a valid key: keys stay out of URLs."""
    with secured.client(headers=ALICE) as alice, secured.client() as anonymous:
        job_id = submit(alice)
        for path in (f"/api/jobs/{job_id}/stream", f"/api/jobs/{job_id}", "/api/jobs"):
            refused = anonymous.get(path, params={"api_key": "key-alice"})
            assert refused.status_code == 401, (path, refused.text)
            assert "not accepted in URLs" in refused.json()["message"]
        assert alice.get(f"/api/jobs/{job_id}", params={"api_key": "key-alice"}).status_code == 401


def test_operator_routes_need_an_operator_key(secured: Service) -> None:
    """/metrics and /api/jobs/stats: 401 without a key, 403 with a tenant's, 200 with OPERATOR_KEYS."""
    with secured.client() as client:
        for path in ("/metrics", "/api/jobs/stats"):
            assert client.get(path).status_code == 401
            tenant = client.get(path, headers=ALICE)
            assert tenant.status_code == 403 and tenant.json()["error"] == "forbidden"
            operator = client.get(path, headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
            assert operator.status_code == 200, operator.text
        scraped = client.get("/metrics", headers={"X-API-Key": OPERATOR_KEY})
        assert "jobq_jobs" in scraped.text


def test_idempotency_key_returns_the_same_job_per_tenant(secured: Service) -> None:
    """The same Idempotency-Key from one tenant returns the same job; another tenant gets its own."""
    with (
        secured.client(headers=ALICE) as alice,
        secured.client(headers=BOB) as bob,
        secured.client(headers=OPERATOR) as operator,
    ):
        before = job_count(operator)
        first = alice.post("/api/jobs", json=body(), headers={"Idempotency-Key": "k-1"})
        again = alice.post("/api/jobs", json=body(), headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["jobId"] == again.json()["jobId"]
        assert again.headers["location"] == first.headers["location"]
        other = bob.post("/api/jobs", json=body(), headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 202 and other.json()["jobId"] != first.json()["jobId"]
        assert job_count(operator) == before + 2


def test_submit_rate_limit_is_429_with_retry_after_per_tenant(secured: Service) -> None:
    """Past SUBMIT_RATE_PER_MIN a tenant gets 429 with Retry-After; other tenants are unaffected."""
    with (
        secured.client(headers=CAROL) as carol,
        secured.client(headers=BOB) as bob,
        secured.client(headers=OPERATOR) as operator,
    ):
        for _ in range(4):
            assert carol.post("/api/jobs", json=body()).status_code == 202
        before = job_count(operator)
        limited = carol.post("/api/jobs", json=body())
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert job_count(operator) == before
        assert bob.post("/api/jobs", json=body()).status_code == 202


def test_cors_preflight_and_headers_for_configured_origin(secured: Service) -> None:
    """A configured origin passes preflight and sees Location; others get no CORS grant."""
    with secured.client() as client:
        preflight = client.options(
            "/api/jobs",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-api-key,idempotency-key",
            },
        )
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        created = client.post("/api/jobs", json=body(), headers={**BOB, "Origin": ORIGIN})
        assert created.headers["access-control-allow-origin"] == ORIGIN
        assert "location" in created.headers["access-control-expose-headers"].lower()
        foreign = client.get("/api/jobs/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers


def test_access_log_holds_no_secret_from_a_url(secured: Service) -> None:
    """Tokens and keys in query strings reach the access log redacted, never in clear."""
    with secured.client(headers=ALICE) as alice, secured.client() as anonymous:
        created = alice.post("/api/jobs", json=body()).json()
        wait_for(alice, created["jobId"])
        assert anonymous.get(created["streamUrl"]).status_code == 200
        token = created["streamUrl"].split("token=", 1)[1]
        secrets = {
            "api_key": "key-alice",
            "key": "SECRETkey0001",
            "authorization": "SECRETauth0002",
            "access_token": "SECRETaccess0003",
        }
        for name, value in secrets.items():
            anonymous.get(f"/api/jobs/{created['jobId']}", params={name: value, "lastEventId": "7"})
    log = (secured.log_dir / "web.log").read_text()
    assert f"/api/jobs/{created['jobId']}/stream?token=[redacted]" in log  # the access line is there
    assert "lastEventId=7" in log  # and only secrets are hidden
    for value in (token, *secrets.values()):
        assert value not in log, value
