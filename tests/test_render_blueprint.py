"""render.yaml deploys what it says: its build command installs the package, and its
start commands, with the Blueprint's own environment, run a web service and a worker
that complete a job on Redis.

The build runs in a fresh virtualenv from a copy of the project's tracked files, as
Render's build does from the repository. The dependencies come from this test run's
environment (a ``.pth`` line), so the build needs no download beyond the build
backend; the project itself is a regular (not editable) install, so prompts or web
page files missing from the package data fail here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.contract.helpers import body, wait_for, wait_until
from tests.support.redis_server import redis_url, unique_prefix
from tests.support.service import base_env, free_port

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINT = yaml.safe_load((ROOT / "render.yaml").read_text())
INSTALL_TIMEOUT_S = 600


def render_service(kind: str) -> dict[str, Any]:
    """The Blueprint's service of type ``kind``."""
    (service,) = [s for s in BLUEPRINT["services"] if s["type"] == kind]
    return dict(service)


def render_env(service: dict[str, Any]) -> dict[str, str]:
    """The variables Render sets for ``service``: its groups' values, then its own.
    ``sync: false`` secrets stay unset (an operator without provider keys leaves them
    empty) and ``fromService`` links are the caller's to resolve."""
    groups = {g["name"]: g["envVars"] for g in BLUEPRINT.get("envVarGroups", [])}
    env: dict[str, str] = {}
    for var in service.get("envVars", []):
        for entry in groups[var["fromGroup"]] if "fromGroup" in var else [var]:
            if "value" in entry:
                env[entry["key"]] = str(entry["value"])
    return env


def linked_keys(service: dict[str, Any]) -> set[str]:
    return {v["key"] for v in service.get("envVars", []) if "fromService" in v}


def tracked_copy(target: Path) -> Path:
    """The project's committed and working files, as a checkout on Render would hold them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv in which the Blueprint's build command ran; returns its bin/."""
    base = tmp_path_factory.mktemp("render")
    source = tracked_copy(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "jobq_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        ["bash", "-c", render_service("web")["buildCommand"]],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return venv / "bin"


class Started:
    """A start command running in its own process group, its output in a file."""

    def __init__(self, command: str, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def lines(self) -> list[dict[str, Any]]:
        parsed = []
        for raw in self.log.read_text(errors="replace").splitlines():
            try:
                parsed.append(json.loads(raw))
            except json.JSONDecodeError:
                parsed.append({"unparsed": raw})
        return parsed

    def stop(self, timeout_s: float) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
                return None
        return self.popen.returncode


@pytest.fixture
def deployed(built: Path, tmp_path: Path) -> Iterator[tuple[str, Started, Started]]:
    """Render's web and worker services from their start commands, on one Redis;
    yields (web URL, web, worker)."""
    port = free_port()
    shared = {
        **base_env(),
        "PATH": f"{built}{os.pathsep}{os.environ['PATH']}",
        "JOBS_KEY_PREFIX": unique_prefix("render"),  # isolation on the tests' shared Redis
    }
    shared.pop("PYTHONPATH", None)
    started: list[Started] = []
    for kind, extra in (("web", {"PORT": str(port)}), ("worker", {})):
        service = render_service(kind)
        env = {**shared, **render_env(service), **extra}
        env.update(dict.fromkeys(linked_keys(service), redis_url()))
        started.append(Started(service["startCommand"], env, tmp_path, tmp_path / f"{kind}.log"))
    web, worker = started
    try:
        yield f"http://127.0.0.1:{port}", web, worker
    finally:
        for proc in started:
            proc.stop(10)


def test_the_build_installs_the_package_not_the_source_tree(built: Path, tmp_path: Path) -> None:
    """The build command leaves an installed copy of the project, prompts included."""
    probe = subprocess.run(
        [
            built / "python",
            "-c",
            "import handlers, pipeline.prompts as p; print(handlers.__file__); print(p.__file__)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    files = probe.stdout.split()
    assert all(str(built.parent) in f for f in files), files
    prompts = Path(files[1]).parent / "prompts"
    assert sorted(p.name for p in prompts.iterdir() if p.is_dir()) == ["de", "en"]


def test_the_start_commands_serve_and_complete_a_job(deployed: tuple[str, Started, Started]) -> None:
    """With only the Blueprint's variables, the web answers its health check and the
    page at /, and the worker completes a job, logging JSON lines with its id."""
    url, web, worker = deployed
    health = render_service("web")["healthCheckPath"]
    with httpx.Client(base_url=url, timeout=10) as client:

        def healthy() -> bool:
            assert web.popen.poll() is None, web.log.read_text()[-3000:]
            try:
                return client.get(health).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, "the web service's health check", 60)
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        created = client.post("/api/jobs", json=body())
        assert created.status_code == 202, created.text
        job_id = created.json()["jobId"]
        view = wait_for(client, job_id, timeout_s=90)
        assert view["status"] == "completed", (view, worker.log.read_text()[-3000:])
        assert view["result"]["data"]
    lines = worker.lines()
    assert not [line for line in lines if "unparsed" in line], lines[:5]
    events = [line["event"] for line in lines if line.get("job_id") == job_id]
    assert {"job_picked_up", "step_started", "step_finished", "job_completed"} <= set(events), events


def test_a_deploy_gives_the_worker_its_whole_grace() -> None:
    """Render's wait before SIGKILL outlasts the worker's grace for running jobs."""
    worker = render_service("worker")
    grace = float(render_env(worker)["WORKER_GRACE_S"])
    assert grace < worker["maxShutdownDelaySeconds"]
