"""/v1/jobs: submit, list, show, cancel, retry, delete, metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from api.deps import CeleryDep, OwnedJob, PrincipalDep, RedisDep, SessionDep, SettingsDep
from api.schemas import ERRORS, MAX_INT32, MAX_OFFSET, JobCheck, JobCreate, JobList, JobOut, MetricOut
from api.services import jobs as service
from loraq.models import JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                              pattern=r"^[\x21-\x7e]+$",
                                              description="replays return the same job (200)")]


@router.post("", status_code=201, responses={200: {"model": JobOut, "description": "replay of an Idempotency-Key"},
                                             **ERRORS})
def create_job(body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep,
               redis: RedisDep, celery: CeleryDep, principal: PrincipalDep, idempotency_key: IdempotencyKey = None
               ) -> JobOut:
    """Queue a training job: 201 when created, 200 when an Idempotency-Key replays an earlier one."""
    job, created = service.submit_job(session, settings, redis, celery, principal, body, idempotency_key)
    response.status_code = 201 if created else 200
    return service.show_job(session, job)


@router.post("/validate", responses=ERRORS)
def validate_job(body: JobCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> JobCheck:
    """Check a submission as POST /v1/jobs would (same 404 and 422 messages) without queueing it."""
    _, config, steps = service.check_submission(session, settings, principal, body)
    return JobCheck(total_steps=steps, config=service.checked_options(config))


@router.get("", response_model=JobList, responses=ERRORS)
async def list_jobs(request: Request, principal: PrincipalDep, state: JobState | None = None,
                    dataset_id: Annotated[str | None, Query(max_length=64, description="only this dataset's jobs")]
                    = None,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50,
                    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Response:
    """Your jobs (an admin's: everyone's), most recently queued first; `total` counts every match."""
    # The most polled route (every open jobs page, every 2 s): the page as this process last
    # built it while its job_versions counters have not moved (service.PageCache), else built in
    # one worker thread; the body is JobList's, written by the service (see list_jobs_json).
    # No sync dependency (SessionFactoryDep): FastAPI runs each in a worker thread, a hand-off
    # that cost about half of what the rest of a kept page does.
    body = await page_cache(request).page(request.app.state.session_factory, principal, state, limit, offset,
                                          dataset_id)
    return Response(body, media_type="application/json")


def page_cache(request: Request) -> service.PageCache:
    """The process's kept pages (service.PageCache) on the app's state, made with its first
    listing (on the event loop: no other request can make a second one meanwhile)."""
    state = request.app.state
    cache = getattr(state, "job_pages", None)
    if cache is None:
        cache = state.job_pages = service.PageCache(state.engine)
    return cache


@router.get("/{job_id}", responses=ERRORS)
def show_job(job: OwnedJob, session: SessionDep) -> JobOut:
    return service.show_job(session, job)


@router.post("/{job_id}/cancel", responses=ERRORS)
def cancel_job(job: OwnedJob, session: SessionDep, redis: RedisDep) -> JobOut:
    """Queued: canceled now. Running: canceling until the worker stops. Final: 409."""
    return service.show_job(session, service.cancel_job(session, redis, job))


@router.post("/{job_id}/retry", responses=ERRORS)
def retry_job(job: OwnedJob, session: SessionDep, settings: SettingsDep, redis: RedisDep, celery: CeleryDep
              ) -> JobOut:
    """A failed or canceled job is queued again as its next attempt; other states: 409."""
    return service.show_job(session, service.retry_job(session, settings, redis, celery, job))


@router.delete("/{job_id}", status_code=204, responses=ERRORS)
def delete_job(job: OwnedJob, session: SessionDep, settings: SettingsDep, redis: RedisDep) -> Response:
    """Delete a finished job with its events, metrics and files; 409 while it is active."""
    service.delete_job(session, settings, redis, job)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", responses=ERRORS)
def job_metrics(job: OwnedJob, session: SessionDep, after_step: Annotated[int, Query(ge=-1, le=MAX_INT32)] = -1,
                limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> list[MetricOut]:
    """One row per optimizer step, ordered by step (page with `after_step` = the last step seen)."""
    rows = service.list_metrics(session, job, after_step, limit)
    return [MetricOut.model_validate(row, from_attributes=True) for row in rows]
