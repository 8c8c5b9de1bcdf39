"""Worker test fixtures: jobs inserted straight into the test database, and a way to read them back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import select

from loraq import events, storage
from loraq.db import make_engine, make_session_factory
from loraq.models import Artifact, Dataset, Job, JobEvent, JobMetric, new_id


class JobStore:
    """Reads (and a few direct writes) on the test database, each in its own short session."""

    def __init__(self, sessions):
        self.sessions = sessions

    def job(self, job_id: str) -> Job:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def dataset_path(self, job_id: str) -> Path:
        with self.sessions() as session:
            return Path(session.scalar(select(Dataset.storage_path).join(Job, Job.dataset_id == Dataset.id)
                                       .where(Job.id == job_id)))

    def metric_steps(self, job_id: str) -> list[int]:
        with self.sessions() as session:
            query = select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
            return list(session.scalars(query))

    def events(self, job_id: str) -> list[JobEvent]:
        with self.sessions() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))

    def artifacts(self, job_id: str) -> dict[str, Artifact]:
        with self.sessions() as session:
            return {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}

    def wait_for_steps(self, job_id: str, count: int, timeout: float = 60.0) -> None:
        """Block until the job has metrics for at least `count` steps."""
        deadline = time.monotonic() + timeout
        while len(self.metric_steps(job_id)) < count:
            assert time.monotonic() < deadline, f"job {job_id} did not reach {count} steps in {timeout}s"
            time.sleep(0.05)


@pytest.fixture
def store(settings):
    engine = make_engine(settings)
    yield JobStore(make_session_factory(engine))
    engine.dispose()


@pytest.fixture
def redis_client(settings):
    client = Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def make_job(settings, store, redis_client):
    """Insert a queued job (and its dataset, 4 captioned 32 px images) for `steps` steps."""
    from trainer.sample_data import write_sample_dataset

    created = []

    def make(steps: int, *, base_model: str = "tiny-sd", **options) -> str:
        dataset_id, job_id = new_id(), new_id()
        folder = write_sample_dataset(storage.dataset_dir(settings, dataset_id), n_images=4, size=32)
        config = {"resolution": 32, "train_batch_size": 2, "max_train_steps": steps, "seed": 0,
                  "checkpointing_steps": steps, **options}
        with store.sessions.begin() as session:
            session.add(Dataset(id=dataset_id, owner="local", name="shapes", image_count=4, captioned_count=4,
                                total_bytes=sum(p.stat().st_size for p in folder.iterdir()),
                                content_hash="0" * 64, storage_path=str(folder), report={}))
            session.flush()
            session.add(Job(id=job_id, owner="local", dataset_id=dataset_id, base_model=base_model,
                            config=config, total_steps=steps))
        created.append(job_id)
        return job_id

    yield make
    for job_id in created:
        redis_client.delete(events.stream_key(job_id))
