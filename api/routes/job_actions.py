"""POST /v1/jobs/{id}/checkpoint and /sample: save now / sample now on a running job."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OwnedJob, RedisDep
from api.schemas import ERRORS
from api.services import job_actions as service

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("/{job_id}/checkpoint", status_code=202, responses=ERRORS)
def checkpoint_now(job: OwnedJob, redis: RedisDep) -> dict:
    """Save a checkpoint at the running job's next step (recorded like a scheduled one); 409 unless running."""
    return service.request_action(redis, job, "checkpoint")


@router.post("/{job_id}/sample", status_code=202, responses=ERRORS)
def sample_now(job: OwnedJob, redis: RedisDep) -> dict:
    """Render the validation prompt at the running job's next step; 409 unless running with a validation_prompt."""
    return service.request_action(redis, job, "sample")
