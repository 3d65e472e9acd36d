"""Configuration from the environment: defaults, backend choice, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handlers.settings import Settings, SettingsError
from tests.support.service import ROOT, base_env

BAD_VALUES = [
    ("PORT", {"PORT": "eighty"}),
    ("PORT", {"PORT": "0"}),
    ("PORT", {"PORT": "70000"}),
    ("LLM_OFFLINE_LATENCY_MS", {"LLM_OFFLINE_LATENCY_MS": "fast"}),
    ("LLM_OFFLINE_LATENCY_MS", {"LLM_OFFLINE_LATENCY_MS": "-5"}),
    ("LEGACY_WAIT_S", {"LEGACY_WAIT_S": "-1"}),
    ("SSE_WINDOW_S", {"SSE_WINDOW_S": "60"}),
    ("SSE_HEARTBEAT_S", {"SSE_HEARTBEAT_S": "0"}),
    ("LOG_JSON", {"LOG_JSON": "maybe"}),
    ("LOG_LEVEL", {"LOG_LEVEL": "loud"}),
    ("API_KEYS", {"API_KEYS": "just-a-key"}),
    ("API_KEYS", {"API_KEYS": "k1:alice,:bob"}),
    ("REDIS_URL", {"REDIS_URL": "http://localhost:6379"}),
    ("REDISCLOUD_URL", {"REDISCLOUD_URL": "localhost:6379"}),
    ("JOBS_STORE_URL", {"JOBS_STORE_URL": "ftp://x"}),
    ("JOBS_QUEUE_URL", {"JOBS_QUEUE_URL": "amqp://x"}),
    ("JOBS_QUEUE_URL", {"JOBS_QUEUE_URL": "sqs://jobs", "JOBS_STORE_URL": "sqlite:///x.db"}),
    ("JOBS_STORE_URL", {"JOBS_QUEUE_URL": "redis://localhost", "JOBS_STORE_URL": "sqlite:///x"}),
    ("LLM_PROVIDER", {"LLM_PROVIDER": "gpt"}),
    ("ANTHROPIC_API_KEY", {"LLM_PROVIDER": "anthropic"}),
    ("OPENAI_API_KEY", {"LLM_PROVIDER": "openai"}),
    ("OPENAI_BASE_URL", {"OPENAI_BASE_URL": "localhost:11434/v1"}),
    ("OPENAI_JSON_MODE", {"OPENAI_JSON_MODE": "yaml"}),
    ("AWS_ENDPOINT_URL", {"AWS_ENDPOINT_URL": "ftp://moto"}),
    ("LLM_PRICES", {"LLM_PRICES": "gpt-4o:cheap"}),
    ("LLM_TIMEOUT_S", {"LLM_TIMEOUT_S": "never"}),
    ("LLM_MAX_RETRIES", {"LLM_MAX_RETRIES": "-1"}),
    ("JOB_MAX_ATTEMPTS", {"JOB_MAX_ATTEMPTS": "0"}),
    ("JOB_TTL_S", {"JOB_TTL_S": "1"}),
    ("WORKER_CONCURRENCY", {"WORKER_CONCURRENCY": "many"}),
    ("WORKER_GRACE_S", {"WORKER_GRACE_S": "-1"}),
    ("REDIS_MAX_CONNECTIONS", {"REDIS_MAX_CONNECTIONS": "lots"}),
    ("SAQ_HEARTBEAT_S", {"SAQ_HEARTBEAT_S": "0"}),
    ("SAQ_SWEEP_S", {"SAQ_SWEEP_S": "soon"}),
    ("SQS_BATCH_SIZE", {"SQS_BATCH_SIZE": "11"}),
    ("SQS_WAIT_S", {"SQS_WAIT_S": "30"}),
    ("SQS_VISIBILITY_TIMEOUT_S", {"SQS_VISIBILITY_TIMEOUT_S": "-5"}),
    ("SQS_RETRY_DELAY_S", {"SQS_RETRY_DELAY_S": "x"}),
    ("SUBMIT_RATE_PER_MIN", {"SUBMIT_RATE_PER_MIN": "-3"}),
    ("MAX_BODY_BYTES", {"MAX_BODY_BYTES": "10"}),
    ("STREAM_TOKEN_SECRET", {"API_KEYS": "k1:alice"}),
    ("STREAM_TOKEN_SECRET", {"API_KEYS": "k1:alice", "STREAM_TOKEN_SECRET": "short"}),
    ("STREAM_TOKEN_TTL_S", {"STREAM_TOKEN_TTL_S": "1"}),
]


@pytest.mark.parametrize(
    ("variable", "env"), BAD_VALUES, ids=[f"{v}-{i}" for i, (v, _) in enumerate(BAD_VALUES)]
)
def test_bad_value_raises_one_line_naming_the_variable(variable: str, env: dict[str, str]) -> None:
    """Each bad value raises SettingsError whose single-line message names the variable."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert variable in message
    assert "\n" not in message


