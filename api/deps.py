"""Typed dependencies: the request's session, settings and clients, its principal (from the
bearer key), and owned resources by id.

A resource is loaded and scoped to its owner once, here; routes never re-check it by hand.
Another owner's resource is a 404, exactly as if it did not exist; admins see every owner's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

import redis
import redis.asyncio
from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, true
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from loraq.auth import Principal, PrincipalCache, RevocationWatch, authenticate_with
from loraq.errors import Forbidden, NotFound, Unauthorized
from loraq.models import Dataset, Job
from loraq.settings import Settings

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


def get_async_redis(request: Request) -> redis.asyncio.Redis:
    return request.app.state.async_redis


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
# Closed when the route returns, not after the response is sent: a streamed download or event
# stream must not hold a pooled connection (and an open transaction) for its whole length.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer lq_...`")


async def get_principal(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The key's principal; 401 for a missing, malformed, unknown or revoked key.

    Async: a key checked recently is answered from the process's PrincipalCache (one Redis read
    tells whether any key was revoked since); otherwise the lookup runs in one worker thread in
    a session of its own (a sync dependency on SessionDep cost three thread hand-offs).
    """
    if credentials is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` "
                           "(the first admin key is in the server's data folder, file admin-key)")
    state, secret = request.app.state, credentials.credentials
    cache = getattr(state, "principals", None)
    if cache is None:
        cache = state.principals = PrincipalCache()
        state.revocations = RevocationWatch(state.async_redis)
    token = await state.revocations.token()  # before any lookup: see PrincipalCache
    principal = cache.get(secret, token)
    if principal is None:
        principal = await run_in_threadpool(authenticate_with, state.session_factory, secret)
        if principal is not None:
            cache.put(secret, token, principal)
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.admin:
        raise Forbidden("this route needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def visible(model, principal: Principal):
    """The WHERE clause limiting `model` (Job or Dataset) rows to what `principal` may see."""
    return true() if principal.admin else model.owner == principal.owner


def _load(session: Session, principal: Principal, model, what: str, item_id: str):
    row = None
    if _ID.fullmatch(item_id):
        row = session.scalar(select(model).where(model.id == item_id, visible(model, principal)))
        session.commit()  # the row stays loaded (expire_on_commit=False); the connection goes back
    if row is None:
        raise NotFound(f"{what} {item_id} not found")
    return row


def load_job(session: Session, principal: Principal, job_id: str) -> Job:
    return _load(session, principal, Job, "job", job_id)


def load_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset:
    return _load(session, principal, Dataset, "dataset", dataset_id)


def get_owned_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> Job:
    return load_job(session, principal, job_id)


def get_owned_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep) -> Dataset:
    return load_dataset(session, principal, dataset_id)


OwnedJob = Annotated[Job, Depends(get_owned_job)]
OwnedDataset = Annotated[Dataset, Depends(get_owned_dataset)]
