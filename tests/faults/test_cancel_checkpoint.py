"""Faults: a cancel that lands while a checkpoint is being written.

To hit that window every time, the test puts a FIFO where accelerate writes checkpoint-10's
optimizer state, opens its reading end and never reads: the training child's write fills the
pipe and blocks there, halfway through the checkpoint (its adapter file already written). The
test sees the first bytes arrive and cancels through the API at that moment.
"""

from __future__ import annotations

import os
import select

import pytest

from faults.checks import (
    assert_artifacts, assert_finished, checkpoint_loras, final_loras, logs, metric_steps, wait_for_step,
)
from support.service import FINAL, read_sse, submit, upload

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])

TOTAL, EVERY, BLOCKED = 20, 5, 10


def test_cancel_during_a_checkpoint_write_then_retry_resumes_from_the_last_complete_one(
        settings, service, scratch, footprint):
    dataset_id = upload(service, scratch)
    job = submit(service, dataset_id, max_train_steps=TOTAL, checkpointing_steps=EVERY, train_batch_size=1)
    job_id = job["id"]
    checkpoint = settings.data_dir / "jobs" / job_id / "attempt-1" / f"checkpoint-{BLOCKED}"
    checkpoint.mkdir(parents=True)  # long before the trainer gets there (it needs seconds to start)
    os.mkfifo(checkpoint / "optimizer.bin")
    reader = os.open(checkpoint / "optimizer.bin", os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([reader], [], [], 120)
        assert ready, f"the trainer never wrote checkpoint-{BLOCKED}:\n{service.tail()}"
        writing = wait_for_step(service, job_id, BLOCKED)  # the step event may still be on its way in
        assert (writing["state"], writing["step"]) == ("running", BLOCKED), writing
        assert (checkpoint / "unet_lora.safetensors").is_file(), "the checkpoint is half-written"

        response = service.client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        canceled = service.wait_for(job_id, FINAL, timeout=30)
    finally:
        os.close(reader)

    # Canceled, and the half-written checkpoint is neither an artifact nor left to resume from.
    assert_finished(canceled, "canceled", BLOCKED, attempt=1, context=service.tail())
    assert metric_steps(service, job_id) == list(range(1, BLOCKED + 1))
    assert_artifacts(service, job_id, checkpoint_loras(5) | logs(1))
    assert not checkpoint.exists(), "the worker left the half-written checkpoint behind"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint-5", "train.log"]

    # A retry resumes from checkpoint-5, the last complete one, and trains to the end.
    retried = service.client.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200, retried.text
    done = service.wait_for(job_id, FINAL, timeout=120)
    assert_finished(done, "succeeded", TOTAL, attempt=2, context=service.tail())
    assert metric_steps(service, job_id) == list(range(1, TOTAL + 1)), "one loss per step, no gap"
    events = read_sse(service.client, f"/v1/jobs/{job_id}/events")
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    starts = [e["data"]["step"] for e in events if e["event"] == "log" and "total_steps" in e["data"]]
    assert starts == [0, 5], f"attempt 2 should start from checkpoint-5: {starts}"
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "canceling", "canceled", "queued", "running", "succeeded"], states
    assert_artifacts(service, job_id, checkpoint_loras(5, 10, 15, 20) | final_loras() | logs(1, 2))
    footprint.assert_clean()
