"""`python -m worker [celery worker options]`: start one worker process."""

from __future__ import annotations

import logging
import sys

from loraq.settings import Settings
from worker.app import create_app, warm_up, worker_argv


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    warm_up()
    create_app(settings).worker_main(worker_argv(settings) + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
