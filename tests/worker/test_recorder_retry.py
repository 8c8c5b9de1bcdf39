"""A batch of trainer events written again after a failure that may have followed its commit (a
database that died before answering): never a repeated job event."""

from __future__ import annotations

import time

from redis import Redis

from loraq import events, jobs
from loraq.db import make_engine, make_session_factory
from worker.recorder import Recorder


def step(n: int) -> dict:
    return {"type": "step", "step": n, "total_steps": 10, "loss": 0.5, "lr": 1e-4, "time": time.time() + n}


def test_a_batch_retried_after_its_commit_is_not_written_twice(settings, make_job, store):
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
        committed = [step(3), step(4)]
        recorder.record(committed)
        recorder.last_seq -= 2  # as if the answer to that commit never came back

        recorder.record(committed, maybe_written=True)  # the retry finds it written
        recorder.record([step(5)], maybe_written=True)  # a batch that never got in is written

        recorded = [e for e in store.events(job_id) if e.type == events.STEP]
        assert [e.data["step"] for e in recorded] == [1, 2, 3, 4, 5]
        assert [e.seq for e in store.events(job_id)] == list(range(1, len(store.events(job_id)) + 1))
        assert store.metric_steps(job_id) == [1, 2, 3, 4, 5]
    finally:
        engine.dispose()
        redis.close()
