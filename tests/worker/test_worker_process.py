"""A real worker process (`python -m worker`) consuming real Celery messages from Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraq import events
from loraq.queue import enqueue_job, make_celery

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def start_worker(settings, tmp_path, redis_client):
    """Start `python -m worker` processes on the test's queue and database; stopped at teardown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "LORAQ_DATA_DIR": str(settings.data_dir), "LORAQ_REDIS_URL": settings.redis_url,
           "LORAQ_QUEUE_NAME": settings.queue_name, "LORAQ_HEARTBEAT_S": str(settings.heartbeat_s),
           "LORAQ_LEASE_S": str(settings.lease_s)}
    env.pop("LORAQ_DATABASE_URL", None)
    if settings.database_url:
        env["LORAQ_DATABASE_URL"] = settings.database_url
    started: list[tuple[subprocess.Popen, Path]] = []

    def start() -> Path:
        log_path = tmp_path / f"worker-{len(started)}.log"
        with open(log_path, "wb") as log_file:
            # Its own session, so teardown can stop the worker and its pool process together.
            process = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        started.append((process, log_path))
        return log_path

    yield start
    _stop([process for process, _ in started])
    redis_client.delete(settings.queue_name, f"_kombu.binding.{settings.queue_name}",
                        f"_kombu.binding_permanent.{settings.queue_name}")


def _stop(processes: list[subprocess.Popen]) -> None:
    """Warm shutdown (SIGTERM) for all, then SIGKILL for any group still there after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait_s
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def wait_until(condition, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            output = "\n".join(f"--- {path.name}\n{path.read_text()[-4000:]}" for path in logs)
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{output}")
        time.sleep(0.2)


def test_the_same_task_sent_twice_trains_once(settings, make_job, store, start_worker):
    # Two workers, so that the two deliveries can race each other for the claim.
    logs = [start_worker(), start_worker()]
    job_id = make_job(4)

    app = make_celery(settings)
    try:
        enqueue_job(app, job_id, 1)
        enqueue_job(app, job_id, 1)  # a duplicate delivery, as a redelivered message would be
    finally:
        app.close()

    def worker_output() -> str:
        return "".join(path.read_text() for path in logs)

    wait_until(lambda: store.job(job_id).state in ("succeeded", "failed"), 120, "the job to finish", logs)
    wait_until(lambda: "job.claim_rejected" in worker_output(), 60, "the duplicate to be rejected", logs)

    job = store.job(job_id)
    assert (job.state, job.error) == ("succeeded", None)
    assert store.metric_steps(job_id) == [1, 2, 3, 4]
    running = [e for e in store.events(job_id) if e.type == events.STATE and e.data["state"] == "running"]
    assert len(running) == 1
    assert worker_output().count("job.claimed") == 1 and worker_output().count("job.claim_rejected") == 1
    assert job.worker.startswith("loraq-")
