"""Trainer events into rows: metrics, job progress, numbered job events, artifacts, the outcome.

Every transaction starts with a fence, an UPDATE of the job row that matches only while this
attempt still owns the job: a worker that lost its lease cannot write over a newer attempt.
Events reach Redis only after their transaction commits; those Redis refused are kept (a bounded
list) and sent, in order, once it answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from loraq import events, object_store, storage
from loraq.jobs import transition
from loraq.models import Artifact, ArtifactKind, Job, JobEvent, JobMetric, JobState, utcnow
from loraq.settings import Settings
from trainer.model import LORA_WEIGHTS_NAME
from worker.pusher import Pusher

log = logging.getLogger("loraq.worker")

OWNED_STATES = (JobState.running, JobState.canceling)
METRIC_FIELDS = ("loss", "lr", "grad_norm", "epoch", "images_per_s")
STOPPED = "stopped"  # the child stopped on request after a checkpoint (worker/child.py)
PUBLISH_BACKOFF_S = (0.25, 4.0)  # between tries of a Redis that refused events
HANDED_BACK = "worker shutting down"  # the reason on the state event of a job a worker hands back


class LostOwnership(Exception):
    """This attempt no longer owns the job (lease lost, requeued, settled elsewhere)."""


class Recorder:
    """Writes what one attempt's trainer reports, fenced by the attempt."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], redis, job_id: str, attempt: int):
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.job_id = job_id
        self.attempt = attempt
        self.job_dir = storage.job_dir(settings, job_id)
        self.attempt_dir = storage.attempt_dir(settings, job_id, attempt)
        self.log_path = self.attempt_dir / "train.log"
        self.done: dict | None = None  # the trainer's `done` event, once seen
        self.error: str | None = None  # the message of its last `error` event
        self.stopped: dict | None = None  # its `stopped` event: it checkpointed and ended on request
        self.last_seq = 0  # the highest job event number this recorder has committed
        self._unpublished: list = []  # committed events Redis has not taken yet, oldest first
        self._publish_retry_at = 0.0
        self._publish_delay = 0.0
        # The checkpoint (of any attempt) this attempt resumes from: listed once training starts,
        # since the attempt that wrote it may have died before recording it.
        self.resumed_from: Path | None = None
        # With an object store, artifacts are pushed from a thread of their own (worker/pusher.py),
        # never from the supervisor's loop, which renews the lease; before the attempt settles the
        # recorder waits for them, calling keep_alive (the supervisor's lease renewal; False: stop).
        self.pusher = Pusher(settings)
        self.keep_alive: Callable[[], bool] = lambda: True
        self._final: list | None = None  # the LoRA and log rows of succeed(), described (and queued) once

    def record(self, batch: list[dict]) -> None:
        """Write a batch of trainer events in one transaction; raises LostOwnership.

        A write whose answer never came (the database died mid-commit) may have gone through:
        ask `written()` before writing that batch again, so no job event is repeated.
        """
        # Files are hashed before the transaction opens, so it stays short.
        artifacts = [row for event in batch for row in self._artifacts_of(event) if row]
        # With an object store, earlier attempts' checkpoints may live on other hosts: only this
        # attempt's folder (the only one its trainer prunes) tells which ones are gone.
        store = self.pusher.store
        pruned: list[str] = []
        with self._transaction() as (session, added):
            self._fence(session, **_progress(batch))
            for event in batch:
                self._apply(session, event, added)
            for row in artifacts:
                _upsert_artifact(session, row)
            if any(event.get("type") == "checkpoint" for event in batch):
                pruned = _forget_pruned_checkpoints(session, self.job_id, self.attempt_dir if store else None)
            if any(event.get("type") in ("checkpoint", "validation_loss") for event in batch):
                _mark_best_checkpoint(session, self.job_id)
        for path in pruned if store else []:  # their objects too, once the rows are gone (after their pushes)
            self.pusher.remove(object_store.relative(self.settings, Path(path).parent))

    def succeed(self) -> str | None:
        """Record the LoRA files and the log, then move the job to succeeded; None once it is.

        Returns why not, writing nothing, when the LoRA file the trainer reported is not there,
        or when an artifact could not be pushed to the object store (after its retries): a job
        does not succeed with files the API cannot serve.
        """
        done = self.done or {}
        step = done.get("step")
        if self._final is None:  # a settle retried after a database outage pushes nothing twice
            loras = [self._describe(ArtifactKind.lora, Path(p).name, Path(p), step) for p in done.get("paths", [])]
            self._final = [loras, self._log_artifact()]
        loras, log_row = self._final
        names = [row["name"] for row in loras if row]
        if LORA_WEIGHTS_NAME not in names:
            return "the trainer reported success, but its LoRA file is missing"
        missing = self.finish_pushes()
        if missing:
            return (f"could not store {len(missing)} artifact(s) in {self.pusher.store.url}: "
                    + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        self._settle(JobState.succeeded, [*loras, log_row], events.DONE,
                     {"step": step, "loss": done.get("loss"), "artifacts": names},
                     step=step, total_steps=done.get("total_steps"))
        return None

    def fail(self, message: str) -> None:
        log_row = self._log_artifact()
        self.finish_pushes()  # its checkpoints in the store, for a retry on another host
        self._settle(JobState.failed, [log_row], events.ERROR, {"message": message}, error=message)

    def cancel(self) -> None:
        log_row = self._log_artifact()
        self.finish_pushes()
        self._settle(JobState.canceled, [log_row], None, None)

    def finish_pushes(self) -> list[str]:
        """Wait for the queued pushes (renewing the lease through keep_alive); what is not in the
        store is logged and returned."""
        if self.pusher.store is None:
            return []
        missing = self.pusher.finish(self.keep_alive)
        if missing:
            log.error("job.artifacts_not_stored job=%s attempt=%s store=%s: %s", self.job_id, self.attempt,
                      self.pusher.store.url, "; ".join(missing))
        return missing

    def hand_back(self) -> int | None:
        """Put the job back in the queue as the next attempt (its worker is shutting down), which
        resumes from the checkpoint just written. The attempt does not count against the attempt
        limit (`attempt_base` moves with it): a deploy is no fault of the job's.

        Returns the new attempt, or None when the job was being canceled (it is canceled now).
        """
        new_attempt = self.attempt + 1
        log_row = self._log_artifact()
        self.finish_pushes()  # the checkpoint just written, for the next attempt on whichever host
        with self._transaction() as (session, added):
            self._fence(session)
            if log_row:
                _upsert_artifact(session, log_row)
            state_event = transition(session, self.job_id, JobState.running, JobState.queued, attempt=self.attempt,
                                     new_attempt=new_attempt, attempt_base=Job.attempt_base + 1, worker=None,
                                     lease_until=None, event_data={"reason": HANDED_BACK, "attempt": new_attempt})
            if state_event is None:  # canceling (the fence passed): the cancel wins
                state_event = transition(session, self.job_id, JobState.canceling, JobState.canceled,
                                         attempt=self.attempt)
                new_attempt = None
            if state_event is None:
                raise LostOwnership
            added.append(state_event)
        return new_attempt

    def publish_pending(self) -> bool:
        """Send the events Redis refused before, in order, when the backoff allows; True when
        none is left. Only the newest STREAM_MAXLEN are kept (the stream holds no more)."""
        now = time.monotonic()
        if self._unpublished and now >= self._publish_retry_at:
            self._unpublished = events.publish(self.redis, self._unpublished)[-events.STREAM_MAXLEN:]
            if self._unpublished:
                self._publish_delay = min(max(PUBLISH_BACKOFF_S[0], self._publish_delay * 2), PUBLISH_BACKOFF_S[1])
                self._publish_retry_at = now + self._publish_delay
            else:
                self._publish_delay = 0.0
        return not self._unpublished

    # ----------------------------------------------------------------------------------------

    def _settle(self, state: JobState, artifacts: list, event_type: str | None, data: dict | None, **fields) -> None:
        """Record the last artifacts and event, and move the job to its final `state`."""
        with self._transaction() as (session, added):
            self._fence(session)
            for row in filter(None, artifacts):
                _upsert_artifact(session, row)
            if event_type:
                added.append(events.append_event(session, self.job_id, event_type, data))
            expected = (JobState.canceling,) if state == JobState.canceled else OWNED_STATES
            state_event = transition(session, self.job_id, expected, state, attempt=self.attempt,
                                     **{key: value for key, value in fields.items() if value is not None})
            if state_event is None:
                raise LostOwnership
            added.append(state_event)

    @contextmanager
    def _transaction(self):
        added: list = []
        with self.sessions.begin() as session:
            yield session, added
        if added:
            self.last_seq = max(self.last_seq, *(event.seq for event in added))
        # In order: nothing new goes to the stream ahead of what it refused before.
        self._unpublished.extend(added)
        self.publish_pending()

    def written(self) -> bool:
        """Whether the last batch `record` tried, with no answer, is in the database after all.

        While this attempt owns the job only it adds job events other than state changes (the API
        and the reaper add those), so any such event after `last_seq`, the newest this recorder
        knows it committed, came from that batch. A batch that adds no job event at all is safe
        to write again (its metrics and artifacts are upserts).
        """
        with self.sessions() as session:
            newest = session.scalar(select(func.max(JobEvent.seq)).where(
                JobEvent.job_id == self.job_id, JobEvent.seq > self.last_seq, JobEvent.type != events.STATE))
        if newest is None:
            return False
        self.last_seq = newest
        return True

    def _fence(self, session: Session, **fields) -> None:
        result = session.execute(
            update(Job)
            .where(Job.id == self.job_id, Job.attempt == self.attempt, Job.state.in_([s.value for s in OWNED_STATES]))
            .values(**(fields or {"step": Job.step}))  # a no-op update still takes the row
        )
        if result.rowcount != 1:
            raise LostOwnership

    def _apply(self, session: Session, event: dict, added: list) -> None:
        kind = event.get("type")
        if kind == "start":
            # A resumed attempt retrains the steps after its checkpoint: drop the old timeline's.
            session.execute(delete(JobMetric).where(JobMetric.job_id == self.job_id, JobMetric.step > event["step"]))
            added.append(events.append_event(session, self.job_id, events.LOG, _public(event)))
        elif kind == "step":
            _upsert_metric(session, self.job_id, event)
            added.append(events.append_event(session, self.job_id, events.STEP, _public(event)))
            log.debug("job.step job=%s step=%s loss=%s", self.job_id, event["step"], event.get("loss"))
        elif kind == "validation_loss":  # the held-out loss (trainer/validation_loss.py): its own metric
            values = {"validation_loss": event.get("validation_loss")}
            statement = _insert(session, JobMetric).values(job_id=self.job_id, step=event["step"], **values)
            session.execute(statement.on_conflict_do_update(index_elements=["job_id", "step"], set_=values))
            added.append(events.append_event(session, self.job_id, events.LOG, _public(event)))
        elif kind == "prepare":  # the latent cache's progress (trainer/latent_cache.py)
            added.append(events.append_event(session, self.job_id, events.PREPARE, _public(event)))
        elif kind == "checkpoint":
            added.append(events.append_event(session, self.job_id, events.CHECKPOINT, {
                "step": event["step"], "artifacts": [f"{Path(p).name}/{LORA_WEIGHTS_NAME}" for p in event["paths"]],
                **({"requested": True} if (event.get("data") or {}).get("requested") else {})}))
        elif kind == "validation":
            added.append(events.append_event(session, self.job_id, events.SAMPLE, {
                "step": event["step"], "message": event.get("message"),
                "artifacts": [_sample_name(p) for p in event["paths"]]}))
        elif kind == "done":
            self.done = event
        elif kind == "error":
            self.error = event.get("message") or "training failed without a message"
        elif kind == STOPPED:
            self.stopped = event
        # Any other type (one a newer trainer reports) is left out of the record, never an error.

    def _artifacts_of(self, event: dict) -> list[dict]:
        kind, step = event.get("type"), event.get("step")
        if kind == "start" and self.resumed_from is not None:
            return [self._describe(ArtifactKind.checkpoint, f"{self.resumed_from.name}/{LORA_WEIGHTS_NAME}",
                                   self.resumed_from / LORA_WEIGHTS_NAME, step, within=self.job_dir)]
        if kind == "checkpoint":
            return [self._describe(ArtifactKind.checkpoint, f"{Path(p).name}/{LORA_WEIGHTS_NAME}",
                                   Path(p) / LORA_WEIGHTS_NAME, step) for p in event["paths"]]
        if kind == "validation":
            return [self._describe(ArtifactKind.sample, _sample_name(p), Path(p), step) for p in event["paths"]]
        return []

    def _log_artifact(self) -> dict | None:
        if not self.log_path.is_file():  # the job failed before a training process started
            return None
        return self._describe(ArtifactKind.log, f"logs/attempt-{self.attempt}.log", self.log_path, None)

    def _describe(self, kind: ArtifactKind, name: str, path: Path, step: int | None,
                  within: Path | None = None) -> dict | None:
        """An artifact row for a file this attempt wrote (or, `within` the job's folder, one it
        resumed from); None (and a warning) if it is not there."""
        path = path.resolve()
        if (within or self.attempt_dir) not in path.parents or not path.is_file():
            log.warning("job.artifact_missing job=%s name=%s path=%s", self.job_id, name, path)
            return None
        if within is None:  # with an object store, queued to push now (a checkpoint's whole folder)
            self.pusher.push(path, LORA_WEIGHTS_NAME if kind == ArtifactKind.checkpoint else None)
        return {"job_id": self.job_id, "kind": kind.value, "name": name, "path": str(path),
                "size": path.stat().st_size, "sha256": storage.sha256_file(path), "step": step}


def _progress(batch: list[dict]) -> dict:
    """The job row's progress fields after this batch."""
    fields = {}
    for event in batch:
        if event.get("type") == "start":
            fields.update(step=event["step"], total_steps=event["total_steps"])
        elif event.get("type") == "step":
            fields.update(step=event["step"], last_loss=event.get("loss"))
    return fields


def _public(event: dict) -> dict:
    """The trainer's event as job event data: its fields without the type."""
    return {key: value for key, value in event.items() if key != "type"}


def _sample_name(path: str) -> str:
    return f"samples/{Path(path).name}"


def _insert(session: Session, model):
    """An INSERT that can take ON CONFLICT, in this database's dialect."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


def _upsert_metric(session: Session, job_id: str, event: dict) -> None:
    values = {key: event.get(key) for key in METRIC_FIELDS}
    values["time"] = datetime.fromtimestamp(event["time"], timezone.utc) if event.get("time") else utcnow()
    statement = _insert(session, JobMetric).values(job_id=job_id, step=event["step"], **values)
    session.execute(statement.on_conflict_do_update(index_elements=["job_id", "step"], set_=values))


def _upsert_artifact(session: Session, row: dict) -> None:
    """Artifact names are unique per job: a later attempt's file replaces an earlier one's."""
    values = {**row, "created_at": utcnow()}
    changes = {key: value for key, value in values.items() if key not in ("job_id", "name")}
    statement = _insert(session, Artifact).values(**values)
    session.execute(statement.on_conflict_do_update(index_elements=["job_id", "name"], set_=changes))


def _mark_best_checkpoint(session: Session, job_id: str) -> None:
    """jobs.best_checkpoint: the recorded checkpoint whose step has the lowest validation loss
    (the earliest on a tie); pruned checkpoints' rows are gone, so it is always downloadable."""
    best = session.execute(
        select(Artifact.name).join(JobMetric, (JobMetric.job_id == Artifact.job_id) & (JobMetric.step == Artifact.step))
        .where(Artifact.job_id == job_id, Artifact.kind == ArtifactKind.checkpoint.value,
               JobMetric.validation_loss.is_not(None))
        .order_by(JobMetric.validation_loss, Artifact.step).limit(1)).scalar()
    session.execute(update(Job).where(Job.id == job_id).values(best_checkpoint=best))


def _forget_pruned_checkpoints(session: Session, job_id: str, within: Path | None = None) -> list[str]:
    """Drop the rows of checkpoints the trainer deleted (`checkpoints_total_limit`), only those
    `within` a folder when given; returns their paths."""
    rows = session.execute(select(Artifact.id, Artifact.path).where(
        Artifact.job_id == job_id, Artifact.kind == ArtifactKind.checkpoint.value)).all()
    gone = [row for row in rows if (within is None or within in Path(row.path).parents)
            and not Path(row.path).is_file()]
    if gone:
        session.execute(delete(Artifact).where(Artifact.id.in_([row.id for row in gone])))
    return [row.path for row in gone]
