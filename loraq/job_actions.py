"""Save now / sample now on a running job: the Redis list through which the API asks the worker
running the job, which hands each request to its training process as a request file in the
attempt's folder (trainer/control.py); the loop serves it at its next step boundary."""

from __future__ import annotations

ACTIONS = ("checkpoint", "sample")
ACTION_TTL_S = 3600  # a request no worker took (the job ended meanwhile) does not linger


def action_key(job_id: str) -> str:
    return f"loraq:jobs:{job_id}:actions"
