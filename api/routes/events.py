"""/v1/jobs/{id}/events: the job's events as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from api.deps import AsyncRedisDep, OwnedJob, SessionFactoryDep
from api.schemas import ERRORS, MAX_INT32
from api.services.sse import job_event_stream
from loraq.errors import Invalid

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`id: <seq>`, `event: <type>`, `data: <json>` per event"},
                       **ERRORS})
def job_events(job: OwnedJob, factory: SessionFactoryDep, redis: AsyncRedisDep,
               after: Annotated[int | None, Query(ge=0, le=MAX_INT32, description="resume after this seq")] = None,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None) -> StreamingResponse:
    """Every stored event after Last-Event-ID (or `after`), then live ones; ends after a final state."""
    start = after or 0
    if last_event_id is not None and last_event_id.strip():
        if not last_event_id.strip().isdigit() or int(last_event_id) > MAX_INT32:
            raise Invalid(f"Last-Event-ID: expected an event number, got {last_event_id!r}")
        start = int(last_event_id)
    return StreamingResponse(job_event_stream(factory, redis, job.id, start), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
