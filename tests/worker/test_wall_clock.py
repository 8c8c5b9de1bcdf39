"""LORAQ_MAX_JOB_SECONDS in the worker (loraq.limits.WallClock in the supervisor): the clock's
own rules, and a training that does not reach a step boundary within the grace stopped outright,
the job failed saying so with its complete checkpoints kept. The usual case (a checkpoint at the
next step, then the failure) runs against the whole service in tests/e2e/test_time_limit.py."""

from __future__ import annotations

import threading
import time

import pytest

from loraq import storage
from loraq.limits import WallClock
from loraq.models import JobState
from trainer.checkpoints import complete_checkpoints
import worker.runner as runner_module
from worker.runner import Outcome, run_job


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_wall_clock_rules():
    clock = Clock()
    wall = WallClock(10, grace_s=5, clock=clock)
    clock.now += 10
    assert not wall.expired()  # at the limit is still within it
    clock.now += 0.5
    assert wall.expired() and not wall.asked and not wall.overdue()
    assert wall.ask() and not wall.ask()  # the stop is sent once
    clock.now += 5
    assert not wall.overdue()
    clock.now += 0.5
    assert wall.overdue()
    assert wall.message(12) == ("the job ran past this server's wall-clock limit of 10 s per attempt "
                                "(LORAQ_MAX_JOB_SECONDS); stopped at step 12 with checkpoint-12 kept, "
                                "so a retry resumes from it")
    off = WallClock(0, clock=clock)
    clock.now += 10**6
    assert not off.expired()  # 0: no limit


@pytest.mark.parametrize("backend", ["sqlite"])  # the supervisor's timing, not the database's
def test_a_training_that_does_not_stop_in_the_grace_is_stopped_and_the_job_fails(settings, make_job, store,
                                                                                 monkeypatch):
    # No grace at all: the moment the time is up the child is stopped, wherever it is; the limit
    # falls once checkpoint-5 exists, so what was complete before stays.
    monkeypatch.setattr("loraq.limits.STOP_GRACE_S", 0.0)
    job_id = make_job(5000, checkpointing_steps=5)
    limited = settings.model_copy(update={"max_job_seconds": 3600})
    outcome: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcome.append(run_job(limited, job_id, 1)))
    attempt_dir = storage.attempt_dir(settings, job_id, 1)
    # Start the attempt under a limit it cannot reach, and shorten the limit once checkpoint-5 is there.
    clocks: list[WallClock] = []
    original = runner_module.WallClock

    def recording(*args, **kwargs):
        clocks.append(original(*args, **kwargs))
        return clocks[-1]

    monkeypatch.setattr(runner_module, "WallClock", recording)
    runner.start()
    deadline = time.monotonic() + 120
    while not any(path.name == "checkpoint-5" for path in complete_checkpoints(attempt_dir)):
        assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint-5"
        time.sleep(0.05)
    clocks[0].limit_s = 0.001
    runner.join(60)

    assert outcome == [Outcome.failed]
    job = store.job(job_id)
    assert job.state == JobState.failed.value
    assert job.error == ("the job ran past this server's wall-clock limit of 0.001 s per attempt "
                         "(LORAQ_MAX_JOB_SECONDS); its complete checkpoints are kept, so a retry resumes from the last")
    kept = [path.name for path in complete_checkpoints(attempt_dir)]
    assert "checkpoint-5" in kept and job.step < 5000
    assert "checkpoint-5/pytorch_lora_weights.safetensors" in store.artifacts(job_id)