def test_nothing_set_means_local_backend_and_offline_provider() -> None:
    """An empty environment selects SQLite + in-process queue and the offline provider."""
    settings = Settings.from_env({})
    assert settings.backend == "local"
    assert settings.store_url.startswith("sqlite:///") and settings.queue_url == "memory://"
    assert settings.llm_provider == "offline"
    assert not settings.auth_required
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize("name", ["REDIS_URL", "REDISCLOUD_URL"])
def test_redis_url_selects_the_redis_backend(name: str) -> None:
    """REDIS_URL (or the compat REDISCLOUD_URL) puts queue and store on Redis."""
    settings = Settings.from_env({name: "redis://cache:6379/0"})
    assert settings.backend == "redis"
    assert settings.store_url == settings.queue_url == "redis://cache:6379/0"


def test_sqs_and_s3_select_the_aws_backend() -> None:
    """JOBS_QUEUE_URL=sqs:// with JOBS_STORE_URL=s3:// selects the aws backend."""
    settings = Settings.from_env({"JOBS_QUEUE_URL": "sqs://jobs", "JOBS_STORE_URL": "s3://b/p"})
    assert settings.backend == "aws"


def test_api_keys_and_cors_are_parsed() -> None:
    """API_KEYS maps keys to tenants; OPERATOR_KEYS and CORS_ORIGINS are comma lists."""
    settings = Settings.from_env(
        {
            "API_KEYS": "k1:alice, k2:bob",
            "STREAM_TOKEN_SECRET": "s" * 32,
            "OPERATOR_KEYS": "ops1, ops2",
            "CORS_ORIGINS": "https://a.example, https://b.example",
        }
    )
    assert settings.api_keys == {"k1": "alice", "k2": "bob"}
    assert settings.operator_keys == ("ops1", "ops2")
    assert settings.auth_required
    assert settings.cors_origins == ("https://a.example", "https://b.example")


def test_provider_follows_the_key_that_is_set() -> None:
    """Without LLM_PROVIDER the provider is chosen by which key is set."""
    assert Settings.from_env({"OPENAI_API_KEY": "sk"}).llm_provider == "openai"
    assert Settings.from_env({"ANTHROPIC_API_KEY": "sk"}).llm_provider == "anthropic"
    routed = Settings.from_env({"LLM_MODEL_MARKET": "big-model"})
    assert routed.llm_step_models == {"market": "big-model"}


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handlers.cli", *args],
        cwd=ROOT,
        env={**base_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "env"),
    [("PORT", {"PORT": "eighty"}), ("API_KEYS", {"API_KEYS": "oops"}), ("LOG_JSON", {"LOG_JSON": "2"})],
)
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_cli_with_a_bad_value_exits_non_zero_with_one_line(
    command: str, variable: str, env: dict[str, str]
) -> None:
    """`jobq serve` / `jobq worker` with a bad value exit non-zero printing one line naming it."""
    result = _run_cli(command, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_worker_on_the_local_backend_explains_and_exits_2() -> None:
    """`jobq worker` on the local backend says the worker runs inside serve and exits 2."""
    result = _run_cli("worker", env={})
    assert result.returncode == 2
    assert "serve" in result.stderr
