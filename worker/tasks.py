"""The Celery task: a wake-up carrying (job id, attempt); the work is `worker.runner.run_job`."""

from __future__ import annotations

import logging
import os

from celery import Celery, Task
from celery.exceptions import Reject

from sqlalchemy import update

from loraq import jobs
from loraq.models import Job, JobState
from loraq.queue import RUN_JOB_TASK
from loraq.settings import Settings
from worker import runner, shutdown, tensorboard
from worker.gpu_class import capabilities

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

    offers = capabilities(settings)

    @app.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self: Task, job_id: str, attempt: int) -> str:
        """A wake-up: take the queued jobs this worker fits, best first (priority, then age),
        until none is left. The message's (job_id, attempt) is only a hint: another worker may
        have taken that job, and a better one may be waiting (README "Fleets, routing and
        priorities")."""
        stopping = shutdown.current()
        if stopping is not None and stopping.requested.is_set():
            # Shutting down: the message goes back to the queue for another worker, unclaimed.
            raise Reject("worker shutting down", requeue=True)
        worker = f"{self.request.hostname}:{os.getpid()}"
        outcome = "idle"
        tried = 0
        try:
            for tried in range(MAX_JOBS_PER_WAKEUP):
                if stopping is not None and stopping.requested.is_set():
                    break
                with resources.get().sessions() as session:
                    picked = jobs.next_queued(session, offers.gpu_class, offers.gpus, offers.memory_gb)
                if picked is None:
                    if tried == 0:  # under the name a lost claim race has (runner.py)
                        log.info("job.claim_rejected job=%s attempt=%s worker=%s: no queued job this worker fits",
                                 job_id, attempt, worker)
                    break
                try:
                    outcome = runner.run_job(settings, *picked, worker=worker, resources=resources.get(),
                                             shutdown=stopping).value
                finally:
                    _record_tensorboard(resources, *picked)
        finally:
            _release_hint(resources, job_id, attempt)
        return outcome

    return run_job


# A wake-up takes jobs while it finds some it fits; a bound against a loop that would never end.
MAX_JOBS_PER_WAKEUP = 1000


def _release_hint(resources: _PerProcess, job_id: str, attempt: int) -> None:
    """The job this message was sent for still queued after the wake-up (it did not fit this
    worker, or the worker stopped): its wake-up is spent, so mark it unannounced and the reaper's
    sweep sends it another (loraq/reaper.py)."""
    try:
        with resources.get().sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt,
                                              Job.state == JobState.queued.value).values(announced_at=None))
    except Exception as error:  # noqa: BLE001 - the sweep's reannounce_s covers it anyway
        log.warning("job.release_hint_failed job=%s attempt=%s: %s", job_id, attempt, error)


def _record_tensorboard(resources: _PerProcess, job_id: str, attempt: int) -> None:
    """The attempt's TensorBoard files become the job's artifacts once it has ended."""
    try:
        tensorboard.record_artifacts(resources.settings, resources.get().sessions, job_id, attempt)
    except Exception as error:  # noqa: BLE001 - the files stay in the job's folder; only the listing misses them
        log.warning("tensorboard.record_failed job=%s attempt=%s: %s", job_id, attempt, error)
