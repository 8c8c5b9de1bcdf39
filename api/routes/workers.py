"""/v1/workers: the live workers, their queue, GPU class, current job and last heartbeat."""

from __future__ import annotations

from fastapi import APIRouter, Query

from api.deps import PrincipalDep, RedisDep, SessionDep
from api.schemas import WorkerOut
from api.services import workers as service

router = APIRouter(tags=["workers"])


@router.get("/workers")
def list_workers(session: SessionDep, redis: RedisDep, principal: PrincipalDep,
                 queue: str | None = Query(default=None, max_length=200, description="only this queue's workers")
                 ) -> list[WorkerOut]:
    """Every live worker; its current job's id shows to admins and to the job's owner only."""
    return service.list_workers(session, redis, principal, queue)
