"""Faults: a worker killed mid-run (SIGKILL) loses its lease; another worker's reaper requeues the
job as attempt 2, which resumes from the newest checkpoint and finishes the run."""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest

from faults.checks import assert_artifacts, assert_finished, checkpoint_loras, final_loras, logs, metric_steps
from support.service import FINAL, read_sse, submit, upload

LEASE_S = 3.0
HEARTBEAT_S = 0.5
TOTAL, EVERY = 60, 5


@pytest.fixture
def short_lease(settings, start_service):
    """The API and one worker on a 3 s lease (the reaper then runs every second)."""
    return start_service(settings.model_copy(update={"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S}))


def child_pid(logs_dir: Path, job_id: str, attempt: int) -> int:
    match = re.search(rf"job\.started job={job_id} attempt={attempt} pid=(\d+)", (logs_dir / "worker-1.log").read_text())
    assert match, "the worker logged no job.started line"
    return int(match.group(1))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_worker_sigkill_after_a_checkpoint_resumes_as_attempt_two(short_lease, settings, scratch, footprint):
    service = short_lease
    kill_at = random.randint(7, 30)  # after checkpoint-5; the assertion messages name it
    dataset_id = upload(service, scratch)
    job = submit(service, dataset_id, max_train_steps=TOTAL, checkpointing_steps=EVERY, train_batch_size=1)

    deadline = time.monotonic() + 120
    while (current := service.client.get(f"/v1/jobs/{job['id']}").json())["step"] < kill_at:
        assert current["state"] == "running" or current["state"] == "queued", current
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.05)
    child = child_pid(service.logs, job["id"], 1)
    assert alive(child)
    service.worker.send_signal(signal.SIGKILL)
    service.worker.wait(10)
    killed_at = service.client.get(f"/v1/jobs/{job['id']}").json()["step"]

    # The training child dies with its worker (PR_SET_PDEATHSIG), not later.
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, f"training child {child} outlived its killed worker"
        time.sleep(0.05)
    # Nobody renews the lease now, and no worker is left to reap it: the job stays running.
    assert service.client.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"

    service.start_worker("worker-2")
    done = service.wait_for(job["id"], FINAL, timeout=180)

    context = f"killed at step {killed_at} (asked {kill_at})\n{service.tail()}"
    assert_finished(done, "succeeded", TOTAL, attempt=2, context=context)
    assert done["total_steps"] == TOTAL
    assert metric_steps(service, job["id"]) == list(range(1, TOTAL + 1)), "one loss per step, no gap, no repeat"

    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    states = [e["data"] for e in events if e["event"] == "state"]
    assert [s["state"] for s in states] == ["queued", "running", "queued", "running", "succeeded"], context
    assert states[2] == {"state": "queued", "reason": "lease expired", "attempt": 2}
    # Attempt 2 resumed from a checkpoint of attempt 1 instead of starting over.
    second_run = [i for i, e in enumerate(events) if e["event"] == "state" and e["data"]["state"] == "running"][1]
    first_resumed_step = next(e["data"]["step"] for e in events[second_run:] if e["event"] == "step")
    resumed_from = first_resumed_step - 1
    assert resumed_from > 0 and resumed_from % EVERY == 0, context
    assert resumed_from <= killed_at, context
    assert "job.requeued job=" + job["id"] in (service.logs / "worker-2.log").read_text()

    # One final LoRA; every checkpoint once (up to the resume point from attempt 1, the rest from
    # attempt 2), none cut short by the kill; the log of attempt 2 (attempt 1 never settled).
    assert_artifacts(service, job["id"], checkpoint_loras(*range(EVERY, TOTAL + 1, EVERY)) | final_loras() | logs(2))
    footprint.assert_clean()
