"""ORM models: datasets, jobs, their metrics, events and artifacts, and API keys."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    canceling = "canceling"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


ACTIVE_STATES = (JobState.queued, JobState.running, JobState.canceling)
FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.canceled)


class Dataset(Base):
    __tablename__ = "datasets"
    # An upload looks for the owner's identical dataset (dedupe) by its content hash.
    __table_args__ = (Index("ix_datasets_owner_content_hash", "owner", "content_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    image_count: Mapped[int] = mapped_column(Integer)
    captioned_count: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str] = mapped_column(String(64))
    storage_path: Mapped[str] = mapped_column(String(500))
    report: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        # Each in the order GET /v1/jobs pages (queued_at, id), so a page is an index range read
        # without sorting and a count never reads a row: an owner's jobs; an owner's jobs in one
        # state (also the queued-jobs limit's count); and every job in one state (queue
        # positions, an admin's state filter, the workers' and reaper's lookups).
        Index("ix_jobs_owner_queued_at", "owner", "queued_at", "id"),
        Index("ix_jobs_owner_state_queued_at", "owner", "state", "queued_at", "id"),
        Index("ix_jobs_state_queued_at", "state", "queued_at", "id"),
        # The claim order of queued jobs (priority first), read by workers and queue positions.
        Index("ix_jobs_state_priority_queued_at", "state", "priority", "queued_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), index=True)
    base_model: Mapped[str] = mapped_column(String(300))
    config: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued.value)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    last_loss: Mapped[float | None] = mapped_column(Float)
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Attempts before the current series: a user's retry starts a new series, so the automatic
    # cap (settings.max_attempts) counts only attempts since then.
    attempt_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Where each state change is POSTed (loraq/webhooks.py); checked at submit, None for none.
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    # The fleet (README "Fleets, routing and priorities"): what a job needs of a worker, and its
    # place in the queue. Workers claim the highest priority, then the oldest, job they fit.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    num_gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    gpu_class: Mapped[str | None] = mapped_column(String(64))
    min_gpu_memory_gb: Mapped[float | None] = mapped_column(Float)
    # When the current attempt's wake-up was last sent (None: never, or it failed); the reaper
    # re-sends one for a job queued a while with none (loraq/reaper.py, sweep_unannounced).
    announced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The kept checkpoint with the lowest validation loss (its LoRA artifact's name), when measured.
    best_checkpoint: Mapped[str | None] = mapped_column(String(300))


class JobCount(Base):
    """How many jobs each owner has in each state, kept by database triggers on `jobs` (migration
    0009) in the same transaction as every insert, state change and delete, whatever code or SQL
    makes it; GET /v1/jobs reads its totals and the queue's length here instead of counting an
    index of every job per request. A SQLite migration that recreates `jobs` (batch mode) drops
    its triggers: create them again there (tests/loraq/test_migrations.py checks they work)."""

    __tablename__ = "job_counts"
    __table_args__ = (Index("ix_job_counts_state", "state"),)

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)


class JobVersion(Base):
    """A counter per owner (and one for the queue, owner '') that database triggers (migration
    0010) bump in the writing transaction on every change a GET /v1/jobs page shows: the owner's
    jobs' listed columns and metrics, and for the queue's, anything that moves queue positions.
    API processes keep pages in memory under these counters (api/services/jobs.py, PageCache).
    A SQLite migration that recreates `jobs` or `job_metrics` drops the triggers: create them again."""

    __tablename__ = "job_versions"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)  # '': the queue
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_metrics_job_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    epoch: Mapped[int | None] = mapped_column(Integer)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    validation_loss: Mapped[float | None] = mapped_column(Float)  # held-out loss, at the steps measured
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ArtifactKind(str, enum.Enum):
    lora = "lora"
    checkpoint = "checkpoint"
    sample = "sample"
    log = "log"


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    step: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A bearer key: only its SHA-256 is stored; `prefix` lets a person tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BaseModelRow(Base):
    """A base model an admin added while the service runs (beside LORAQ_MODELS and the demo models).

    `source` is what the trainer loads (a local folder, a cached hub id or a single-file
    .safetensors checkpoint); `config_dir` is the family's config folder a single file needs.
    """

    __tablename__ = "base_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(String(1000))
    config_dir: Mapped[str | None] = mapped_column(String(1000))
    family: Mapped[str] = mapped_column(String(16))
    added_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookSecret(Base):
    """An owner's webhook signing secret (`whsec_` + base64 of 32 random bytes), made on first use."""

    __tablename__ = "webhook_secrets"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One state change of a job to POST to its webhook_url: written in the transition's own
    transaction (an outbox), sent after the commit by a dispatcher, retried with backoff.

    `status`: pending (to send, at next_attempt_at), delivered (a 2xx), failed (attempts used up
    or the URL refused); `history` holds every attempt: {attempt, at, status_code, error}.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event_seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
