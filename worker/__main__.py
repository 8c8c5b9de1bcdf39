"""`python -m worker [celery worker options]`: start one worker process."""

from __future__ import annotations

import logging
import os
import socket
import sys

import redis

from loraq.reaper import start_reaper
from loraq.settings import Settings
from loraq.webhooks import start_dispatcher
from loraq.workers import KEY_PREFIX, start_heartbeat
from worker.app import create_app, warm_up, worker_argv
from loraq.queue import worker_queues
from worker.gpu_class import capabilities


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    warm_up()
    app = create_app(settings)
    client = redis.Redis.from_url(settings.redis_url)
    name = f"{socket.gethostname()}:{os.getpid()}"
    offers = capabilities(settings)
    stop = start_heartbeat(client, name, {"pid": os.getpid(), "host": socket.gethostname(),
                                          # `queue`: the default one it shares with every worker (the
                                          # workers page filters on it); `queues`: its class's too.
                                          "queue": settings.queue_name,
                                          "queues": worker_queues(settings, offers.gpu_class),
                                          "device": settings.worker_device, "gpu_class": offers.gpu_class,
                                          "gpus": offers.gpus, "gpu_memory_gb": offers.memory_gb})
    # Every worker also reaps expired leases (jobs of workers that died); concurrent reapers are safe.
    stop_reaper = start_reaper(settings)
    # ... and sends due webhooks (loraq/webhooks.py): a thread, since the solo pool's one task
    # slot is busy training for hours; several dispatchers claim each attempt once.
    stop_webhooks = start_dispatcher(settings)
    code: int | str | None = 0
    try:
        app.worker_main(worker_argv(settings) + list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        code = exit_.code
    finally:
        stop_reaper.set()
        stop_webhooks.set()
        stop.set()
    try:  # gone from /healthz now, not when the heartbeat key expires
        client.delete(KEY_PREFIX + name)
    except redis.RedisError:
        pass
    # Skip the interpreter's teardown: collecting what torch and diffusers hold took seconds of a
    # shutdown's grace. Everything worth keeping is in the database and the job folders.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    main()
