"""Run one attempt of a job: claim it, train in a child process, record what it reports, settle it.

A plain function (no Celery): the task is a thin wrapper, and tests call it directly.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from loraq import events, jobs
from loraq.db import make_engine, make_session_factory
from loraq.errors import AppError, unavailable_store
from loraq.job_actions import ACTIONS, action_key
from loraq.limits import WallClock
from loraq.models import Dataset, Job, JobState
from loraq.queue import MAX_ATTEMPT_S, announce, make_celery
from loraq.settings import Settings
from trainer import control
from trainer.checkpoints import remove_incomplete
from worker.child import TrainingProcess, free_bytes
from worker.job_config import build_train_config
from worker.recorder import HANDED_BACK, OWNED_STATES, LostOwnership, Recorder
from worker.shutdown import Shutdown

log = logging.getLogger("loraq.worker")

POLL_S = 0.2  # longest wait on the pipe before looking at the lease and for a cancel
STATE_CHECK_S = 0.4  # the job row is read at least this often, so a cancel acts within a second
# Trainer events held while the database is away (about a minute of tiny-model steps; an hour of
# real ones); past it the child waits on its pipe until they are written.
BUFFER_MAX_EVENTS = 5000
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 4.0  # between tries of a store that does not answer
# Of the shutdown grace, what is kept for recording the checkpoint and queueing the job: a child
# that has not stopped by then is killed and the job left to its lease.
HANDBACK_RESERVE_S = 3.0


class Outcome(str, enum.Enum):
    rejected = "rejected"  # another delivery owns this attempt, or the job is no longer queued
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    lost = "lost"  # the attempt lost its lease mid-run; a newer attempt owns the job
    handed_back = "handed_back"  # the worker is shutting down: queued again as the next attempt
    abandoned = "abandoned"  # stopped with nothing recorded (grace or lease ran out); the lease covers it


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
    _celery: object = None

    @classmethod
    def open(cls, settings: Settings) -> Resources:
        engine = make_engine(settings)
        return cls(engine, make_session_factory(engine), redis_lib.Redis.from_url(settings.redis_url))

    def celery(self, settings: Settings):
        """A Celery app to send job messages with (made on first use)."""
        if self._celery is None:
            self._celery = make_celery(settings)
        return self._celery

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()
        if self._celery is not None:
            self._celery.close()


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(settings: Settings, job_id: str, attempt: int, *, worker: str | None = None,
            resources: Resources | None = None, shutdown: Shutdown | None = None) -> Outcome:
    """Run attempt `attempt` of job `job_id` to its end, unless another delivery already has it.

    `shutdown`: the worker's; once requested, the job is handed back (see worker/shutdown.py).
    """
    owned = resources is None
    resources = resources or Resources.open(settings)
    try:
        return _run(settings, resources, job_id, attempt, worker or default_worker_name(), shutdown)
    finally:
        if owned:
            resources.close()


def _run(settings: Settings, resources: Resources, job_id: str, attempt: int, worker: str,
         shutdown: Shutdown | None = None) -> Outcome:
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
    recorder.last_seq = claimed.seq
    try:
        with resources.sessions() as session:
            job = session.get(Job, job_id)
            config = build_train_config(settings, job, session.get(Dataset, job.dataset_id), attempt)
            num_processes = job.num_gpus or 1
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
    return Supervisor(settings, resources, recorder, TrainingProcess(config, recorder.log_path, num_processes),
                      shutdown).run()


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


class StoreOutage:
    """The database (or Redis) not answering: when it began, and when to try again (backoff)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.since: float | None = None  # time.monotonic() of the first failure
        self._delay = 0.0
        self._next_try = 0.0

    def ready(self, now: float) -> bool:
        return now >= self._next_try

    def failed(self, error: BaseException, store: str, now: float) -> None:
        if self.since is None:
            self.since = now
            self._delay = BACKOFF_MIN_S
            log.warning("job.store_unavailable job=%s store=%s: %s; training goes on, events are held",
                        self.job_id, store, error)
        else:
            self._delay = min(self._delay * 2, BACKOFF_MAX_S)
        self._next_try = now + self._delay

    def recovered(self, now: float, written: int) -> None:
        if self.since is not None:
            log.warning("job.store_back job=%s after %.1f s; %d held events written", self.job_id,
                        now - self.since, written)
        self.since = None
        self._next_try = 0.0


