"""Job events: numbered per job in the database (the record) and mirrored to a Redis stream
(the live wake-up). Readers resume by sequence number, so nothing is missed or repeated."""

from __future__ import annotations

import json
import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraq.models import Job, JobEvent

log = logging.getLogger("loraq.events")

STATE = "state"  # a job changed state: {"state", "previous", "error"?}
STEP = "step"  # one optimizer step: {"step", "total_steps", "loss", "lr", ...}
CHECKPOINT = "checkpoint"
SAMPLE = "sample"  # validation images were rendered
DONE = "done"
ERROR = "error"
LOG = "log"
PREPARE = "prepare"  # latent cache progress before/while training: {"data": {"done", "total", "mode"}, ...}
STREAM_MAXLEN = 10_000


def stream_key(job_id: str) -> str:
    return f"loraq:jobs:{job_id}:events"


def append_event(session: Session, job_id: str, type_: str, data: dict) -> JobEvent:
    """Add the job's next numbered event in the caller's transaction.

    The counter lives on the job row, so concurrent writers serialise on it and the numbers
    become visible in order: a reader that has seen N never later finds an N-1.
    """
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(event_seq=Job.event_seq + 1).returning(Job.event_seq)
    ).scalar_one()
    event = JobEvent(job_id=job_id, seq=seq, type=type_, data=data)
    session.add(event)
    return event


def publish(redis, events: list[JobEvent]) -> list[JobEvent]:
    """Mirror committed events to the job's Redis stream, in order; a failure only delays live
    readers (they read the database). Returns the events not sent: from the first one Redis
    refused on, so a caller that sends them again later keeps the stream in order."""
    if redis is None:
        return []
    for index, event in enumerate(events):
        try:
            redis.xadd(stream_key(event.job_id), {"seq": event.seq, "type": event.type,
                                                  "data": json.dumps(event.data)},
                       maxlen=STREAM_MAXLEN, approximate=True)
        except Exception as error:  # noqa: BLE001 - Redis down: the database still has the event
            log.warning("event.publish_failed job=%s seq=%s (%d not sent): %s", event.job_id, event.seq,
                        len(events) - index, error)
            return list(events[index:])
    return []


def events_after(session: Session, job_id: str, after_seq: int, limit: int = 1000) -> list[JobEvent]:
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
        .order_by(JobEvent.seq).limit(limit)
    ))
