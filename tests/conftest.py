"""Shared fixtures: deployments of the service on every backend.

Contract tests take ``service`` (one default deployment per backend, shared by
the tests of that backend) or ``service_factory`` (a fresh deployment with its
own environment). Both are parametrised over the backends, so every contract
test runs on local, redis and aws. ``JOBQ_TEST_BACKENDS=local`` (comma list)
narrows the run. A backend is skipped only while its test support module does
not exist; once it exists, a failure is a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path

import pytest

from adapters.sqlite_store import SqliteStore
from handlers.bootstrap import Container, bootstrap
from handlers.settings import Settings
from tests.support.service import Service, base_env

ALL_BACKENDS = ("local", "redis", "aws")
SUPPORT_MODULES = {"redis": "tests.support.redis_server", "aws": "tests.support.moto_server"}

ServiceFactory = Callable[..., Service]

# moto's in-process server logs every request through werkzeug: keep test output readable.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def selected_backends() -> list[str]:
    raw = os.environ.get("JOBQ_TEST_BACKENDS", "").strip()
    chosen = [b.strip() for b in raw.split(",") if b.strip()] if raw else list(ALL_BACKENDS)
    unknown = set(chosen) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"JOBQ_TEST_BACKENDS: unknown backends {sorted(unknown)}")
    return chosen


def backend_env(backend: str, workdir: Path) -> dict[str, str]:
    """The environment that puts a fresh, isolated deployment on ``backend``."""
    label = "c" + uuid.uuid4().hex[:10]
    if backend == "local":
        return {"JOBS_STORE_URL": f"sqlite:///{workdir / 'jobs.db'}"}
    if backend == "redis":
        from tests.support.redis_server import redis_backend_env

        return redis_backend_env(label)
    from tests.support.moto_server import aws_backend_env

    return aws_backend_env(label, visibility_timeout_s=10)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the deployments a failed test used to its report."""
    report: pytest.TestReport = yield
    if report.failed:
        for service in getattr(item, "jobq_services", []):
            report.sections.append((f"service logs ({service.backend})", service.log_tail()))
    return report


@pytest.fixture(scope="session", params=selected_backends())
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    module = SUPPORT_MODULES.get(name)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    return name


def _build(backend: str, workdir: Path, env: dict[str, str] | None, workers: int) -> Service:
    """A deployment not started yet (so whoever holds it can always stop it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    full = {**base_env(), **backend_env(backend, workdir), **(env or {})}
    return Service(backend=backend, env=full, log_dir=workdir, workers=workers)


SHARED_ENV = {
    "LLM_OFFLINE_LATENCY_MS": "20",
    "SUBMIT_RATE_PER_MIN": "0",
    "LEGACY_WAIT_S": "20",
}


@contextlib.contextmanager
def _session_service(
    backend: str, tmp_path_factory: pytest.TempPathFactory, label: str, env: dict[str, str]
) -> Iterator[Service]:
    service = _build(backend, tmp_path_factory.mktemp(f"{label}-{backend}"), env, workers=1)
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture(scope="session")
def shared_service(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with _session_service(backend, tmp_path_factory, "svc", SHARED_ENV) as service:
        yield service


SLOW_ENV = {
    "LLM_OFFLINE_LATENCY_MS": "200",
    "SUBMIT_RATE_PER_MIN": "0",
    "LEGACY_WAIT_S": "2",
    "SSE_HEARTBEAT_S": "0.3",
}
"""Every LLM call takes 200 ms: a ``parallel_limit=1`` job needs at least 12 x 0.2 s."""


@pytest.fixture(scope="session")
def slow_shared_service(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with _session_service(backend, tmp_path_factory, "slow", SLOW_ENV) as service:
        yield service


@pytest.fixture
def slow_service(slow_shared_service: Service, request: pytest.FixtureRequest) -> Service:
    """A shared deployment whose LLM calls take 200 ms (cancel, timeout, limits)."""
    request.node.jobq_services = [
        *getattr(request.node, "jobq_services", []),
        slow_shared_service,
    ]
    return slow_shared_service


@pytest.fixture
def service(shared_service: Service, request: pytest.FixtureRequest) -> Service:
    """The default deployment of this backend (shared: use unique inputs per test)."""
    request.node.jobq_services = [*getattr(request.node, "jobq_services", []), shared_service]
    return shared_service


@pytest.fixture
def service_factory(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServiceFactory]:
    """``factory(env=None, workers=1) -> Service``: a fresh deployment, stopped after the test."""
    built: list[Service] = []

    def factory(env: dict[str, str] | None = None, workers: int = 1) -> Service:
        service = _build(backend, tmp_path / f"svc{len(built)}", env, workers)
        built.append(service)
        request.node.jobq_services = [*getattr(request.node, "jobq_services", []), service]
        return service.start()

    try:
        yield factory
    finally:
        for service in built:
            service.stop()


@pytest.fixture
async def started() -> AsyncIterator[Callable[[dict[str, str]], Awaitable[Container]]]:
    """``start(env) -> Container``: an opened container of ``env`` (its store in memory
    unless ``env`` says otherwise), closed after the test."""
    containers: list[Container] = []

    async def start(env: dict[str, str]) -> Container:
        container = bootstrap(Settings.from_env({"JOBS_STORE_URL": "memory://", **env}))
        await container.open()
        containers.append(container)
        return container

    yield start
    for container in containers:
        await container.close()


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    """An open in-memory SQLite store (modules that test other stores define their own)."""
    s = SqliteStore(":memory:")
    await s.open()
    yield s
    await s.close()