class Supervisor:
    """Watches one training child: records its events, renews the lease, acts on a cancel, hands
    the job back when the worker shuts down, and rides out a database outage shorter than the
    lease (the child never needs the database; its events wait in a bounded buffer)."""

    def __init__(self, settings: Settings, resources: Resources, recorder: Recorder, process: TrainingProcess,
                 shutdown: Shutdown | None = None):
        self.settings = settings
        self.resources = resources
        self.recorder = recorder
        self.process = process
        self.shutdown = shutdown
        self.job_id, self.attempt = recorder.job_id, recorder.attempt
        self._next_heartbeat = time.monotonic() + settings.heartbeat_s
        self._renewed_at = time.monotonic()  # the claim set the lease
        self._next_state_check = 0.0
        self._next_action_check = 0.0
        # The Celery time limits need the prefork pool; with solo the supervisor enforces it.
        self._deadline = time.monotonic() + MAX_ATTEMPT_S
        self._redis_failed = False
        self._pending: list[dict] = []  # trainer events read but not yet written, oldest first
        self._uncertain = 0  # how many of _pending the last, unanswered write held (see _flush)
        self._canceling = False
        self._stop_asked = False
        self._stepped = False  # a step event has been read: the training is past its setup
        self.outage = StoreOutage(self.job_id)
        self.wall_clock = WallClock(settings.max_job_seconds)  # LORAQ_MAX_JOB_SECONDS (loraq/limits.py)
        recorder.keep_alive = self._keep_alive  # while it waits for its pushes before settling

    def run(self) -> Outcome:
        try:
            pid = self.process.start()
            if self.shutdown is not None:
                self.shutdown.watch_child(pid)
            log.info("job.started job=%s attempt=%s pid=%s", self.job_id, self.attempt, pid,
                     extra={"job_id": self.job_id, "child_pid": pid})
            return self._watch()
        except LostOwnership:
            log.warning("job.lost job=%s attempt=%s: another attempt owns the job now; stopped training",
                        self.job_id, self.attempt)
            return Outcome.lost
        except Exception as error:  # a worker-side fault (a bug, an outage past the lease): fail, never hang
            log.exception("job.worker_error job=%s attempt=%s", self.job_id, self.attempt)
            self.process.stop()
            self._remove_incomplete()
            return self._fail_safely(f"worker error: {type(error).__name__}: {error}")
        finally:
            # Also on a worker shutdown (BaseException): the child never outlives its supervisor,
            # and the job is left to its lease, so the reaper can resume it as a new attempt.
            self.process.close()
            self._remove_incomplete()
            if self.shutdown is not None:
                self.shutdown.watch_child(None)

    def _watch(self) -> Outcome:
        while not self.process.finished:
            self._read_events()
            self._sync()
            self._forward_actions()
            if self._canceling:
                self.process.stop()
                self._remove_incomplete()
                self._forget_cancel_key()
                return self._with_store(lambda: _settle(self.recorder, Outcome.canceled, self._cancel))
            if self._lease_ran_out():
                return self._abandon("its lease ran out while the database was away",
                                     f"after {self.settings.lease_s:g} s without the database")
            if self.wall_clock.expired():
                # Out of time: a checkpoint at the next step, then the job fails (_settle_exit);
                # a child that has not stopped within the grace is stopped, its checkpoints kept.
                if self.wall_clock.ask():
                    self.process.request_stop()
                    log.warning("job.time_limit job=%s attempt=%s: past %g s; asked the training for a checkpoint",
                                self.job_id, self.attempt, self.wall_clock.limit_s)
                if self.wall_clock.overdue():
                    self.process.stop()
                    # What it wrote before it stopped (a checkpoint saved a moment ago) is recorded
                    # with the failure, so the checkpoint a retry resumes from is listed.
                    self._pending.extend(self.process.poll(0))
                    self._remove_incomplete()
                    return self._with_store(lambda: _settle(self.recorder, Outcome.failed, self._fail,
                                                            self.wall_clock.message()))
            if self.shutdown is not None and self.shutdown.requested.is_set():
                if not self._stepped:
                    # Still loading or preparing: no step to keep, so no checkpoint to wait for
                    # (a model load can outlast the grace). Stop it and hand the job back now.
                    self.process.stop()
                    self._remove_incomplete()
                    return self._with_store(self._hand_back)
                self._ask_to_stop()
                if self.shutdown.left_s() <= HANDBACK_RESERVE_S:
                    return self._abandon("the shutdown grace ran out before its checkpoint", "left to its lease")
            if time.monotonic() > self._deadline:
                self.process.stop()
                self._remove_incomplete()
                message = f"the attempt ran past its time limit of {MAX_ATTEMPT_S / 3600:g} h"
                return self._with_store(lambda: _settle(self.recorder, Outcome.failed, self._fail, message))
        self._remove_incomplete()
        return self._with_store(self._settle_exit)

    # -- events and the database ---------------------------------------------------------------

    def _read_events(self) -> None:
        """Take what the child wrote. With the buffer full the pipe is left unread, so the child
        waits on its next write: training pauses rather than an event being dropped."""
        if len(self._pending) >= BUFFER_MAX_EVENTS:
            time.sleep(POLL_S)
            return
        batch = self.process.poll(POLL_S)
        self._stepped = self._stepped or any(event.get("type") == "step" for event in batch)
        self._pending.extend(batch)

    def _sync(self) -> None:
        """Renew the lease when due, write the held events, read the job's state; a store that
        does not answer leaves everything held for the next try (with backoff)."""
        now = time.monotonic()
        if not self.outage.ready(now):
            return
        held = len(self._pending)
        try:
            self._store_round(now)
        except LostOwnership:
            raise
        except Exception as error:
            store = unavailable_store(error)
            if store is None:
                raise
            self.outage.failed(error, store, now)
            return
        self.outage.recovered(now, held)

    def _store_round(self, now: float) -> None:
        if now >= self._next_heartbeat or self.outage.since is not None:
            with self.resources.sessions.begin() as session:
                if not jobs.renew_lease(session, self.job_id, self.attempt, self.settings.lease_s):
                    raise LostOwnership
            self._renewed_at = now
            self._next_heartbeat = now + self.settings.heartbeat_s
        self._flush()
        if now >= self._next_state_check or self._cancel_key_set():
            self._next_state_check = now + STATE_CHECK_S
            with self.resources.sessions() as session:
                row = session.execute(select(Job.state, Job.attempt).where(Job.id == self.job_id)).first()
            if row is None or row.attempt != self.attempt or row.state not in [s.value for s in OWNED_STATES]:
                raise LostOwnership
            self._canceling = row.state == JobState.canceling.value
        self.recorder.publish_pending()

    def _flush(self) -> None:
        """Write the held events, in order, in one transaction."""
        if self._uncertain:  # the last write got no answer: its commit may have gone through
            if self.recorder.written():
                log.info("job.batch_was_written job=%s attempt=%s: %d events not written again", self.job_id,
                         self.attempt, self._uncertain)
                del self._pending[:self._uncertain]
            self._uncertain = 0
        if not self._pending:
            return
        self._uncertain = len(self._pending)  # until the commit is known to have happened
        self.recorder.record(self._pending)
        self._pending = []
        self._uncertain = 0

    def _with_store(self, write):
        """Flush the held events, then `write()` (a settle or a hand-back), waiting out an outage
        (with backoff) while the lease lasts; past it the attempt is abandoned to the reaper."""
        while True:
            now = time.monotonic()
            if self.outage.ready(now):
                try:
                    held = len(self._pending)
                    if self.outage.since is not None:
                        self._store_round(now)
                    self._flush()
                    outcome = write()
                    self.outage.recovered(now, held)
                    return outcome
                except LostOwnership:
                    raise
                except Exception as error:
                    store = unavailable_store(error)
                    if store is None:
                        raise
                    self.outage.failed(error, store, now)
            if self._lease_ran_out():
                return self._abandon("its lease ran out while the database was away", "with its outcome unrecorded")
            if self.shutdown is not None and self.shutdown.left_s() <= 0:
                return self._abandon("the shutdown grace ran out", "left to its lease")
            time.sleep(POLL_S)

    def _keep_alive(self) -> bool:
        """Renew the lease when due while the recorder waits for its artifacts' pushes (a large
        file to a slow store can take longer than the lease); False ends the wait when the
        shutdown grace is nearly spent. A database that does not answer is left to the settle
        that follows (its fence, and _with_store's wait)."""
        if self.shutdown is not None and self.shutdown.left_s() <= HANDBACK_RESERVE_S:
            return False
        now = time.monotonic()
        if now < self._next_heartbeat:
            return True
        self._next_heartbeat = now + self.settings.heartbeat_s
        try:
            with self.resources.sessions.begin() as session:
                if not jobs.renew_lease(session, self.job_id, self.attempt, self.settings.lease_s):
                    raise LostOwnership
        except LostOwnership:
            raise
        except Exception as error:
            if unavailable_store(error) is None:
                raise
            log.warning("job.lease_not_renewed job=%s attempt=%s while pushing artifacts: %s", self.job_id,
                        self.attempt, error)
            return True
        self._renewed_at = now
        return True

    def _lease_ran_out(self) -> bool:
        return self.outage.since is not None and time.monotonic() - self._renewed_at > self.settings.lease_s

    def _abandon(self, why: str, what: str) -> Outcome:
        """Stop the child now and leave the job to its lease (the reaper's rules apply)."""
        self.process.kill()
        self._remove_incomplete()
        self._forget_unrecorded_checkpoints()
        log.warning("job.abandoned job=%s attempt=%s: %s; %s", self.job_id, self.attempt, why, what)
        return Outcome.abandoned

    def _forget_unrecorded_checkpoints(self) -> None:
        """A checkpoint whose events never reached the database would let the next attempt resume
        past the last recorded step, leaving a gap in the job's metrics: remove it, so the next
        attempt resumes from the newest recorded one and trains those steps again."""
        self._pending.extend(self.process.poll(0))  # the child is gone: what it wrote last
        attempt_dir = self.recorder.attempt_dir.resolve()
        checkpoints = [path for event in self._pending if event.get("type") == "checkpoint"
                       for path in event.get("paths") or []]
        for path in checkpoints:
            folder = Path(path).resolve()
            if attempt_dir in folder.parents:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("job.unrecorded_checkpoint_removed job=%s attempt=%s path=%s", self.job_id,
                         self.attempt, folder.name)

    # -- shutdown --------------------------------------------------------------------------------

    def _ask_to_stop(self) -> None:
        if not self._stop_asked:
            self._stop_asked = True
            self.process.request_stop()
            log.warning("job.handing_back job=%s attempt=%s: asked the training for a checkpoint at its next step",
                        self.job_id, self.attempt)

    def _hand_back(self) -> Outcome:
        """The child checkpointed and stopped (or never got to a step): queue the job again as the
        next attempt, at once."""
        new_attempt = self.recorder.hand_back()
        if new_attempt is None:
            log.info("job.canceled job=%s attempt=%s (canceled while handing back)", self.job_id, self.attempt)
            return Outcome.canceled
        log.warning("job.handed_back job=%s attempt=%s step=%s: queued again as attempt %s (%s)", self.job_id,
                    self.attempt, (self.recorder.stopped or {}).get("step"), new_attempt, HANDED_BACK)
        # A failed send leaves the job to the reaper's sweep (loraq/reaper.py, sweep_unannounced).
        announce(self.resources.celery(self.settings), self.resources.sessions, self.settings, self.job_id,
                 new_attempt)
        return Outcome.handed_back

    # -- the end -----------------------------------------------------------------------------------

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
        """The child has ended: succeeded if it said `done` and exited 0, handed back if it
        stopped on request, else failed with its reason."""
        if self.process.exitcode == 0 and self.recorder.done:
            message = self.recorder.succeed()
            if message is None:
                log.info("job.succeeded job=%s attempt=%s step=%s", self.job_id, self.attempt,
                         self.recorder.done.get("step"))
                return Outcome.succeeded
        elif self.process.exitcode == 0 and self.recorder.stopped and self.wall_clock.asked:
            message = self.wall_clock.message(self.recorder.stopped.get("step"))
        elif self.process.exitcode == 0 and self.recorder.stopped:
            return self._hand_back()
        else:
            message = self.recorder.error or self.process.failure_reason()
        return _settle(self.recorder, Outcome.failed, self._fail, message)

    def _fail(self, message: str) -> None:
        self.recorder.fail(message)

    def _cancel(self) -> None:
        self.recorder.cancel()

    def _cancel_key_set(self) -> bool:
        """The API's cancel flag only prompts an early read of the job row, which decides."""
        try:
            return bool(self.resources.redis.exists(cancel_key(self.job_id)))
        except redis_lib.RedisError as error:
            if not self._redis_failed:  # say it once; the database check goes on regardless
                log.warning("job.cancel_flag_unreadable job=%s: %s", self.job_id, error)
                self._redis_failed = True
            return False

    def _forward_actions(self) -> None:
        """Hand save-now / sample-now requests (POST /v1/jobs/{id}/checkpoint, /sample) to the
        training process as request files in the attempt's folder; it serves them at its next
        step boundary (trainer/control.py) with the usual checkpoint / validation events."""
        now = time.monotonic()
        if now < self._next_action_check:
            return
        self._next_action_check = now + STATE_CHECK_S
        try:
            with self.resources.redis.pipeline() as pipe:  # MULTI: read and clear in one go
                pipe.lrange(action_key(self.job_id), 0, -1)
                pipe.delete(action_key(self.job_id))
                actions = pipe.execute()[0]
        except redis_lib.RedisError:
            return  # Redis is away: the request waits in the list (or expires); nothing else depends on it
        for action in {a.decode() if isinstance(a, bytes) else str(a) for a in actions}:
            if action in ACTIONS:
                control.request(self.recorder.attempt_dir, action)
                log.info("job.action job=%s attempt=%s action=%s", self.job_id, self.attempt, action)

    def _forget_cancel_key(self) -> None:
        try:
            self.resources.redis.delete(cancel_key(self.job_id))
        except redis_lib.RedisError:
            pass

    def _fail_safely(self, message: str) -> Outcome:
        try:
            return _settle(self.recorder, Outcome.failed, self._fail, message)
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
