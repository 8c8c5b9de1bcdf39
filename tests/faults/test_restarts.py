"""Faults: Redis or the API restarted while a job trains. The database is the record and Redis
only the queue and a wake-up, so the training never stops and no event is lost or repeated."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from faults.checks import (
    assert_artifacts, assert_finished, checkpoint_loras, final_loras, logs, metric_steps, wait_for_step,
)
from support.service import API_FLAGS, FINAL, ROOT, free_port, read_sse, stop, submit, upload


class PrivateRedis:
    """A redis-server of this test's own, with an append-only file so the queue survives a restart."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.folder = folder
        self.folder.mkdir()
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.folder)],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis_lib.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    return
            except redis_lib.RedisError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, (self.folder / "redis.log").read_text()
            time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def assert_gapless(service, job_id: str, events: list[dict], total: int) -> None:
    ids = [e["id"] for e in events]
    assert ids == list(range(1, len(ids) + 1)), f"event ids have a gap or a repeat: {ids}"
    steps = [e["data"]["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, total + 1)), "one step event per step, no gap, no repeat"
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"], "one attempt, never requeued"


@pytest.mark.parametrize("backend", ["sqlite"])  # Redis is the fault here; the database only records it
def test_redis_restart_mid_job(settings, private_redis, start_service, scratch, footprint):
    """Redis is killed (SIGKILL, no chance to flush anything) while a job trains, and comes back
    on the same port and append-only file 2 s later: the training goes on, the job succeeds in its
    first attempt with every metric and every event, and the worker takes new jobs afterwards."""
    service = start_service(settings.model_copy(update={"redis_url": private_redis.url}))
    dataset_id = upload(service, scratch)
    total = 300
    job = submit(service, dataset_id, max_train_steps=total, checkpointing_steps=10, train_batch_size=1)

    running = wait_for_step(service, job["id"], 5)
    assert running["state"] == "running", running
    private_redis.kill()
    time.sleep(2)
    during = service.client.get(f"/v1/jobs/{job['id']}").json()  # the API answers from the database
    private_redis.start()
    assert during["state"] == "running" and during["step"] < total, "Redis came back after the job ended"

    # A stream opened now, while the job still trains, and one resumed with Last-Event-ID.
    live = read_sse(service.client, f"/v1/jobs/{job['id']}/events")
    finished = service.wait_for(job["id"], FINAL, timeout=120)
    assert_finished(finished, "succeeded", total, attempt=1, context=service.tail())
    assert metric_steps(service, job["id"]) == list(range(1, total + 1)), "one metric row per step, no gap"
    assert_gapless(service, job["id"], live, total)
    assert_artifacts(service, job["id"], checkpoint_loras(*range(10, total + 1, 10)) | final_loras() | logs(1))
    middle = live[len(live) // 2]["id"]
    resumed = _read_sse_from(service.client, job["id"], middle)
    assert [e["id"] for e in resumed] == list(range(middle + 1, live[-1]["id"] + 1))

    worker_log = (service.logs / "worker-1.log").read_text()
    assert "event.publish_failed" in worker_log, "Redis was back before the worker noticed it gone"

    # The worker's Celery consumer reconnected: a job submitted after the restart runs too.
    after = submit(service, dataset_id, max_train_steps=2)
    assert_finished(service.wait_for(after["id"], FINAL, timeout=60), "succeeded", 2, attempt=1,
                    context=service.tail())
    assert_artifacts(service, after["id"], final_loras() | logs(1))
    assert all(process.poll() is None for process in [service.api, *service.workers]), service.tail()
    footprint.assert_clean()


def _read_sse_from(client: httpx.Client, job_id: str, last_id: int) -> list[dict]:
    return list(_iter_sse(client, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": str(last_id)}))


def _iter_sse(client: httpx.Client, path: str, headers: dict | None = None, timeout: float = 180):
    current = {}
    with client.stream("GET", path, headers=headers or {}, timeout=timeout) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    yield {"id": int(current["id"]), "event": current.get("event"),
                           "data": json.loads(current["data"])}
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                current[key] = value.lstrip(" ")


def start_api(service) -> subprocess.Popen:
    """A new uvicorn on the service's own port and environment, as start_service starts one."""
    port = service.url.rsplit(":", 1)[1]
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", port, *API_FLAGS], cwd=ROOT, env=service.env,
        stdout=open(service.logs / "api-2.log", "wb"), stderr=subprocess.STDOUT)


def test_api_restart_mid_stream(settings, start_service, scratch, footprint):
    """The API is terminated while a client follows a job's events; a new API on the same port
    takes the resumed stream (Last-Event-ID) and the union is every event once, in order, while the
    worker trained on in its first attempt."""
    service = start_service(settings)
    dataset_id = upload(service, scratch)
    total = 600
    job = submit(service, dataset_id, max_train_steps=total, checkpointing_steps=10, train_batch_size=1)
    worker_pid = service.worker.pid

    # Follow the stream; after a few steps, terminate the API under it and read on until it breaks.
    first: list[dict] = []
    stopped_at = None
    stream = httpx.Client(base_url=service.url, headers=service.client.headers, timeout=30)
    try:
        for event in _iter_sse(stream, f"/v1/jobs/{job['id']}/events"):
            first.append(event)
            if stopped_at is None and sum(e["event"] == "step" for e in first) >= 3:
                stopped_at = time.monotonic()
                service.api.terminate()
    except httpx.TransportError:
        pass  # the server went away mid-stream
    finally:
        stream.close()
    assert stopped_at is not None, "the stream ended before three steps"
    service.api.wait(timeout=15)
    exit_s = time.monotonic() - stopped_at
    assert exit_s < 10, f"the API took {exit_s:.1f} s to stop under an open event stream"
    assert not any(e["event"] == "state" and e["data"]["state"] in FINAL for e in first), \
        "the old API streamed to the end of the job instead of stopping"
    service.api = start_api(service)  # the fixture stops this one at the end
    deadline = time.monotonic() + 60
    while True:
        try:
            if service.client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and service.api.poll() is None, service.tail()
        time.sleep(0.2)
    down_s = time.monotonic() - stopped_at
    during = service.client.get(f"/v1/jobs/{job['id']}").json()
    assert during["state"] == "running", f"the job ended while the API was down ({down_s:.1f} s): {during}"

    rest = _read_sse_from(service.client, job["id"], first[-1]["id"])
    events = first + rest
    finished = service.client.get(f"/v1/jobs/{job['id']}").json()
    assert_finished(finished, "succeeded", total, attempt=1, context=service.tail())
    assert_gapless(service, job["id"], events, total)
    assert service.worker.pid == worker_pid and service.worker.poll() is None, "the worker kept running"
    assert metric_steps(service, job["id"]) == list(range(1, total + 1))
    assert_artifacts(service, job["id"], checkpoint_loras(*range(10, total + 1, 10)) | final_loras() | logs(1))
    footprint.assert_clean()
