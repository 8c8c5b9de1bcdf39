"""The lease reaper: jobs whose worker stopped renewing their lease go back to the queue.

A running attempt renews `lease_until` every `heartbeat_s` (worker/runner.py). When a worker
dies (SIGKILL, OOM killer, power loss) its lease runs out; `reap_expired` then moves the job
`running -> queued` as the next attempt, which resumes from the newest complete checkpoint, or
to `failed` once the job has used `max_attempts` attempts. A `canceling` job whose worker is
gone becomes `canceled`. Every change is one conditional UPDATE (`loraq.jobs.transition`)
fenced on the state and attempt read, so reapers in several workers may race: one wins, the
others change nothing. The Celery message for the new attempt is sent after the commit.

The same thread sweeps the queue for jobs without a wake-up (`sweep_unannounced`): a job
submitted while Redis was down is committed but its message never sent; it gets one later.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from loraq import events
from loraq.jobs import transition
from loraq.models import Job, JobState, utcnow
from loraq.queue import announce, enqueue_job, job_queue, mark_announced
from loraq.settings import Settings

log = logging.getLogger("loraq.reaper")

LEASED_STATES = (JobState.running, JobState.canceling)


def give_up_message(attempts: int) -> str:
    return f"worker lost {attempts} times (lease expired); giving up after {attempts} attempts"


def reap_expired(session_factory: sessionmaker[Session], settings: Settings, celery_app: Celery | None,
                 now: datetime | None = None, redis=None) -> list[tuple[str, int | None]]:
    """Settle or requeue every running/canceling job whose lease ended before `now`.

    Returns (job id, new attempt) per job this call changed; the attempt is None when the job was
    failed or canceled instead of requeued. A job another reaper (or its own worker) changed first
    is left out. The state events go to `redis` (default: a client on settings.redis_url) after
    each commit.
    """
    now = now or utcnow()
    if redis is None:
        import redis as redis_lib

        client = redis_lib.Redis.from_url(settings.redis_url)
        try:
            return reap_expired(session_factory, settings, celery_app, now, redis=client)
        finally:
            client.close()
    with session_factory() as session:
        expired = session.execute(
            select(Job.id, Job.state, Job.attempt, Job.attempt_base)
            .where(Job.state.in_([s.value for s in LEASED_STATES]), Job.lease_until.is_not(None),
                   Job.lease_until < now)
            .order_by(Job.lease_until)
        ).all()
    reaped: list[tuple[str, int | None]] = []
    for job_id, state, attempt, attempt_base in expired:
        try:
            result = _reap_one(session_factory, settings, celery_app, redis, job_id, JobState(state), attempt,
                               attempt - attempt_base, now)
        except Exception:  # noqa: BLE001 - one bad row must not stop the others; next round retries
            log.exception("job.reap_failed job=%s attempt=%s", job_id, attempt)
            continue
        if result is not None:
            reaped.append(result)
    return reaped


def _reap_one(session_factory, settings: Settings, celery_app, redis, job_id: str, state: JobState,
              attempt: int, attempts_in_series: int, now: datetime) -> tuple[str, int | None] | None:
    # Each job in its own short write transaction whose first statement is the UPDATE (SQLite:
    # no read-to-write upgrade that could fail under a concurrent writer).
    lease_expired = Job.lease_until < now  # still expired: a renewal in between wins
    with session_factory.begin() as session:
        if state == JobState.canceling:
            new_attempt = None
            event = transition(session, job_id, JobState.canceling, JobState.canceled, attempt=attempt,
                               event_data={"reason": "lease expired", "attempt": attempt},
                               where=lease_expired)
        elif attempts_in_series >= settings.max_attempts:
            new_attempt = None
            event = transition(session, job_id, JobState.running, JobState.failed, attempt=attempt,
                               error=give_up_message(attempts_in_series),
                               event_data={"reason": "lease expired", "attempt": attempt},
                               where=lease_expired)
        else:
            new_attempt = attempt + 1
            event = transition(session, job_id, JobState.running, JobState.queued, attempt=attempt,
                               new_attempt=new_attempt, worker=None, lease_until=None,
                               event_data={"reason": "lease expired", "attempt": new_attempt},
                               where=lease_expired)
    if event is None:  # someone else moved the job first (another reaper, its worker, a cancel)
        return None
    events.publish(redis, [event])
    if new_attempt is not None:
        log.warning("job.requeued job=%s attempt=%s: lease of attempt %s expired", job_id, new_attempt, attempt)
        if celery_app is not None:  # a failed send leaves it to sweep_unannounced
            announce(celery_app, session_factory, settings, job_id, new_attempt)
    elif state == JobState.canceling:
        log.warning("job.canceled job=%s attempt=%s: its worker is gone (lease expired)", job_id, attempt)
    else:
        log.warning("job.lease_failed job=%s attempt=%s: %s", job_id, attempt, give_up_message(attempt))
    return job_id, new_attempt


SWEEP_BATCH = 200  # wake-ups one sweep round sends at most (the oldest jobs first)


def sweep_unannounced(session_factory: sessionmaker[Session], settings: Settings, celery_app: Celery,
                      now: datetime | None = None) -> list[tuple[str, int]]:
    """Send a wake-up for each job queued longer than announce_sweep_s whose current attempt has
    none on record (its send failed: Redis was down at submit or requeue; or a worker it did not
    fit took it), or whose last one is older than reannounce_s (Redis may have lost it).

    Harmless when repeated or raced by other reapers: a wake-up only makes a worker look at the
    queue, and the claim is a conditional UPDATE on (state, attempt), so a job runs once.
    Returns (job id, attempt) per wake-up sent.
    """
    now = now or utcnow()
    with session_factory() as session:
        due = session.execute(
            select(Job.id, Job.attempt, Job.gpu_class)
            .where(Job.state == JobState.queued.value,
                   Job.queued_at < now - timedelta(seconds=settings.announce_sweep_s),
                   or_(Job.announced_at.is_(None), Job.announced_at < now - timedelta(seconds=settings.reannounce_s)))
            .order_by(Job.queued_at, Job.id).limit(SWEEP_BATCH)
        ).all()
    sent = []
    for job_id, attempt, gpu_class in due:
        try:
            enqueue_job(celery_app, job_id, attempt, job_queue(settings, gpu_class))
        except Exception as error:  # noqa: BLE001 - Redis still away: the next round tries again
            log.warning("job.sweep_enqueue_failed job=%s attempt=%s: %s", job_id, attempt, error)
            break
        with session_factory.begin() as session:
            mark_announced(session, job_id, attempt)
        log.warning("job.announced job=%s attempt=%s: queued without a wake-up; sent one", job_id, attempt)
        sent.append((job_id, attempt))
    return sent


def reap_forever(settings: Settings, stop: threading.Event, interval_s: float | None = None) -> None:
    """Run `reap_expired` every `interval_s` (default max(1, lease_s / 3)) until `stop` is set."""
    import redis as redis_lib

    from loraq.db import make_engine, make_session_factory
    from loraq.queue import make_celery

    interval_s = interval_s or max(1.0, settings.lease_s / 3)
    engine = make_engine(settings)
    sessions = make_session_factory(engine)
    celery_app = make_celery(settings)
    redis = redis_lib.Redis.from_url(settings.redis_url)
    try:
        while not stop.wait(interval_s):
            try:
                reap_expired(sessions, settings, celery_app, redis=redis)
                sweep_unannounced(sessions, settings, celery_app)
            except Exception as error:  # noqa: BLE001 - database briefly away: try again next round
                log.warning("reaper.round_failed: %s", error)
    finally:
        engine.dispose()
        redis.close()


def start_reaper(settings: Settings, interval_s: float | None = None) -> threading.Event:
    """Reap expired leases from a daemon thread; set the returned event to stop."""
    stop = threading.Event()
    threading.Thread(target=reap_forever, args=(settings, stop, interval_s), name="loraq-lease-reaper",
                     daemon=True).start()
    return stop
