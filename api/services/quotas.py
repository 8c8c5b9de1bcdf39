"""Per-owner limits: jobs waiting in the queue (429) and bytes stored (413)."""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from loraq.errors import QuotaExceeded, TooLarge
from loraq.models import Artifact, Dataset, Job, JobState
from loraq.settings import Settings


def queued_jobs(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.owner == owner, Job.state == JobState.queued.value))


def storage_used(session: Session, owner: str) -> int:
    """Bytes the owner's datasets and job artifacts take on disk."""
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.total_bytes), 0)).where(Dataset.owner == owner))
    artifacts = session.scalar(select(func.coalesce(func.sum(Artifact.size), 0))
                               .join(Job, Job.id == Artifact.job_id).where(Job.owner == owner))
    return int(datasets) + int(artifacts)


def check_queued_jobs(session: Session, settings: Settings, owner: str) -> None:
    """429 when `owner` now has more than LORAQ_MAX_QUEUED_JOBS queued. Call it after the job being
    queued is flushed and before the commit: it rolls back when over. Submissions of one owner are
    serialized up to their commit (SQLite: the insert's write lock; PostgreSQL: an advisory lock),
    so racing submissions cannot all pass on the same count."""
    serialize(session, "queued", owner)
    count = queued_jobs(session, owner)
    if count > settings.max_queued_jobs:
        session.rollback()
        raise QuotaExceeded(f"queued jobs limit: {owner} has {count - 1} jobs queued and the limit is "
                            f"{settings.max_queued_jobs} (LORAQ_MAX_QUEUED_JOBS); wait for some to start")


def serialize(session: Session, limit: str, owner: str) -> None:
    """Hold the owner's lock for `limit` until the transaction ends. On PostgreSQL an advisory
    lock; on SQLite the transaction's first write already holds the one write lock."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"loraq:{limit}:{owner}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def check_storage_room(session: Session, settings: Settings, owner: str) -> None:
    """413 before an upload is read when `owner` is already at LORAQ_MAX_STORAGE_BYTES."""
    used = storage_used(session, owner)
    session.commit()  # no connection held while the body streams in
    if used >= settings.max_storage_bytes:
        raise _storage_full(settings, owner, used, 0)


def check_storage(session: Session, settings: Settings, owner: str, added: int) -> None:
    """413 when the `added` bytes of a dataset whose row is flushed (so already counted) put `owner`
    over LORAQ_MAX_STORAGE_BYTES; serialized per owner like the queue's limit."""
    serialize(session, "storage", owner)
    before = storage_used(session, owner) - added
    if before + added > settings.max_storage_bytes or before >= settings.max_storage_bytes:
        raise _storage_full(settings, owner, before, added)


def _storage_full(settings: Settings, owner: str, used: int, adding: int) -> TooLarge:
    return TooLarge(f"storage limit: {owner} stores {used} bytes, this upload adds {adding}, and the limit "
                    f"is {settings.max_storage_bytes} bytes (LORAQ_MAX_STORAGE_BYTES); delete datasets or jobs "
                    "to make room")
