"""The worker's Celery application.

`python -m worker` runs one worker process; `celery -A worker.app worker ...` works too (the
module builds its `app` only when the Celery command line asks for it).
"""

from __future__ import annotations

import functools
import logging
import os

from celery import Celery, signals

from loraq.queue import make_celery, worker_queues
from loraq.settings import Settings
from worker import shutdown, tasks
from worker.gpu_class import capabilities

log = logging.getLogger("loraq.worker")


def create_app(settings: Settings | None = None) -> Celery:
    """The shared Celery app (loraq.queue) with the run-job task registered."""
    settings = settings or Settings()
    app = make_celery(settings)
    # solo: tasks run in the worker's own (warm) process, which forks each training child;
    # prefork's pool processes are daemonic, and multiprocessing refuses to start children there.
    app.conf.worker_pool = "solo"
    tasks.register(app, settings)
    install_shutdown(settings)
    return app


def install_shutdown(settings: Settings) -> shutdown.Shutdown:
    """Celery's SIGTERM/SIGINT handlers stop taking messages (a warm shutdown would then wait for
    the running job to end); each also sends `worker_shutting_down`, which here starts the hand
    back of the running job, or on a second signal the immediate exit (worker/shutdown.py)."""
    state = shutdown.install(settings.shutdown_grace_s)

    def on_shutting_down(sig=None, how=None, **_):
        state.request(f"{sig} ({how})")

    # Solo pool: Celery's handler, and so this receiver, run in the process that trains.
    signals.worker_shutting_down.connect(on_shutting_down, weak=False, dispatch_uid="loraq.shutdown")
    return state


def worker_argv(settings: Settings) -> list[str]:
    """One worker process: one training at a time, on the configured queue, a unique node name."""
    queues = ",".join(worker_queues(settings, capabilities(settings).gpu_class))  # its class's and the default
    return [
        "worker", "--pool=solo", f"--queues={queues}",
        f"--hostname=loraq-{os.getpid()}@%h", "--loglevel=INFO",
        # Gossip and mingle sync worker state we do not use (the database holds it); skip them.
        "--without-gossip", "--without-mingle",
    ]


def warm_up(**_) -> None:
    """Import the training stack in the worker's parent process, before any job or CUDA use.

    Each job's training child is forked from here, so it starts with these modules loaded
    instead of spending seconds importing them.
    """
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401

    import trainer.loop  # noqa: F401

    log.info("worker.warmed_up torch=%s diffusers=%s peft=%s", torch.__version__, diffusers.__version__,
             peft.__version__)


@functools.cache
def _cli_app() -> Celery:
    # After logging is set up (so the line shows) and before the pool starts.
    signals.celeryd_after_setup.connect(warm_up, weak=False, dispatch_uid="loraq.warm_up")
    return create_app()


def __getattr__(name: str):
    # `celery -A worker.app` looks up `worker.app.app`; build it then, never at import.
    if name == "app":
        return _cli_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
