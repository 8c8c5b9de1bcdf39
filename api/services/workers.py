"""The workers page: each live worker (its Redis heartbeat) with its current job from the database."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.schemas import WorkerJobOut, WorkerOut
from loraq.auth import Principal
from loraq.models import Job, JobState
from loraq.workers import KEY_PREFIX, TTL_S

BUSY = (JobState.running.value, JobState.canceling.value)


def _heartbeats(redis) -> list[tuple[dict, float]]:
    """Each live heartbeat and when it was last renewed (Unix time, from the key's remaining TTL)."""
    keys = list(redis.scan_iter(match=KEY_PREFIX + "*", count=100))
    if not keys:
        return []
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.pttl(key)
    answers = pipe.execute()
    now = time.time()
    beats = []
    for value, ttl_ms in zip(answers[::2], answers[1::2]):
        if value:
            beats.append((json.loads(value), now - max(0.0, TTL_S - max(ttl_ms, 0) / 1000)))
    return beats


def _host_pid(worker: str) -> tuple[str, str] | None:
    """(host, pid) from a job's `worker`, `loraq-<pid>@<host>:<pid>` (Celery node name, process id)."""
    node, _, pid = worker.rpartition(":")
    host = node.rpartition("@")[2]
    return (host, pid) if host and pid else None


def list_workers(session: Session, redis, principal: Principal, queue: str | None = None) -> list[WorkerOut]:
    """Live workers, by name; a worker's current job shows its id only to an admin or the job's owner."""
    running = session.execute(select(Job.id, Job.owner, Job.worker, Job.state, Job.step, Job.total_steps)
                              .where(Job.state.in_(BUSY), Job.worker.is_not(None))).all()
    session.commit()
    by_process = {_host_pid(row.worker): row for row in running}
    workers = []
    for info, beat in _heartbeats(redis):
        if queue is not None and info.get("queue") != queue:
            continue
        row = by_process.get((str(info.get("host")), str(info.get("pid"))))
        job = None
        if row is not None and (principal.admin or row.owner == principal.owner):
            job = WorkerJobOut(id=row.id, state=row.state, step=row.step, total_steps=row.total_steps)
        since = info.get("since")
        workers.append(WorkerOut(
            name=info.get("name", ""), host=info.get("host"), pid=info.get("pid"), queue=info.get("queue"),
            gpu_class=info.get("gpu_class") or "cpu", device=info.get("device"), busy=row is not None,
            current_job=job, last_heartbeat=datetime.fromtimestamp(beat, timezone.utc),
            started_at=datetime.fromtimestamp(since, timezone.utc) if since else None))
    return sorted(workers, key=lambda w: w.name)
