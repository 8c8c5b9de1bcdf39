"""End to end: a worker killed mid-run (SIGKILL) loses its lease; another worker's reaper requeues
the job as attempt 2, which resumes from the newest checkpoint and finishes the run."""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest

from trainer.model import LORA_WEIGHTS_NAME


from support.service import FINAL, read_sse, submit, upload

LEASE_S = 3.0
HEARTBEAT_S = 0.5


@pytest.fixture
def short_lease(settings, start_service):
    """The API and one worker on a 3 s lease (the reaper then runs every second)."""
    return start_service(settings.model_copy(update={"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S}))


def child_pid(logs: Path, job_id: str, attempt: int) -> int:
    match = re.search(rf"job\.started job={job_id} attempt={attempt} pid=(\d+)", (logs / "worker-1.log").read_text())
    assert match, "the worker logged no job.started line"
    return int(match.group(1))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_worker_sigkill_after_a_checkpoint_resumes_as_attempt_two(short_lease, tmp_path):
    service = short_lease
    total = 60
    kill_at = random.randint(7, 30)  # after checkpoint-5; the assertion messages name it
    dataset_id = upload(service, tmp_path)
    job = submit(service, dataset_id, max_train_steps=total, checkpointing_steps=5, train_batch_size=1)

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
    outcome = (done["state"], done["attempt"], done["step"], done["total_steps"])
    assert outcome == ("succeeded", 2, total, total), context
    artifacts = service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    loras = [a["name"] for a in artifacts if a["kind"] == "lora"]
    assert loras.count(LORA_WEIGHTS_NAME) == 1, (loras, context)
    metrics = service.client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["step"] for m in metrics] == list(range(1, total + 1)), "one loss per step, no gap, no repeat"

    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    states = [e["data"] for e in events if e["event"] == "state"]
    assert [s["state"] for s in states] == ["queued", "running", "queued", "running", "succeeded"], context
    assert states[2] == {"state": "queued", "reason": "lease expired", "attempt": 2}
    # Attempt 2 resumed from a checkpoint of attempt 1 instead of starting over.
    second_run = [i for i, e in enumerate(events) if e["event"] == "state" and e["data"]["state"] == "running"][1]
    first_resumed_step = next(e["data"]["step"] for e in events[second_run:] if e["event"] == "step")
    assert first_resumed_step > 1 and (first_resumed_step - 1) % 5 == 0, context
    assert first_resumed_step - 1 <= killed_at, context
    assert "job.requeued job=" + job["id"] in (service.logs / "worker-2.log").read_text()
