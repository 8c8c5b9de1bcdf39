"""Health of what the API depends on."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.orm import Session

from api.schemas import Health
from loraq.workers import live_workers

log = logging.getLogger("loraq.api.health")


def check(session: Session, redis) -> Health:
    """`ok` or `error` for the database and Redis, and how many workers' heartbeats are live."""
    database = redis_state = "ok"
    try:
        session.execute(text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - any failure is "error"
        log.warning("health.database_error: %s", error)
        database = "error"
    try:
        redis.ping()
    except Exception as error:  # noqa: BLE001
        log.warning("health.redis_error: %s", error)
        redis_state = "error"
    workers = None
    if redis_state == "ok":
        try:
            workers = len(live_workers(redis))
        except Exception as error:  # noqa: BLE001
            log.warning("health.workers_error: %s", error)
    return Health(database=database, redis=redis_state, workers=workers)
