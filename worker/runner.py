"""Run one attempt of a job: claim it, train in a child process, record what it reports, settle it.

A plain function (no Celery): the task is a thin wrapper, and tests call it directly.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from loraq import events, jobs
from loraq.db import make_engine, make_session_factory
from loraq.errors import AppError
from loraq.models import Dataset, Job, JobState
from loraq.queue import MAX_ATTEMPT_S
from loraq.settings import Settings
from trainer.checkpoints import remove_incomplete
from worker.child import TrainingProcess, free_bytes
from worker.job_config import build_train_config
from worker.recorder import OWNED_STATES, LostOwnership, Recorder

log = logging.getLogger("loraq.worker")

POLL_S = 0.2  # longest wait on the pipe before looking at the lease and for a cancel
STATE_CHECK_S = 0.4  # the job row is read at least this often, so a cancel acts within a second


class Outcome(str, enum.Enum):
    rejected = "rejected"  # another delivery owns this attempt, or the job is no longer queued
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    lost = "lost"  # the attempt lost its lease mid-run; a newer attempt owns the job


def cancel_key(job_id: str) -> str:
    """Redis key the API may set to make a cancel act sooner (the job row stays the truth)."""
    return f"loraq:jobs:{job_id}:cancel"


@dataclass
class Resources:
    """Database and Redis connections, opened once per worker process."""

    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis_lib.Redis
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def open(cls, settings: Settings) -> Resources:
        engine = make_engine(settings)
        return cls(engine, make_session_factory(engine), redis_lib.Redis.from_url(settings.redis_url))

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(settings: Settings, job_id: str, attempt: int, *, worker: str | None = None,
            resources: Resources | None = None) -> Outcome:
    """Run attempt `attempt` of job `job_id` to its end, unless another delivery already has it."""
    owned = resources is None
    resources = resources or Resources.open(settings)
    try:
        return _run(settings, resources, job_id, attempt, worker or default_worker_name())
    finally:
        if owned:
            resources.close()


def _run(settings: Settings, resources: Resources, job_id: str, attempt: int, worker: str) -> Outcome:
    with resources.sessions() as session:
        attempt_base = session.scalar(select(Job.attempt_base).where(Job.id == job_id)) or 0
    if attempt - attempt_base > settings.max_attempts:
        return _refuse_over_cap(settings, resources, job_id, attempt)
    with resources.sessions.begin() as session:
        claimed = jobs.claim(session, job_id, attempt, worker, settings.lease_s)
    if claimed is None:
        log.info("job.claim_rejected job=%s attempt=%s worker=%s", job_id, attempt, worker)
        return Outcome.rejected
    events.publish(resources.redis, [claimed])
    log.info("job.claimed job=%s attempt=%s worker=%s", job_id, attempt, worker)

    recorder = Recorder(settings, resources.sessions, resources.redis, job_id, attempt)
    try:
        with resources.sessions() as session:
            job = session.get(Job, job_id)
            config = build_train_config(settings, job, session.get(Dataset, job.dataset_id), attempt)
        if config.resume_from_checkpoint:
            recorder.resumed_from = Path(config.resume_from_checkpoint)
    except (ValueError, AppError) as error:  # ConfigError is a ValueError; both name the problem
        try:
            return _settle(recorder, Outcome.failed, recorder.fail, str(error))
        except LostOwnership:
            return Outcome.lost
    try:
        recorder.attempt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a full disk, a read-only or missing data directory: fail, never hang
        free = free_bytes(recorder.attempt_dir.parent.parent)
        message = (f"cannot create the job's folder {recorder.attempt_dir}: {error.strerror or error}"
                   + (f" ({free} bytes free)" if free is not None else ""))
        try:
            return _settle(recorder, Outcome.failed, recorder.fail, message)
        except LostOwnership:
            return Outcome.lost
    return Supervisor(settings, resources, recorder, TrainingProcess(config, recorder.log_path)).run()


def _refuse_over_cap(settings: Settings, resources: Resources, job_id: str, attempt: int) -> Outcome:
    """A message for an attempt past `max_attempts` never trains; a job still queued for it fails."""
    message = f"attempt {attempt} is past the limit of {settings.max_attempts} attempts; not started"
    with resources.sessions.begin() as session:
        failed = jobs.transition(session, job_id, JobState.queued, JobState.failed, attempt=attempt, error=message,
                                 event_data={"attempt": attempt})
    if failed is None:
        log.info("job.claim_rejected job=%s attempt=%s: past the attempt limit", job_id, attempt)
        return Outcome.rejected
    events.publish(resources.redis, [failed])
    log.warning("job.failed job=%s attempt=%s: %s", job_id, attempt, message)
    return Outcome.failed


class Supervisor:
    """Watches one training child: records its events, renews the lease, acts on a cancel."""

    def __init__(self, settings: Settings, resources: Resources, recorder: Recorder, process: TrainingProcess):
        self.settings = settings
        self.resources = resources
        self.recorder = recorder
        self.process = process
        self.job_id, self.attempt = recorder.job_id, recorder.attempt
        self._next_heartbeat = time.monotonic() + settings.heartbeat_s
        self._next_state_check = 0.0
        # The Celery time limits need the prefork pool; with solo the supervisor enforces it.
        self._deadline = time.monotonic() + MAX_ATTEMPT_S
        self._redis_failed = False

    def run(self) -> Outcome:
        try:
            pid = self.process.start()
            log.info("job.started job=%s attempt=%s pid=%s", self.job_id, self.attempt, pid,
                     extra={"job_id": self.job_id, "child_pid": pid})
            return self._watch()
        except LostOwnership:
            log.warning("job.lost job=%s attempt=%s: another attempt owns the job now; stopped training",
                        self.job_id, self.attempt)
            return Outcome.lost
        except Exception as error:  # a worker-side fault (database gone, a bug): fail, never hang
            log.exception("job.worker_error job=%s attempt=%s", self.job_id, self.attempt)
            self.process.stop()
            self._remove_incomplete()
            return self._fail_safely(f"worker error: {type(error).__name__}: {error}")
        finally:
            # Also on a worker shutdown (BaseException): the child never outlives its supervisor,
            # and the job is left to its lease, so the reaper can resume it as a new attempt.
            self.process.close()
            self._remove_incomplete()

    def _watch(self) -> Outcome:
        while not self.process.finished:
            batch = self.process.poll(POLL_S)
            if batch:
                self.recorder.record(batch)
            if self._cancel_requested():
                self.process.stop()
                self._remove_incomplete()
                self._forget_cancel_key()
                return _settle(self.recorder, Outcome.canceled, self.recorder.cancel)
            if time.monotonic() > self._deadline:
                self.process.stop()
                self._remove_incomplete()
                message = f"the attempt ran past its time limit of {MAX_ATTEMPT_S / 3600:g} h"
                return _settle(self.recorder, Outcome.failed, self.recorder.fail, message)
        self._remove_incomplete()
        return self._settle_exit()

    def _remove_incomplete(self) -> None:
        """Once the child is gone: delete what it left half-written (a checkpoint folder it was
        writing when stopped or out of disk, `.partial` files), so nothing resumes from it and the
        space comes back. Complete checkpoints stay for a retry to resume from."""
        if self.process.exitcode is None:
            return
        try:
            removed = remove_incomplete(self.recorder.attempt_dir)
        except OSError:
            log.exception("job.cleanup_failed job=%s attempt=%s", self.job_id, self.attempt)
            return
        if removed:
            log.info("job.incomplete_removed job=%s attempt=%s paths=%s", self.job_id, self.attempt,
                     ",".join(str(path.relative_to(self.recorder.attempt_dir)) for path in removed))

    def _settle_exit(self) -> Outcome:
        """The child has ended: succeeded if it said `done` and exited 0, else failed with its reason."""
        if self.process.exitcode == 0 and self.recorder.done:
            if self.recorder.succeed():
                log.info("job.succeeded job=%s attempt=%s step=%s", self.job_id, self.attempt,
                         self.recorder.done.get("step"))
                return Outcome.succeeded
            message = "the trainer reported success, but its LoRA file is missing"
        else:
            message = self.recorder.error or self.process.failure_reason()
        return _settle(self.recorder, Outcome.failed, self.recorder.fail, message)

    def _cancel_requested(self) -> bool:
        """Renew the lease when due and read the job's state; raises LostOwnership."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_s
            with self.resources.sessions.begin() as session:
                if not jobs.renew_lease(session, self.job_id, self.attempt, self.settings.lease_s):
                    raise LostOwnership
        if now < self._next_state_check and not self._cancel_key_set():
            return False
        self._next_state_check = now + STATE_CHECK_S
        with self.resources.sessions() as session:
            row = session.execute(select(Job.state, Job.attempt).where(Job.id == self.job_id)).first()
        if row is None or row.attempt != self.attempt or row.state not in [s.value for s in OWNED_STATES]:
            raise LostOwnership
        return row.state == JobState.canceling.value

    def _cancel_key_set(self) -> bool:
        """The API's cancel flag only prompts an early read of the job row, which decides."""
        try:
            return bool(self.resources.redis.exists(cancel_key(self.job_id)))
        except redis_lib.RedisError as error:
            if not self._redis_failed:  # say it once; the database check goes on regardless
                log.warning("job.cancel_flag_unreadable job=%s: %s", self.job_id, error)
                self._redis_failed = True
            return False

    def _forget_cancel_key(self) -> None:
        try:
            self.resources.redis.delete(cancel_key(self.job_id))
        except redis_lib.RedisError:
            pass

    def _fail_safely(self, message: str) -> Outcome:
        try:
            return _settle(self.recorder, Outcome.failed, self.recorder.fail, message)
        except Exception:  # noqa: BLE001 - the database may be what failed; the lease will expire
            log.exception("job.settle_failed job=%s attempt=%s", self.job_id, self.attempt)
            return Outcome.failed


def _settle(recorder: Recorder, outcome: Outcome, write, *args) -> Outcome:
    """Write a final state and log it under its stable name; LostOwnership passes through."""
    write(*args)
    if outcome == Outcome.failed:
        log.warning("job.failed job=%s attempt=%s: %s", recorder.job_id, recorder.attempt, args[0])
    else:
        log.info("job.%s job=%s attempt=%s", outcome.value, recorder.job_id, recorder.attempt)
    return outcome
