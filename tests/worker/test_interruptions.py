"""Interrupting a running attempt: cancel, resume from its checkpoint, losing the lease."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from loraq import events, jobs, storage
from loraq.models import JobState
from worker.runner import Outcome, cancel_key, run_job


class Attempt(threading.Thread):
    """run_job in a background thread, as a worker would run it, with its outcome kept."""

    def __init__(self, settings, job_id: str, attempt: int = 1):
        super().__init__(daemon=True)
        self.args_ = (settings, job_id, attempt)
        self.outcome: Outcome | None = None

    def run(self) -> None:
        self.outcome = run_job(*self.args_)


@pytest.fixture
def child_pids(caplog):
    """The pids of the training children started so far (from the `job.started` log records)."""
    caplog.set_level(logging.INFO, logger="loraq.worker")
    return lambda: [r.child_pid for r in caplog.records if hasattr(r, "child_pid")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def request_cancel(store, job_id: str) -> None:
    """What the API does on cancel: running -> canceling."""
    with store.sessions.begin() as session:
        assert jobs.transition(session, job_id, JobState.running, JobState.canceling) is not None


def requeue(store, job_id: str, from_state: JobState, attempt: int) -> None:
    """What a retry (or the lease reaper) does: back to queued as a new attempt."""
    with store.sessions.begin() as session:
        assert jobs.transition(session, job_id, from_state, JobState.queued, new_attempt=attempt) is not None


def test_cancel_stops_the_child_within_seconds(settings, make_job, store, child_pids, redis_client):
    job_id = make_job(2000, checkpointing_steps=5)
    attempt = Attempt(settings, job_id)
    attempt.start()
    store.wait_for_steps(job_id, 3)

    request_cancel(store, job_id)
    redis_client.set(cancel_key(job_id), 1, ex=60)  # the API's nudge; the job row decides
    asked = time.monotonic()
    attempt.join(10)

    assert not attempt.is_alive() and attempt.outcome == Outcome.canceled
    assert time.monotonic() - asked < 10
    job = store.job(job_id)
    assert job.state == "canceled" and job.finished_at is not None and job.step < 2000
    assert not alive(child_pids()[0])
    assert store.events(job_id)[-1].data == {"state": "canceled"}
    assert "logs/attempt-1.log" in store.artifacts(job_id)
    assert not redis_client.exists(cancel_key(job_id))


def test_child_killed_by_a_signal_fails_the_job_saying_so(settings, make_job, store, child_pids):
    job_id = make_job(2000)
    attempt = Attempt(settings, job_id)
    attempt.start()
    store.wait_for_steps(job_id, 3)

    os.kill(child_pids()[0], signal.SIGKILL)  # what the kernel's out-of-memory killer does
    attempt.join(10)

    assert attempt.outcome == Outcome.failed
    error = store.job(job_id).error
    assert error.startswith("the training process was killed by SIGKILL")
    assert "last lines of train.log" in error and "training 2000 steps" in error


def test_attempt_past_its_time_limit_is_stopped_and_failed(settings, make_job, store, child_pids, monkeypatch):
    monkeypatch.setattr("worker.runner.MAX_ATTEMPT_S", 3.0)
    job_id = make_job(2000)

    assert run_job(settings, job_id, 1) == Outcome.failed

    assert "time limit" in store.job(job_id).error
    assert not alive(child_pids()[0])


def test_canceled_job_resumes_from_its_checkpoint_as_attempt_2(settings, make_job, store, child_pids):
    # Far more steps than the 6 waited for: under load the worker records events well behind the
    # child, and a child that reaches its last step before the SIGSTOP ends the job as succeeded.
    steps = 120
    job_id = make_job(steps, checkpointing_steps=5)
    first = Attempt(settings, job_id)
    first.start()
    store.wait_for_steps(job_id, 6)  # step 6 is reported after checkpoint-5 is on disk
    os.kill(child_pids()[0], signal.SIGSTOP)  # hold it here, well before its last step, until the cancel
    request_cancel(store, job_id)
    first.join(10)
    assert first.outcome == Outcome.canceled

    requeue(store, job_id, JobState.canceled, attempt=2)
    assert run_job(settings, job_id, 2) == Outcome.succeeded

    job = store.job(job_id)
    assert (job.state, job.attempt, job.step, job.total_steps) == ("succeeded", 2, steps, steps)
    assert store.metric_steps(job_id) == list(range(1, steps + 1))
    recorded = store.events(job_id)
    resumed_at = [e.data["step"] for e in recorded if e.type == events.LOG]
    assert resumed_at[0] == 0 and resumed_at[1] >= 5 and resumed_at[1] % 5 == 0
    assert [e.data["state"] for e in recorded if e.type == events.STATE] == [
        "running", "canceling", "canceled", "queued", "running", "succeeded"]
    # Attempt 2 picked up attempt 1's checkpoint instead of training those steps again.
    attempt_2 = storage.attempt_dir(settings, job_id, 2)
    assert not (attempt_2 / "checkpoint-5").exists() and (attempt_2 / f"checkpoint-{steps}").is_dir()
    artifacts = store.artifacts(job_id)
    assert attempt_2 in Path(artifacts["pytorch_lora_weights.safetensors"].path).parents
    assert {"logs/attempt-1.log", "logs/attempt-2.log"} <= set(artifacts)


def test_attempt_that_lost_its_lease_stops_and_writes_nothing_more(settings, make_job, store, child_pids):
    job_id = make_job(2000, checkpointing_steps=5)
    attempt = Attempt(settings, job_id)
    attempt.start()
    store.wait_for_steps(job_id, 3)

    requeue(store, job_id, JobState.running, attempt=2)  # as the reaper does once a lease expires
    steps_then, events_then = store.metric_steps(job_id), store.events(job_id)
    attempt.join(10)

    assert attempt.outcome == Outcome.lost
    assert not alive(child_pids()[0])
    job = store.job(job_id)
    assert (job.state, job.attempt) == ("queued", 2)
    assert store.metric_steps(job_id) == steps_then
    assert [e.seq for e in store.events(job_id)] == [e.seq for e in events_then]
