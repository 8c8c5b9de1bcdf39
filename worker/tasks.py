"""The Celery task: a wake-up carrying (job id, attempt); the work is `worker.runner.run_job`."""

from __future__ import annotations

import logging
import os

from celery import Celery, Task
from celery.exceptions import Reject

from loraq.queue import RUN_JOB_TASK
from loraq.settings import Settings
from worker import runner, shutdown, tensorboard

log = logging.getLogger("loraq.worker")


class _PerProcess:
    """Connections opened lazily in the process that runs tasks (a pool child), not its parent."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._resources: runner.Resources | None = None

    def get(self) -> runner.Resources:
        if self._resources is None or self._resources.pid != os.getpid():
            self._resources = runner.Resources.open(self.settings)
        return self._resources


def register(app: Celery, settings: Settings) -> Task:
    """Add the run-job task to `app`, bound to `settings`."""
    resources = _PerProcess(settings)

    @app.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self: Task, job_id: str, attempt: int) -> str:
        stopping = shutdown.current()
        if stopping is not None and stopping.requested.is_set():
            # Shutting down: the message goes back to the queue for another worker, unclaimed.
            raise Reject("worker shutting down", requeue=True)
        worker = f"{self.request.hostname}:{os.getpid()}"
        try:
            return runner.run_job(settings, job_id, attempt, worker=worker, resources=resources.get(),
                                  shutdown=stopping).value
        finally:
            _record_tensorboard(resources, job_id, attempt)

    return run_job


def _record_tensorboard(resources: _PerProcess, job_id: str, attempt: int) -> None:
    """The attempt's TensorBoard files become the job's artifacts once it has ended."""
    try:
        tensorboard.record_artifacts(resources.settings, resources.get().sessions, job_id, attempt)
    except Exception as error:  # noqa: BLE001 - the files stay in the job's folder; only the listing misses them
        log.warning("tensorboard.record_failed job=%s attempt=%s: %s", job_id, attempt, error)
