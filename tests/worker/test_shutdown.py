"""A worker shutting down: the running attempt checkpoints at its next step and hands the job back;
a second request, or the grace running out, ends the process at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from loraq import events
from loraq.models import JobState
from worker.runner import Outcome, run_job
from worker.shutdown import EXIT_FORCED, Shutdown


class Exits:
    """Stands in for os._exit: records the code and when it came."""

    def __init__(self):
        self.codes: list[int] = []
        self.at: float | None = None
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.at = time.monotonic()
        self.called.set()


def test_the_grace_running_out_kills_the_child_and_exits():
    exits = Exits()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    shutdown = Shutdown(grace_s=0.5, exit=exits)
    shutdown.watch_child(child.pid)

    shutdown.request("test")
    asked = time.monotonic()

    assert exits.called.wait(5)
    assert exits.codes == [EXIT_FORCED] and 0.4 <= exits.at - asked < 2
    assert child.wait(5) == -signal.SIGKILL


def test_a_second_request_exits_at_once():
    exits = Exits()
    shutdown = Shutdown(grace_s=60, exit=exits)
    shutdown.request("first")
    assert shutdown.requested.is_set() and not exits.called.wait(0.3)

    shutdown.request("second")
    second = time.monotonic()

    assert exits.called.wait(5) and exits.at - second < 1
    assert exits.codes == [EXIT_FORCED]


@pytest.fixture
def attempt_1_handed_back(settings, make_job, store):
    """A 60-step job whose attempt 1 is asked to hand back after step 8 (scheduled checkpoints
    every 25 steps): (job id, outcome)."""
    job_id = make_job(60, checkpointing_steps=25)
    shutdown = Shutdown(grace_s=60, exit=Exits())
    outcome: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcome.append(run_job(settings, job_id, 1, shutdown=shutdown)))
    runner.start()
    store.wait_for_steps(job_id, 8)
    shutdown.request("test")
    runner.join(60)
    assert not runner.is_alive()
    return job_id, outcome[0]


def test_a_requested_shutdown_hands_the_job_back_from_the_step_reached(attempt_1_handed_back, settings, store):
    job_id, outcome = attempt_1_handed_back

    assert outcome == Outcome.handed_back
    job = store.job(job_id)
    assert (job.state, job.attempt, job.attempt_base, job.worker, job.lease_until) == ("queued", 2, 1, None, None)
    handed_at = job.step
    assert 8 <= handed_at < 25
    recorded = store.events(job_id)
    assert recorded[-1].data == {"state": "queued", "reason": "worker shutting down", "attempt": 2}
    assert [e.data["step"] for e in recorded if e.type == events.CHECKPOINT] == [handed_at]
    artifacts = store.artifacts(job_id)
    assert {f"checkpoint-{handed_at}/pytorch_lora_weights.safetensors", "logs/attempt-1.log"} <= set(artifacts)
    assert f"stopped on request at step {handed_at}" in (
        settings.data_dir / "jobs" / job_id / "attempt-1" / "train.log").read_text()

    # The next attempt resumes there: every step once, and it did not count against the limit.
    assert run_job(settings, job_id, 2) == Outcome.succeeded
    assert store.metric_steps(job_id) == list(range(1, 61))
    steps = [e.data["step"] for e in store.events(job_id) if e.type == events.STEP]
    assert steps == list(range(1, 61)), "no step lost or trained twice"
    assert store.job(job_id).state == JobState.succeeded.value


def test_a_shutdown_before_the_first_step_hands_back_at_once(settings, make_job, store):
    """Nothing trained yet, so nothing to checkpoint: the child (still loading) is stopped and the
    job handed back without waiting for a step that could come after the grace."""
    job_id = make_job(40, checkpointing_steps=100)
    shutdown = Shutdown(grace_s=60, exit=Exits())
    shutdown.request("before the child trained")

    assert run_job(settings, job_id, 1, shutdown=shutdown) == Outcome.handed_back
    job = store.job(job_id)
    assert (job.state, job.attempt, job.attempt_base) == ("queued", 2, 1)
    assert store.metric_steps(job_id) == [] and not [e for e in store.events(job_id) if e.type == events.STEP]
    assert store.events(job_id)[-1].data == {"state": "queued", "reason": "worker shutting down", "attempt": 2}
    assert run_job(settings, job_id, 2) == Outcome.succeeded
    assert store.metric_steps(job_id) == list(range(1, 41))
