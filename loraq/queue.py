"""The Celery application both sides share: the API sends job ids, the worker runs them.

Settings follow ../shared/RELIABILITY.md: a message is only a wake-up carrying (job id, attempt);
the database claim makes a second delivery harmless, so late acks can requeue on a crash.
"""

from __future__ import annotations

from celery import Celery

from loraq.settings import Settings

RUN_JOB_TASK = "loraq.run_job"
MAX_ATTEMPT_S = 8 * 3600
VISIBILITY_TIMEOUT_S = MAX_ATTEMPT_S + 3600  # longer than any attempt: no redelivery mid-run


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured Redis, tuned for hour-long tasks, one at a time per worker."""
    app = Celery("loraq", broker=settings.redis_url, backend=None)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_time_limit=MAX_ATTEMPT_S + 600,
        task_soft_time_limit=MAX_ATTEMPT_S,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S, "socket_keepalive": True,
                                  "health_check_interval": 25},
        visibility_timeout=VISIBILITY_TIMEOUT_S,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=settings.queue_name,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue_name}},
        worker_hijack_root_logger=False,
    )
    return app


def job_queue(settings: Settings, gpu_class: str | None) -> str:
    """The queue a job's wake-ups go to: `{queue_name}.{class}` when it asks for a GPU class (only
    that class's workers consume it), else `{queue_name}`, which every worker consumes. A job
    asking only for GPUs or memory goes there too; a worker it does not fit leaves it queued and
    hands the wake-up to the reaper's sweep (README "Fleets, routing and priorities")."""
    return f"{settings.queue_name}.{gpu_class}" if gpu_class else settings.queue_name


def worker_queues(settings: Settings, gpu_class: str) -> list[str]:
    """The queues a worker of `gpu_class` consumes: the default one and its class's."""
    return [settings.queue_name, job_queue(settings, gpu_class)]


def enqueue_job(app: Celery, job_id: str, attempt: int, queue: str | None = None) -> None:
    """Wake a worker for this attempt (call only after the job row is committed). `queue`: the
    job's (job_queue); default, the app's default queue."""
    if queue is None:
        app.send_task(RUN_JOB_TASK, args=[job_id, attempt])
    else:
        app.send_task(RUN_JOB_TASK, args=[job_id, attempt], queue=queue)


def mark_announced(session, job_id: str, attempt: int) -> None:
    """Record that this queued attempt's wake-up was sent (the reaper's sweep skips it a while)."""
    from sqlalchemy import update

    from loraq.models import Job, JobState, utcnow

    session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.queued.value)
                    .values(announced_at=utcnow()))


def announce(app: Celery, session_factory, settings: Settings, job_id: str, attempt: int) -> bool:
    """Send the wake-up of a committed, queued attempt to its job's queue and record it; False
    (logged) when it could not be sent: announced_at stays unset and the reaper's sweep sends it."""
    import logging

    from sqlalchemy import select

    from loraq.models import Job

    try:
        with session_factory() as session:
            gpu_class = session.scalar(select(Job.gpu_class).where(Job.id == job_id))
        enqueue_job(app, job_id, attempt, job_queue(settings, gpu_class))
        with session_factory.begin() as session:
            mark_announced(session, job_id, attempt)
    except Exception as error:  # noqa: BLE001 - the row stays queued; the sweep sends it later
        logging.getLogger("loraq.queue").warning("job.enqueue_failed job=%s attempt=%s: %s", job_id, attempt, error)
        return False
    return True
