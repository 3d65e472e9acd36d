"""A real Redis for tests.

``redis_url()`` answers the machine's Redis on 127.0.0.1:6379 when it replies to
PING, else starts one ``redis-server`` on a free port for this test session
(stopped at exit). Tests isolate themselves by key prefix (``unique_prefix()``),
never by flushing a shared database.

A test that must stop, pause or restart Redis spawns its own server with
``RedisServer.start()`` and never touches the shared one. Such a server keeps an
append-only file (fsync on every write) in its own directory, so a restart on the
same port comes back with the data, as a managed Redis would.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_URL = "redis://127.0.0.1:6379"

_lock = threading.Lock()
_url: str | None = None
_session_server: RedisServer | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """A raw RESP PING, so this module needs no client library."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One ``redis-server`` child process owned by a test."""

    port: int
    directory: Path
    persistent: bool
    process: subprocess.Popen[bytes] | None = None
    _owns_directory: bool = field(default=True, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, *, persistent: bool = True, port: int | None = None) -> RedisServer:
        """Spawn a server on ``port`` (default: a free one) and wait until it answers."""
        directory = Path(tempfile.mkdtemp(prefix="jobq-redis-"))
        server = cls(port=port or free_port(), directory=directory, persistent=persistent)
        server.resume()
        return server

    def resume(self) -> None:
        """(Re)start the process on the same port and directory."""
        if self.process is not None and self.process.poll() is None:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed and nothing answers on :6379")
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.directory),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not answers_ping("127.0.0.1", self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the process (SIGKILL: like a crash; the AOF holds every acknowledged write)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.resume()

    def close(self) -> None:
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def redis_url() -> str:
    """The Redis URL for this test session (shared 6379, or one spawned once)."""
    global _url, _session_server
    with _lock:
        if _url is None:
            if answers_ping("127.0.0.1", 6379):
                _url = DEFAULT_URL
            else:
                _session_server = RedisServer.start(persistent=False)
                atexit.register(_session_server.close)
                _url = _session_server.url
        return _url


def unique_prefix(label: str = "t") -> str:
    """A key prefix no other test uses: isolation on a shared Redis."""
    return f"{label}{uuid.uuid4().hex[:10]}"


def redis_backend_env(prefix: str, url: str | None = None) -> dict[str, str]:
    """Environment that puts ``jobq serve`` / ``jobq worker`` on the redis backend.

    SAQ's heartbeat and sweep run at 1-2 s here (tens of seconds in production), so
    a killed worker's job is taken up within seconds in tests; the shutdown grace
    is shorter than the harness's wait for a stopping process.
    """
    return {
        "REDIS_URL": url or redis_url(),
        "JOBS_KEY_PREFIX": prefix,
        "SAQ_HEARTBEAT_S": "2",
        "SAQ_SWEEP_S": "1",
        "SAQ_SWEEP_ABORT_WAIT_S": "0.5",
        "SAQ_WORKER_INFO_S": "1",
        "WORKER_GRACE_S": "5",
    }


def start_redis(*, persistent: bool = True) -> RedisServer:
    """Spawn a private server (for tests that stop or pause it)."""
    return RedisServer.start(persistent=persistent)


def restart_redis(server: RedisServer, down_s: float = 0.0) -> None:
    """Kill ``server`` and start it again on the same port with its data."""
    server.restart(down_s)


def stop_redis(server: RedisServer) -> None:
    """Stop ``server`` and remove its files."""
    with contextlib.suppress(Exception):
        server.close()
