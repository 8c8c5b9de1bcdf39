"""The lease reaper on the real database and Redis: requeue, give up, cancel, races; the attempt cap."""

from __future__ import annotations

import base64
import json
import threading
from datetime import timedelta

import pytest
from redis import Redis
from sqlalchemy import select

from loraq import events
from loraq.db import make_engine, make_session_factory
from loraq.models import Dataset, Job, JobEvent, JobState, new_id, utcnow
from loraq.queue import RUN_JOB_TASK, make_celery
from loraq.reaper import reap_expired


@pytest.fixture
def sessions(settings):
    engine = make_engine(settings)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def redis_client(settings):
    client = Redis.from_url(settings.redis_url)
    yield client
    client.delete(settings.queue_name)
    client.close()


@pytest.fixture
def celery_app(settings):
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def make_job(sessions):
    """Insert a job in `state` for `attempt` whose lease ends `lease_in` seconds from now."""

    def make(state: JobState, *, attempt: int = 1, lease_in: float = -5.0) -> str:
        dataset_id, job_id = new_id(), new_id()
        with sessions.begin() as session:
            session.add(Dataset(id=dataset_id, owner="local", name="shapes", image_count=4, captioned_count=4,
                                total_bytes=1, content_hash="0" * 64, storage_path="/nonexistent"))
            session.flush()
            session.add(Job(id=job_id, owner="local", dataset_id=dataset_id, base_model="tiny-sd", config={},
                            total_steps=10, state=state.value, attempt=attempt, worker="gone:1",
                            lease_until=utcnow() + timedelta(seconds=lease_in)))
        return job_id

    return make


def job_row(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def state_events(sessions, job_id: str) -> list[dict]:
    with sessions() as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == events.STATE)
                               .order_by(JobEvent.seq))
        return [row.data for row in rows]


def queued_messages(redis_client, settings) -> list[tuple[str, list]]:
    """(task name, args) of every message waiting on the test's queue, oldest first."""
    out = []
    for raw in reversed(redis_client.lrange(settings.queue_name, 0, -1)):  # LPUSH'ed: newest first
        message = json.loads(raw)
        out.append((message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0]))
    return out


def test_expired_running_job_is_requeued_as_the_next_attempt(settings, sessions, celery_app, redis_client, make_job):
    job_id = make_job(JobState.running, attempt=1)
    stream = events.stream_key(job_id)

    assert reap_expired(sessions, settings, celery_app) == [(job_id, 2)]

    job = job_row(sessions, job_id)
    assert (job.state, job.attempt, job.lease_until, job.worker) == ("queued", 2, None, None)
    assert state_events(sessions, job_id)[-1] == {"state": "queued", "reason": "lease expired", "attempt": 2}
    assert redis_client.llen(settings.queue_name) == 1
    assert queued_messages(redis_client, settings) == [(RUN_JOB_TASK, [job_id, 2])]
    published = redis_client.xrange(stream)
    assert json.loads(published[-1][1][b"data"]) == {"state": "queued", "reason": "lease expired", "attempt": 2}
    redis_client.delete(settings.queue_name, stream)

    assert reap_expired(sessions, settings, celery_app) == []  # nothing left to reap
    assert redis_client.llen(settings.queue_name) == 0


def test_live_lease_is_left_alone(settings, sessions, celery_app, redis_client, make_job):
    running = make_job(JobState.running, lease_in=30)
    canceling = make_job(JobState.canceling, lease_in=30)
    queued = make_job(JobState.queued, lease_in=-30)  # not leased: never the reaper's

    assert reap_expired(sessions, settings, celery_app) == []

    assert [job_row(sessions, j).state for j in (running, canceling, queued)] == ["running", "canceling", "queued"]
    assert job_row(sessions, running).attempt == 1
    assert redis_client.llen(settings.queue_name) == 0
    # The same lease seen from a later `now` has expired.
    later = utcnow() + timedelta(seconds=60)
    assert sorted(reap_expired(sessions, settings, celery_app, now=later), key=str) == sorted(
        [(running, 2), (canceling, None)], key=str)
    assert redis_client.llen(settings.queue_name) == 1


