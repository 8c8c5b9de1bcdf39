"""Faults: a worker told to stop (SIGTERM: a deploy, a spot instance's notice) mid-job hands the
job back: a checkpoint at the step it had reached, the job queued again at once as the next
attempt, the worker gone within its grace; a second worker resumes it with no step lost or
repeated. The lease (30 s here) plays no part."""

from __future__ import annotations

import signal
import time

import pytest

from faults.checks import assert_artifacts, assert_finished, checkpoint_loras, final_loras, logs, metric_steps
from faults.stores import wait_until
from support.service import FINAL, read_sse, submit, upload

TOTAL, EVERY = 300, 100
HANDOVER_S = 5.0  # the bound, on top of the checkpoint write


@pytest.mark.parametrize("backend", ["postgresql"])  # the scale-out layout; SQLite takes the same path
def test_sigterm_mid_job_hands_it_to_another_worker(settings, start_service, scratch, footprint):
    assert settings.lease_s >= 30 and settings.shutdown_grace_s == 30
    service = start_service(settings)
    second = service.start_worker("worker-2")
    # Ready to take messages (its heartbeat on /healthz starts before Celery has connected).
    wait_until(lambda: " ready." in (service.logs / "worker-2.log").read_text(), 120, service.tail)
    dataset_id = upload(service, scratch)
    job = submit(service, dataset_id, max_train_steps=TOTAL, checkpointing_steps=EVERY, train_batch_size=1)
    reached = wait_until(lambda: (j := service.client.get(f"/v1/jobs/{job['id']}").json())["step"] >= 20 and j,
                         90, service.tail)
    # Whichever worker took it is told to stop; the other takes over.
    (first, first_log), (second, second_log) = sorted(
        [(service.worker, "worker-1.log"), (second, "worker-2.log")],
        key=lambda pair: f"loraq-{pair[0].pid}@" not in (reached["worker"] or ""))
    assert reached["attempt"] == 1 and f"loraq-{first.pid}@" in (reached["worker"] or ""), reached

    first.send_signal(signal.SIGTERM)
    signaled = time.monotonic()
    wait_until(lambda: (j := service.client.get(f"/v1/jobs/{job['id']}").json())["attempt"] == 2 and j,
                          30, service.tail)
    requeued_s = time.monotonic() - signaled
    resumed = wait_until(lambda: (j := service.client.get(f"/v1/jobs/{job['id']}").json())["state"] != "queued" and j,
                         30, service.tail)
    handover_s = time.monotonic() - signaled
    first.wait(timeout=35)
    exit_s = time.monotonic() - signaled
    context = f"SIGTERM at step >= {reached['step']}\n{service.tail()}"
    assert first.returncode == 0, context
    assert exit_s < settings.shutdown_grace_s, context
    assert resumed["attempt"] == 2 and f"loraq-{second.pid}@" in (resumed["worker"] or ""), resumed

    done = service.wait_for(job["id"], FINAL, timeout=180)
    assert_finished(done, "succeeded", TOTAL, attempt=2, context=context)
    assert metric_steps(service, job["id"]) == list(range(1, TOTAL + 1)), "one loss per step, no gap, no repeat"
    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")
    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), context
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, TOTAL + 1)), "every step trained once, none lost or redone"
    states = [e["data"] for e in events if e["event"] == "state"]
    assert [s["state"] for s in states] == ["queued", "running", "queued", "running", "succeeded"], context
    assert states[2] == {"state": "queued", "reason": "worker shutting down", "attempt": 2}

    # Attempt 2 resumed from a checkpoint attempt 1 wrote at the step it had reached when told to
    # stop, not from the last scheduled one.
    second_run = [i for i, e in enumerate(events) if e["event"] == "state" and e["data"]["state"] == "running"][1]
    handed_at = next(e["data"]["step"] for e in events[second_run:] if e["event"] == "step") - 1
    assert handed_at >= reached["step"], context
    assert any(e["event"] == "checkpoint" and e["data"]["step"] == handed_at for e in events[:second_run]), context
    checkpoint = settings.data_dir / "jobs" / job["id"] / "attempt-1" / f"checkpoint-{handed_at}"
    step_time = next(s["time"] for s in steps if s["step"] == handed_at)
    write_s = max(p.stat().st_mtime for p in checkpoint.rglob("*") if p.is_file()) - step_time
    assert handover_s < HANDOVER_S + write_s, (f"handover {handover_s:.2f} s (queued again after {requeued_s:.2f} s), "
                                               f"checkpoint write {write_s:.2f} s\n{context}")
    print(f"handover: queued again after {requeued_s:.2f} s, running on the other worker after {handover_s:.2f} s "
          f"(checkpoint write {write_s:.2f} s), the stopped worker exited after {exit_s:.2f} s")

    # Attempt 2 trained only from the hand-back checkpoint on; attempt 1 did not count as a fault.
    assert done["attempt"] == 2 and "job.handed_back" in (service.logs / first_log).read_text()
    assert "job.claimed job=" + job["id"] + " attempt=2" in (service.logs / second_log).read_text()
    assert_artifacts(service, job["id"], checkpoint_loras(*range(EVERY, TOTAL + 1, EVERY), handed_at)
                     | final_loras() | logs(1, 2))
    footprint.assert_clean()
