"""POST /v1/jobs/{id}/checkpoint and /sample: save now / sample now on a running job;
GET /v1/jobs/{id}/best_checkpoint: the checkpoint with the lowest validation loss."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

from api.deps import OwnedJob, RedisDep
from api.schemas import ERRORS
from api.services import job_actions as service
from loraq.errors import NotFound

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("/{job_id}/checkpoint", status_code=202, responses=ERRORS)
def checkpoint_now(job: OwnedJob, redis: RedisDep) -> dict:
    """Save a checkpoint at the running job's next step (recorded like a scheduled one); 409 unless running."""
    return service.request_action(redis, job, "checkpoint")


@router.post("/{job_id}/sample", status_code=202, responses=ERRORS)
def sample_now(job: OwnedJob, redis: RedisDep) -> dict:
    """Render the validation prompt at the running job's next step; 409 unless running with a validation_prompt."""
    return service.request_action(redis, job, "sample")


@router.get("/{job_id}/best_checkpoint", status_code=307, responses=ERRORS)
def best_checkpoint(job: OwnedJob) -> RedirectResponse:
    """The checkpoint with the lowest validation loss: a redirect to its LoRA file's download;
    404 while none is known (no validation loss measured at a kept checkpoint)."""
    if not job.best_checkpoint:
        raise NotFound(f"job {job.id} has no best checkpoint (set validation_split or validation_data_dir)")
    return RedirectResponse(f"/v1/jobs/{quote(job.id, safe='')}/artifacts/{quote(job.best_checkpoint)}",
                            status_code=307)
