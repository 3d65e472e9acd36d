"""A running deployment for contract tests: real processes, real HTTP.

``Service`` starts ``python -m handlers.cli serve`` (and, on the redis and aws
backends, ``python -m handlers.cli worker`` processes) with an environment that
selects the backend, waits for ``/api/jobs/health``, and keeps every process's
output in a log file whose tail is printed when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
TEST_STREAM_TOKEN_SECRET = "test-stream-token-secret-0123456789"

# Variables of the developer's shell that would change what the service under test does.
_SCRUB_PREFIXES = ("JOBS_", "LLM_", "SAQ_", "AWS_", "OPENAI_", "ANTHROPIC_")
_SCRUB = {
    "REDIS_URL",
    "REDISCLOUD_URL",
    "API_KEYS",
    "OPERATOR_KEYS",
    "STREAM_TOKEN_SECRET",
    "STREAM_TOKEN_TTL_S",
    "TENANT_MAX_COST_USD_PER_DAY",
    "TENANT_MAX_RUNNING",
    "FAIR_SCHEDULING",
    "CORS_ORIGINS",
    "PORT",
    "HOST",
    "JOB_TTL_S",
    "JOB_MAX_ATTEMPTS",
    "LEGACY_WAIT_S",
    "WORKER_CONCURRENCY",
    "SUBMIT_RATE_PER_MIN",
    "MAX_BODY_BYTES",
    "SSE_WINDOW_S",
    "SSE_HEARTBEAT_S",
    "LOG_JSON",
    "LOG_LEVEL",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith(_SCRUB_PREFIXES)
    }
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "info",
            "SSE_HEARTBEAT_S": "1",
            # required with API_KEYS; harmless without
            "STREAM_TOKEN_SECRET": TEST_STREAM_TOKEN_SECRET,
        }
    )
    return env


@dataclass
class _Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        log = self.log_path.open("ab")
        log.write(f"---- start {' '.join(self.argv)}\n".encode())
        log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 8.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen = None


@dataclass
class Service:
    """One deployment of the service on ``backend`` with ``workers`` worker processes."""

    backend: str
    env: dict[str, str]
    log_dir: Path
    workers: int = 1
    port: int = field(default_factory=free_port)
    _web: _Proc | None = None
    _workers: dict[str, _Proc] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    @property
    def separate_workers(self) -> bool:
        """The local backend runs its worker inside the web process."""
        return self.backend != "local"

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Service:
        self._start_web()
        if self.separate_workers:
            for n in range(self.workers):
                self.start_worker(f"worker{n}")
        return self

    def _start_web(self) -> None:
        argv = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(self.port)]
        self._web = _Proc("web", argv, self.log_dir / "web.log")
        self._web.start(self.env)
        self.wait_healthy()

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        last: str = "no answer"
        while time.monotonic() < deadline:
            if self._web is None or not self._web.alive():
                raise RuntimeError(f"web process exited early\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.base_url}/api/jobs/health", timeout=2.0)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(f"service did not become healthy: {last}\n{self.log_tail()}")

    def start_worker(self, name: str) -> None:
        """Start (or restart) the worker process ``name`` (redis and aws backends)."""
        if not self.separate_workers:
            raise RuntimeError("the local backend's worker runs inside the web process")
        old = self._workers.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"worker {name} is already running")
        proc = _Proc(
            name, [sys.executable, "-m", "handlers.cli", "worker"], self.log_dir / f"{name}.log"
        )
        proc.start(self.env)
        self._workers[name] = proc

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self._workers[name]
        proc.send(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM) and proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)

    def worker_names(self) -> list[str]:
        return list(self._workers)

    def crash_workers(self) -> None:
        """Kill -9 whatever runs jobs and start it again: the local backend's web
        process (same port, same database), or every worker process elsewhere."""
        if not self.separate_workers:
            self.restart()
            return
        for name in self.worker_names():
            self.kill_worker(name, signal.SIGKILL)
        for name in self.worker_names():
            self.start_worker(name)

    def restart(self) -> None:
        """kill -9 the web process and start it again on the same port."""
        if self._web is not None:
            self._web.stop(signal.SIGKILL)
        self._start_web()

    def stop(self) -> None:
        """SIGTERM every process at once, then wait for each (SIGKILL after a grace period)."""
        procs = [*self._workers.values(), *([self._web] if self._web else [])]
        for proc in procs:
            proc.send(signal.SIGTERM)
        for proc in procs:
            proc.stop()

    # -- diagnostics ------------------------------------------------------

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"))

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in self.log_files():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==== {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)


def local_service(workdir: Path, **env: str) -> Service:
    """A local-backend deployment (not started) on its own SQLite file in ``workdir``."""
    full = {**base_env(), "JOBS_STORE_URL": f"sqlite:///{workdir / 'jobs.db'}", **env}
    return Service(backend="local", env=full, log_dir=workdir)


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    service.start()
    try:
        yield service
    finally:
        service.stop()
