"""Save now / sample now: queue a request for the worker running the job (loraq/job_actions.py)."""

from __future__ import annotations

from loraq.errors import Conflict
from loraq.job_actions import ACTION_TTL_S, ACTIONS, action_key
from loraq.models import Job, JobState


def request_action(redis, job: Job, action: str) -> dict:
    """Ask the running job for a checkpoint or samples at its next step; 409 unless it is running
    (or, for samples, when it has no validation_prompt to render)."""
    if action not in ACTIONS:  # the routes name only these; a guard for other callers
        raise ValueError(f"unknown action {action!r}")
    if job.state != JobState.running.value:
        raise Conflict(f"job {job.id} is {job.state}; only a running job can {_verb(action)} now")
    if action == "sample" and not (job.config or {}).get("validation_prompt"):
        raise Conflict(f"job {job.id} has no validation_prompt to sample with")
    with redis.pipeline() as pipe:  # a Redis outage is a 503 (api/main.py)
        pipe.rpush(action_key(job.id), action)
        pipe.expire(action_key(job.id), ACTION_TTL_S)
        pipe.execute()
    return {"job_id": job.id, "action": action, "step": job.step,
            "message": f"{_verb(action)} at the job's next step"}


def _verb(action: str) -> str:
    return "save a checkpoint" if action == "checkpoint" else "render samples"
