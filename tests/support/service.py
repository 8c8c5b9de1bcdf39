"""A real running service for tests: uvicorn serving the API and Celery worker processes on the
real Redis and the test's database, and the client-side steps tests take against it."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from trainer.sample_data import write_sample_dataset

ROOT = Path(__file__).resolve().parents[2]
# As deployed (Dockerfile, loraq.launcher): a SIGTERM ends open event streams after 5 s instead of
# waiting for their jobs to finish.
API_FLAGS = ["--timeout-graceful-shutdown", "5"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(settings) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "LORAQ_DATA_DIR": str(settings.data_dir), "LORAQ_REDIS_URL": settings.redis_url,
           "LORAQ_QUEUE_NAME": settings.queue_name, "LORAQ_HEARTBEAT_S": str(settings.heartbeat_s),
           "LORAQ_LEASE_S": str(settings.lease_s)}
    if settings.database_url:
        env["LORAQ_DATABASE_URL"] = settings.database_url
    return env


@dataclass
class Service:
    url: str
    client: httpx.Client
    api: subprocess.Popen
    worker: subprocess.Popen
    logs: Path
    env: dict = field(default_factory=dict)
    workers: list = field(default_factory=list)  # every worker started, the first included
    api_key: str | None = None  # the first admin key; `client` sends it
    python: str = sys.executable  # what runs the API and the workers (a wrapper may stand in)

    def start_worker(self, name: str) -> subprocess.Popen:
        """One more `python -m worker` on the same settings, logging to `<name>.log`."""
        process = start_worker(self.env, self.logs, name, self.python)
        self.workers.append(process)
        return process

    def wait_for(self, job_id: str, states: set[str], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def start_worker(env: dict, logs: Path, name: str, python: str = sys.executable) -> subprocess.Popen:
    return subprocess.Popen([python, "-m", "worker"], cwd=ROOT, env=env,
                            stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(settings, logs: Path, python: str = sys.executable, worker_env: dict | None = None) -> Service:
    """Start the API on a free port and one worker (`worker-1.log`) with `python`; return once both
    answer. `worker_env` overrides the worker's environment (e.g. its own LORAQ_DATA_DIR)."""
    logs.mkdir()
    env = service_env(settings)
    port = free_port()
    api = subprocess.Popen(
        [python, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), *API_FLAGS], cwd=ROOT, env=env,
        stdout=open(logs / "api.log", "wb"), stderr=subprocess.STDOUT,
    )
    worker = start_worker({**env, **(worker_env or {})}, logs, "worker-1", python)
    url = f"http://127.0.0.1:{port}"
    running = Service(url, httpx.Client(base_url=url, timeout=30), api, worker, logs, env, [worker], python=python)
    deadline = time.monotonic() + 90
    while True:
        try:
            health = running.client.get("/healthz")
            if health.status_code == 200 and health.json().get("workers", 0) >= 1:
                running.api_key = (settings.data_dir / "admin-key").read_text().strip()
                running.client.headers["Authorization"] = f"Bearer {running.api_key}"
                return running
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or api.poll() is not None or worker.poll() is not None:
            shut_down(running)
            raise AssertionError(f"service did not come up:\n{running.tail()}")
        time.sleep(0.3)


def shut_down(running: Service) -> None:
    """Stop every worker the service started, then the API."""
    running.client.close()
    for process in running.workers:
        stop(process)
    stop(running.api)


# --------------------------------------------------------------------------------------------
# What a client does against it


FINAL = {"succeeded", "failed", "canceled"}


def dataset_zip(tmp_path, n_images=4) -> bytes:
    folder = write_sample_dataset(tmp_path / "upload", n_images=n_images, size=32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return buffer.getvalue()


def upload(service, tmp_path) -> str:
    response = service.client.post("/v1/datasets", files={"files": ("pets.zip", dataset_zip(tmp_path),
                                                                    "application/zip")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(service, dataset_id: str, **options) -> dict:
    body = {"dataset_id": dataset_id, "base_model": "tiny-sd",
            "options": {"resolution": 32, "train_batch_size": 2, "seed": 0, **options}}
    response = service.client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def read_sse(client: httpx.Client, path: str, timeout: float = 180) -> list[dict]:
    """Read a Server-Sent Events stream until the server closes it."""
    events, current = [], {}
    with client.stream("GET", path, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    events.append({"id": int(current["id"]), "event": current.get("event"),
                                   "data": json.loads(current["data"]), "received": time.monotonic()})
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                current[key] = value.lstrip(" ")
    return events
