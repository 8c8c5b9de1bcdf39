"""The job state machine: every state change goes through `transition`, a conditional UPDATE."""

from __future__ import annotations

from datetime import timedelta
from typing import Iterable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from loraq import events, webhooks
from loraq.errors import Conflict
from loraq.models import Job, JobEvent, JobState, utcnow

S = JobState
ALLOWED: dict[JobState, set[JobState]] = {
    S.queued: {S.running, S.canceled, S.failed},  # failed: a message past the attempt cap
    S.running: {S.succeeded, S.failed, S.canceling, S.queued},  # queued: lease lost, new attempt
    S.canceling: {S.canceled, S.succeeded, S.failed, S.queued},
    S.failed: {S.queued},  # retry
    S.canceled: {S.queued},  # retry
    S.succeeded: set(),
}


class TransitionRefused(Conflict):
    """The job is not in a state from which this change is allowed."""


def transition(
    session: Session,
    job_id: str,
    expected: JobState | Iterable[JobState],
    new: JobState,
    *,
    attempt: int | None = None,
    new_attempt: int | None = None,
    event_data: dict | None = None,
    where=None,
    **fields,
) -> JobEvent | None:
    """Move a job from one of `expected` to `new` if it is still there (and still `attempt`).

    `new_attempt` sets the attempt number (a retry or a requeue starts the next attempt; the
    `attempt` keyword is the condition, so the new number cannot travel in `fields`). `where`, a
    SQL condition on the job row, narrows the match further (the reaper: "lease still expired").
    Returns the state event added to the session, or None when the job had moved on (a race
    lost cleanly). A change the state machine never allows raises TransitionRefused.
    """
    expected = {expected} if isinstance(expected, JobState) else set(expected)
    for state in expected:
        if new not in ALLOWED[state]:
            raise TransitionRefused(f"a {state.value} job cannot become {new.value}")
    now = utcnow()
    if new == S.running:
        fields.setdefault("started_at", now)
    if new in (S.succeeded, S.failed, S.canceled):
        fields.setdefault("finished_at", now)
        fields.setdefault("lease_until", None)
    if new_attempt is not None:
        fields["attempt"] = new_attempt
    if new == S.queued:
        fields.setdefault("queued_at", now)
        fields.setdefault("finished_at", None)
        fields.setdefault("announced_at", None)  # the new attempt's wake-up is not sent yet
    query = update(Job).where(Job.id == job_id, Job.state.in_([s.value for s in expected]))
    if attempt is not None:
        query = query.where(Job.attempt == attempt)
    if where is not None:
        query = query.where(where)
    result = session.execute(query.values(state=new.value, **fields).returning(Job.state, Job.webhook_url))
    row = result.first()
    if row is None:
        return None
    data = {"state": new.value, **(event_data or {})}
    if fields.get("error"):
        data["error"] = fields["error"]
    event = events.append_event(session, job_id, events.STATE, data)
    webhooks.record(session, job_id, row.webhook_url, event)  # an outbox row, sent after the commit
    return event


def claim(session: Session, job_id: str, attempt: int, worker: str, lease_s: float) -> JobEvent | None:
    """Take a queued job for this attempt; None means someone else has it or it was canceled."""
    return transition(session, job_id, S.queued, S.running, attempt=attempt, worker=worker,
                      lease_until=utcnow() + timedelta(seconds=lease_s))


def renew_lease(session: Session, job_id: str, attempt: int, lease_s: float) -> bool:
    """Extend the running attempt's lease; False when this attempt no longer owns the job.

    A lease that has already run out is not renewed (False): its job belongs to the reaper's
    rules now, so a worker back from a long database outage never races a reaper for it.
    """
    now = utcnow()
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.attempt == attempt,
                          Job.state.in_([S.running.value, S.canceling.value]),
                          (Job.lease_until.is_(None)) | (Job.lease_until >= now))
        .values(lease_until=now + timedelta(seconds=lease_s))
    )
    return result.rowcount == 1


# -- the fleet: which queued job a worker takes, and how many are ahead of a job ----------------

# Claim order: the highest priority first, then the oldest (queued_at, id) -- exact, whatever
# order the wake-up messages arrive in (a message only says "look at the queue").
CLAIM_ORDER = (Job.priority.desc(), Job.queued_at, Job.id)


def fits(gpu_class: str, gpus: int, memory_gb: float | None):
    """SQL condition: a job this worker can run (its class or none asked, enough GPUs and memory)."""
    memory = Job.min_gpu_memory_gb.is_(None)
    if memory_gb is not None:
        memory = memory | (Job.min_gpu_memory_gb <= memory_gb)
    return and_(or_(Job.gpu_class.is_(None), Job.gpu_class == gpu_class), Job.num_gpus <= gpus, memory)


def next_queued(session: Session, gpu_class: str, gpus: int, memory_gb: float | None) -> tuple[str, int] | None:
    """(id, attempt) of the queued job this worker should take next, or None when none fits."""
    row = session.execute(
        select(Job.id, Job.attempt).where(Job.state == S.queued.value, fits(gpu_class, gpus, memory_gb))
        .order_by(*CLAIM_ORDER).limit(1)
    ).first()
    return (row.id, row.attempt) if row is not None else None


def ahead_condition(job):
    """SQL condition: a queued job a worker would take before `job` and that competes with it for
    the same workers. A job asking for a class waits behind the earlier jobs of its class and the
    classless ones (any worker takes those); a classless job behind every earlier job (it may run
    on any worker, so any of them may be in its way). GPU count and memory are left out."""
    before = or_(Job.priority > job.priority,
                 and_(Job.priority == job.priority,
                      or_(Job.queued_at < job.queued_at, and_(Job.queued_at == job.queued_at, Job.id < job.id))))
    condition = and_(Job.state == S.queued.value, before)
    if job.gpu_class is not None:
        condition = and_(condition, or_(Job.gpu_class.is_(None), Job.gpu_class == job.gpu_class))
    return condition


def queue_position(session: Session, job) -> int | None:
    """1-based place of a queued job in its workers' claim order; None unless queued."""
    if job.state != S.queued.value:
        return None
    return session.scalar(select(func.count()).select_from(Job).where(ahead_condition(job))) + 1
