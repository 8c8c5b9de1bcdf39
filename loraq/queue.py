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


def enqueue_job(app: Celery, job_id: str, attempt: int) -> None:
    """Wake a worker for this attempt (call only after the job row is committed)."""
    app.send_task(RUN_JOB_TASK, args=[job_id, attempt])
