"""Limits an operator sets on a job's size (LORAQ_MAX_*), so one owner cannot queue a job that
holds a GPU for days or cannot fit on one at all.

The size limits are checked at submission (POST /v1/jobs and /v1/jobs/validate answer 422 naming
the option and the limit); the wall-clock limit (`max_job_seconds`) is kept by the worker, which
asks the training to checkpoint at its next step once the time is up and then fails the job
saying so (`WallClock`). A limit of 0 is no limit.
"""

from __future__ import annotations

import time

from loraq.auth import Principal
from loraq.errors import Invalid
from loraq.settings import Settings

# Trainer option -> the setting that bounds it. Steps are bounded separately: the run's total
# steps may come from num_train_epochs rather than max_train_steps.
SIZE_LIMITS = {
    "resolution": "max_resolution",
    "train_batch_size": "max_train_batch_size",
    "rank": "max_rank",
    "num_validation_images": "max_validation_images",
}
# Once asked to stop, the training has this long to reach its next step boundary and save its
# checkpoint before it is stopped outright (a step that takes longer, or a run still loading).
STOP_GRACE_S = 120.0


def env_name(setting: str) -> str:
    return f"LORAQ_{setting.upper()}"


def limit_problems(settings: Settings, config, steps: int) -> list[str]:
    """`option: value is over this server's limit of N (LORAQ_...)` for each limit `config` (a
    validated TrainConfig) and its step count go past; empty when all fit."""
    problems = []
    for option, setting in SIZE_LIMITS.items():
        limit, value = getattr(settings, setting), getattr(config, option, None)
        if limit and value is not None and value > limit:
            problems.append(f"{option}: {value} is over this server's limit of {limit} ({env_name(setting)})")
    limit = settings.max_train_steps
    if limit and steps > limit:
        if config.max_train_steps is not None:
            problems.append(f"max_train_steps: {steps} is over this server's limit of {limit} "
                            f"({env_name('max_train_steps')})")
        else:  # the count comes from the epochs and the dataset's size: name what to change
            problems.append(f"num_train_epochs: {config.num_train_epochs} epochs make {steps} steps, over this "
                            f"server's limit of {limit} ({env_name('max_train_steps')}); lower num_train_epochs "
                            "or set max_train_steps")
    return problems


def check_job_limits(settings: Settings, principal: Principal, config, steps: int) -> None:
    """Raise Invalid (422) naming every limit the submission goes past; admins pass when
    `limits_exempt_admins` is set."""
    if principal.admin and settings.limits_exempt_admins:
        return
    problems = limit_problems(settings, config, steps)
    if problems:
        raise Invalid("; ".join(problems))


class WallClock:
    """One attempt's training time against `max_job_seconds` (the worker's supervisor holds one).

    `expired()` once the time is up; the supervisor then asks the child to stop (`ask()` says
    whether this is the first time) and, when the child has not stopped `grace_s` later,
    stops it outright (`overdue()`). Either way the job fails with `message()`."""

    def __init__(self, limit_s: float, grace_s: float | None = None, clock=time.monotonic):
        self.limit_s = limit_s
        self.grace_s = STOP_GRACE_S if grace_s is None else grace_s
        self._clock = clock
        self.started = clock()
        self.asked_at: float | None = None

    def expired(self) -> bool:
        return bool(self.limit_s) and self._clock() - self.started > self.limit_s

    def ask(self) -> bool:
        """Record the request to stop; True the first time (send it then)."""
        if self.asked_at is not None:
            return False
        self.asked_at = self._clock()
        return True

    @property
    def asked(self) -> bool:
        return self.asked_at is not None

    def overdue(self) -> bool:
        return self.asked_at is not None and self._clock() - self.asked_at > self.grace_s

    def message(self, step: int | None = None) -> str:
        where = (f"; stopped at step {step} with checkpoint-{step} kept, so a retry resumes from it"
                 if step is not None else "; its complete checkpoints are kept, so a retry resumes from the last")
        return (f"the job ran past this server's wall-clock limit of {self.limit_s:g} s per attempt "
                f"({env_name('max_job_seconds')}){where}")
