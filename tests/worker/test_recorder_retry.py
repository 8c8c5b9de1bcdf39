"""A batch of trainer events written again after a failure that may have followed its commit (a
database that died before answering): never a repeated job event."""

from __future__ import annotations

import time

from redis import Redis

from loraq import events, jobs
from loraq.db import make_engine, make_session_factory
from loraq.models import JobState
from worker.recorder import Recorder


def step(n: int) -> dict:
    return {"type": "step", "step": n, "total_steps": 10, "loss": 0.5, "lr": 1e-4, "time": time.time() + n}


def test_written_tells_whether_an_unanswered_batch_got_in(settings, make_job, store):
    job_id = make_job(10)
    engine = make_engine(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            claimed = jobs.claim(session, job_id, 1, "test", settings.lease_s)
        recorder = Recorder(settings, sessions, redis, job_id, 1)
        recorder.last_seq = claimed.seq
        recorder.record([step(1), step(2)])
        known = recorder.last_seq

        # A batch whose commit went through, though its answer never came back.
        recorder.record([step(3), step(4)])
        recorder.last_seq = known
        with sessions.begin() as session:  # the API's cancel lands meanwhile: a state event
            jobs.transition(session, job_id, JobState.running, JobState.canceling)
        assert recorder.written() is True
        # A batch that never got in.
        assert recorder.written() is False
        recorder.record([step(5)])

        recorded = [e for e in store.events(job_id) if e.type == events.STEP]
        assert [e.data["step"] for e in recorded] == [1, 2, 3, 4, 5]
        assert store.metric_steps(job_id) == [1, 2, 3, 4, 5]
    finally:
        engine.dispose()
        redis.close()