def test_last_attempt_fails_with_the_reason(settings, sessions, celery_app, redis_client, make_job):
    job_id = make_job(JobState.running, attempt=settings.max_attempts)

    assert reap_expired(sessions, settings, celery_app) == [(job_id, None)]

    job = job_row(sessions, job_id)
    reason = "worker lost 3 times (lease expired); giving up after 3 attempts"
    assert (job.state, job.attempt, job.error, job.lease_until) == ("failed", 3, reason, None)
    assert job.finished_at is not None
    assert state_events(sessions, job_id)[-1] == {"state": "failed", "reason": "lease expired", "attempt": 3,
                                                  "error": reason}
    assert redis_client.llen(settings.queue_name) == 0


def test_expired_canceling_job_becomes_canceled(settings, sessions, celery_app, redis_client, make_job):
    job_id = make_job(JobState.canceling, attempt=2)

    assert reap_expired(sessions, settings, celery_app) == [(job_id, None)]

    job = job_row(sessions, job_id)
    assert (job.state, job.attempt, job.lease_until) == ("canceled", 2, None)
    assert state_events(sessions, job_id)[-1]["state"] == "canceled"
    assert redis_client.llen(settings.queue_name) == 0


def test_concurrent_reapers_requeue_each_job_once(settings, sessions, celery_app, redis_client, make_job):
    job_ids = {make_job(JobState.running) for _ in range(4)}
    barrier = threading.Barrier(2)
    results: list[list] = []
    errors: list[BaseException] = []

    def reap() -> None:
        engine = make_engine(settings)  # each reaper with its own connections, as in two workers
        try:
            barrier.wait(10)
            results.append(reap_expired(make_session_factory(engine), settings, make_celery(settings)))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=reap) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors
    reaped = [item for result in results for item in result]
    assert sorted(reaped) == sorted((job_id, 2) for job_id in job_ids), "each job requeued exactly once"
    assert redis_client.llen(settings.queue_name) == len(job_ids)
    assert sorted(args for _, args in queued_messages(redis_client, settings)) == sorted(
        [job_id, 2] for job_id in job_ids)
    for job_id in job_ids:
        assert [e for e in state_events(sessions, job_id) if e.get("reason")] == [
            {"state": "queued", "reason": "lease expired", "attempt": 2}]
        assert (job_row(sessions, job_id).state, job_row(sessions, job_id).attempt) == ("queued", 2)


def test_a_message_past_the_attempt_cap_never_runs(settings, sessions, make_job):
    from worker.runner import Outcome, run_job

    over = settings.max_attempts + 1
    job_id = make_job(JobState.queued, attempt=over)

    assert run_job(settings, job_id, over, worker="test:1") == Outcome.failed

    job = job_row(sessions, job_id)
    assert (job.state, job.attempt, job.started_at) == ("failed", over, None)
    assert job.error == f"attempt {over} is past the limit of {settings.max_attempts} attempts; not started"
    # A second delivery of the same message finds the job settled and does nothing.
    assert run_job(settings, job_id, over, worker="test:1") == Outcome.rejected


def test_a_users_retry_starts_a_new_series_of_attempts(settings, sessions, make_job, redis_client, celery_app):
    """After the cap failed a job, a manual retry still gets max_attempts automatic attempts."""
    from api.services.jobs import retry_job
    from loraq import jobs

    job_id = make_job(JobState.running, attempt=settings.max_attempts)
    reap_expired(sessions, settings, celery_app, redis=redis_client)
    assert job_row(sessions, job_id).state == "failed"

    with sessions() as session:
        retried = retry_job(session, settings, redis_client, celery_app, session.get(Job, job_id))
    assert (retried.state, retried.attempt, retried.attempt_base) == ("queued", 4, 3)

    with sessions.begin() as session:  # attempt 4 is claimed, then its worker is lost too
        jobs.transition(session, job_id, JobState.queued, JobState.running, attempt=4,
                        lease_until=utcnow() - timedelta(seconds=5))
    assert reap_expired(sessions, settings, celery_app, redis=redis_client) == [(job_id, 5)]
    assert job_row(sessions, job_id).state == "queued"
