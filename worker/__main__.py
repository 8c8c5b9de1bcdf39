"""`python -m worker [celery worker options]`: start one worker process."""

from __future__ import annotations

import logging
import os
import socket
import sys

import redis

from loraq.reaper import start_reaper
from loraq.settings import Settings
from loraq.workers import start_heartbeat
from worker.app import create_app, warm_up, worker_argv


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    warm_up()
    app = create_app(settings)
    stop = start_heartbeat(redis.Redis.from_url(settings.redis_url), f"{socket.gethostname()}:{os.getpid()}",
                           {"pid": os.getpid(), "host": socket.gethostname(), "queue": settings.queue_name})
    # Every worker also reaps expired leases (jobs of workers that died); concurrent reapers are safe.
    stop_reaper = start_reaper(settings)
    try:
        app.worker_main(worker_argv(settings) + list(sys.argv[1:] if argv is None else argv))
    finally:
        stop_reaper.set()
        stop.set()


if __name__ == "__main__":
    main()
