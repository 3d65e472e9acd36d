"""GET /api/config (SPEC 7.3): the effective configuration, without secrets."""

from __future__ import annotations

from tests.conftest import ServiceFactory
from tests.contract.helpers import LLM_STEPS, body, llm_calls, submit, trace, wait_for
from tests.support.service import Service

SECRETS = {
    "OPENAI_API_KEY": "sk-proj-SECRETvalue0123456789",
    "ANTHROPIC_API_KEY": "sk-ant-SECRETanthropic987654",
    "OPENAI_BASE_URL": "http://proxyuser:PASSWORDinurl@127.0.0.1:9/v1",
    "LLM_PRICES": "gpt-4o-mini:0.123456:0.654321",
    "API_KEYS": "key-TENANTSECRET:alice",
    "OPERATOR_KEYS": "key-OPERATORSECRET",
    "STREAM_TOKEN_SECRET": "STREAMSIGNINGSECRET-0123456789",
}
SECRET_PARTS = (
    "sk-proj-SECRETvalue0123456789",
    "sk-ant-SECRETanthropic987654",
    "PASSWORDinurl",
    "proxyuser",
    "127.0.0.1:9",
    "0.123456",
    "0.654321",
    "key-TENANTSECRET",
    "key-OPERATORSECRET",
    "STREAMSIGNINGSECRET",
)


def test_config_shows_routing_context_windows_rate_gate_and_limits(service: Service) -> None:
    """Every LLM step has its provider, model, ctx_max and output reserve; limits match what POST accepts."""
    with service.client() as client:
        response = client.get("/api/config")
        assert response.status_code == 200, response.text
        config = response.json()
        assert config["backend"] == service.backend
        assert config["provider"] == "offline"
        assert config["step_models"] == {step: "offline" for step in LLM_STEPS}
        assert set(config["effective_routing"]) == set(LLM_STEPS)
        for step in LLM_STEPS:
            route = config["effective_routing"][step]
            assert route == {
                "provider": "offline",
                "model": "offline",
                "ctx_max": route["ctx_max"],
                "max_output_tokens": route["max_output_tokens"],
            }
            assert isinstance(route["ctx_max"], int) and route["ctx_max"] > route["max_output_tokens"] > 0
        assert config["rate_gate"] == {"LLM_RPM": 0, "LLM_TPM": 0, "enabled": False}
        limits = config["limits"]
        assert limits["parallel_limit"]["default"] == 2
        assert limits["timeout_ms"]["default"] == 300_000
        for name in ("parallel_limit", "timeout_ms"):
            top = limits[name]["max"]
            accepted = client.post("/api/jobs", json=body(**{name: top}))
            assert accepted.status_code == 202, accepted.text
            refused = client.post("/api/jobs", json=body(**{name: top + 1}))
            assert refused.status_code == 400, refused.text
            assert [d["field"] for d in refused.json()["details"]] == [name]


def test_every_call_in_the_trace_carries_the_guards_numbers(service: Service) -> None:
    """Each LLM call's trace record has ctx_max as /api/config routes it, an estimate and no trimming."""
    with service.client() as client:
        routing = client.get("/api/config").json()["effective_routing"]
        job_id = submit(client)
        assert wait_for(client, job_id)["status"] == "completed"
        calls = llm_calls(trace(client, job_id))
        assert {c["step"] for c in calls} == set(LLM_STEPS)
        for call in calls:
            assert call["ctx_max"] == routing[call["step"]]["ctx_max"], call
            assert call["prompt_tokens_est"] > 100 and call["truncate_applied"] is False, call


def test_config_carries_no_secret_and_needs_a_key_like_other_reads(service_factory: ServiceFactory) -> None:
    """With keys, a credentialed URL and prices set, none appears; without an API key it is 401."""
    deployed = service_factory(
        {
            **SECRETS,
            "LLM_PROVIDER": "openai",
            "LLM_DEFAULT_MODEL": "gpt-4o-mini",
            "LLM_MODEL_INVESTOR_SCORE": "qwen3:8b",
            "LLM_CONTEXT_QWEN3_8B": "6000",
            "LLM_RPM": "60",
            "LLM_TPM": "90000",
        }
    )
    with deployed.client() as anonymous, deployed.client(headers={"X-API-Key": "key-TENANTSECRET"}) as alice:
        denied = anonymous.get("/api/config")
        assert denied.status_code == 401, denied.text
        assert denied.json()["error"] == "unauthorized"
        response = alice.get("/api/config")
        assert response.status_code == 200, response.text
        for part in SECRET_PARTS:
            assert part not in response.text, part
        config = response.json()
        assert config["provider"] == "openai"
        assert config["step_models"]["investor_score"] == "qwen3:8b"
        assert config["effective_routing"]["investor_score"] == {
            "provider": "openai",
            "model": "qwen3:8b",
            "ctx_max": 6000,
            "max_output_tokens": 3000,
        }
        assert config["effective_routing"]["brief"]["ctx_max"] == 128_000
        assert config["effective_routing"]["brief"]["max_output_tokens"] == 4096
        assert config["rate_gate"] == {"LLM_RPM": 60, "LLM_TPM": 90000, "enabled": True}
