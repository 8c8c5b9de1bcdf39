"""Typed dependencies: the request's session, settings and clients, and owned resources by id.

A resource is loaded and scoped to its owner once, here; routes never re-check it by hand.
Every request belongs to the owner "local" until authentication arrives: then `get_owner`
is the one function that changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraq.errors import NotFound
from loraq.models import Dataset, Job
from loraq.settings import Settings

LOCAL_OWNER = "local"
_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # ids are uuid4 hex; anything else cannot exist


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_owner() -> str:
    return LOCAL_OWNER


SettingsDep = Annotated[Settings, Depends(get_settings)]
# Closed when the route returns, not after the response is sent: a streamed download or event
# stream must not hold a pooled connection (and an open transaction) for its whole length.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
OwnerDep = Annotated[str, Depends(get_owner)]


def load_job(session: Session, owner: str, job_id: str) -> Job:
    job = None
    if _ID.fullmatch(job_id):
        job = session.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def load_dataset(session: Session, owner: str, dataset_id: str) -> Dataset:
    dataset = None
    if _ID.fullmatch(dataset_id):
        dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner))
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def get_owned_job(job_id: str, session: SessionDep, owner: OwnerDep) -> Job:
    return load_job(session, owner, job_id)


def get_owned_dataset(dataset_id: str, session: SessionDep, owner: OwnerDep) -> Dataset:
    return load_dataset(session, owner, dataset_id)


OwnedJob = Annotated[Job, Depends(get_owned_job)]
OwnedDataset = Annotated[Dataset, Depends(get_owned_dataset)]
