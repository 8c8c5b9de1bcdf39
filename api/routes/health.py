"""/healthz: database, Redis and live workers; 503 unless the database and Redis answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import RedisDep, SessionDep
from api.schemas import Health
from api.services.health import check

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    """Answers while the process serves, touching nothing else: a liveness probe, and the floor
    bench.service compares authenticated routes with (what FastAPI and uvicorn cost a request)."""
    return {"status": "ok"}


@router.get("/healthz", responses={503: {"model": Health}})
def healthz(session: SessionDep, redis: RedisDep) -> JSONResponse:
    health = check(session, redis)
    ok = health.database == "ok" and health.redis == "ok"
    return JSONResponse(health.model_dump(), status_code=200 if ok else 503)
