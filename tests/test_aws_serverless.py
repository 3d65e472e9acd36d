"""Invariants of serverless.yml: timeouts, redrive, batch failures, expiry, IAM, handlers."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SELF_REF = re.compile(r"\$\{self:([A-Za-z0-9_.]+)\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps CloudFormation tags (``!GetAtt X.Arn``) as ``{"!GetAtt": ...}``."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    return {f"!{suffix}": value}


_Loader.add_multi_constructor("!", _tag)


def _resolve(value: Any, doc: dict[str, Any]) -> Any:
    """Resolve ``${self:a.b}`` references (what the checks need); others stay as text."""
    if isinstance(value, dict):
        return {k: _resolve(v, doc) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, doc) for v in value]
    if not isinstance(value, str):
        return value
    whole = SELF_REF.fullmatch(value)
    if whole:
        return _resolve(_lookup(doc, whole.group(1)), doc)
    return SELF_REF.sub(lambda m: str(_resolve(_lookup(doc, m.group(1)), doc)), value)


def _lookup(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node[part]
    return node


@pytest.fixture(scope="module")
def sls() -> dict[str, Any]:
    raw = yaml.load((ROOT / "serverless.yml").read_text(), Loader=_Loader)
    resolved: dict[str, Any] = _resolve(raw, raw)
    return resolved


def _resources(sls: dict[str, Any]) -> dict[str, Any]:
    resources: dict[str, Any] = sls["resources"]["Resources"]
    return resources


def _worker_sqs_event(sls: dict[str, Any]) -> dict[str, Any]:
    events = sls["functions"]["worker"]["events"]
    sqs_events = [e["sqs"] for e in events if "sqs" in e]
    assert len(sqs_events) == 1
    event: dict[str, Any] = sqs_events[0]
    return event


def test_visibility_timeout_is_at_least_six_times_the_worker_timeout(sls: dict[str, Any]) -> None:
    """The queue hides a delivery for >= 6x the worker timeout: a running job is not redelivered."""
    worker_timeout = int(sls["functions"]["worker"]["timeout"])
    visibility = int(_resources(sls)["JobsQueue"]["Properties"]["VisibilityTimeout"])
    assert worker_timeout <= 900
    assert visibility >= 6 * worker_timeout


def test_jobs_queue_redrives_to_the_dlq_after_job_max_attempts(sls: dict[str, Any]) -> None:
    """The redrive policy targets the DLQ with maxReceiveCount == JOB_MAX_ATTEMPTS."""
    resources = _resources(sls)
    redrive = resources["JobsQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"!GetAtt": "DeadLetterQueue.Arn"}
    assert resources["DeadLetterQueue"]["Type"] == "AWS::SQS::Queue"
    max_attempts = int(sls["provider"]["environment"]["JOB_MAX_ATTEMPTS"])
    assert int(redrive["maxReceiveCount"]) == max_attempts


def test_worker_reports_partial_batch_failures_from_the_jobs_queue(sls: dict[str, Any]) -> None:
    """The worker's SQS source is the jobs queue and uses ReportBatchItemFailures."""
    event = _worker_sqs_event(sls)
    assert event["arn"] == {"!GetAtt": "JobsQueue.Arn"}
    assert event["functionResponseType"] == "ReportBatchItemFailures"
    assert 1 <= int(event["batchSize"]) <= 10


def test_bucket_lifecycle_expiry_matches_job_ttl(sls: dict[str, Any]) -> None:
    """The bucket expires job objects after exactly JOB_TTL_S (in days)."""
    env = sls["provider"]["environment"]
    rules = _resources(sls)["JobsBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    expiring = [r for r in rules if "ExpirationInDays" in r]
    assert len(expiring) == 1 and expiring[0]["Status"] == "Enabled"
    assert int(expiring[0]["ExpirationInDays"]) * 86400 == int(env["JOB_TTL_S"])
    prefix = env["JOBS_STORE_URL"].split("/", 3)[3]
    assert expiring[0]["Prefix"] == f"{prefix}/"


def test_environment_selects_the_aws_backend_with_a_bounded_sse_window(sls: dict[str, Any]) -> None:
    """The functions get sqs:// and s3:// URLs that Settings accepts, and SSE windows under 30 s."""
    from handlers.settings import Settings

    env = {k: str(v) for k, v in sls["provider"]["environment"].items() if "${" not in str(v)}
    env["JOBS_QUEUE_URL"] = "sqs://jobq-dev-jobs"  # the stage and account are deploy-time values
    env["JOBS_STORE_URL"] = "s3://jobq-dev-123456789012-jobs/jobq"
    settings = Settings.from_env(env)
    assert settings.backend == "aws"
    assert sls["provider"]["environment"]["JOBS_QUEUE_URL"].startswith("sqs://")
    assert 0 < settings.sse_window_s < 29
    assert settings.legacy_wait_s < int(sls["functions"]["api"]["timeout"]) <= 30


def test_iam_names_every_action_and_no_wildcards(sls: dict[str, Any]) -> None:
    """Each IAM statement lists explicit actions (no '*'), on named resources."""
    statements = sls["provider"]["iam"]["role"]["statements"]
    actions = [a for s in statements for a in s["Action"]]
    assert actions and all("*" not in a for a in actions)
    assert all(s["Effect"] == "Allow" and s["Resource"] for s in statements)
    assert all(r != "*" for s in statements for r in s["Resource"])
    needed = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket",
              "sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage",
              "sqs:GetQueueAttributes", "sqs:GetQueueUrl"}
    assert needed <= set(actions)


def test_every_handler_path_imports() -> None:
    """Each function's handler 'pkg/module.func' imports and names a callable."""
    raw = yaml.load((ROOT / "serverless.yml").read_text(), Loader=_Loader)
    handlers = [f["handler"] for f in raw["functions"].values()]
    assert len(handlers) >= 2
    for handler in handlers:
        module_path, _, attr = handler.rpartition(".")
        module = importlib.import_module(module_path.replace("/", "."))
        assert callable(getattr(module, attr)), handler
