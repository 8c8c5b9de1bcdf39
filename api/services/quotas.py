"""Per-owner limits: jobs waiting in the queue (429) and bytes stored (413)."""

from __future__ import annotations

from sqlalchemy import func, select
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
    """429 when queueing one more job would put `owner` over LORAQ_MAX_QUEUED_JOBS."""
    count = queued_jobs(session, owner)
    if count >= settings.max_queued_jobs:
        raise QuotaExceeded(f"queued jobs limit: {owner} has {count} jobs queued and the limit is "
                            f"{settings.max_queued_jobs} (LORAQ_MAX_QUEUED_JOBS); wait for some to start")


def check_storage(session: Session, settings: Settings, owner: str, adding: int) -> None:
    """413 when `adding` more bytes would put `owner` over LORAQ_MAX_STORAGE_BYTES."""
    used = storage_used(session, owner)
    limit = settings.max_storage_bytes
    if used + adding > limit or used >= limit:
        raise TooLarge(f"storage limit: {owner} stores {used} bytes, this upload adds {adding}, and the limit "
                       f"is {limit} bytes (LORAQ_MAX_STORAGE_BYTES); delete datasets or jobs to make room")
