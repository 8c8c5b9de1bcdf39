"""`python -m loraq.deploy init | check-api | check-worker`: what the containers of
docker-compose.yml run besides the API and the worker themselves.

- `init`, the one-shot `migrate` service: the database migrations, then the demo models
  (tiny-sd, tiny-sdxl, tiny-flux, tiny-sd3) and the sample dataset in the data volume, each only when missing.
- `check-api`, the API's health check: GET /healthz answers 200 (database and Redis up).
- `check-worker`, a worker's health check: this container's worker heartbeat is live in Redis
  (loraq.workers; a worker busy training still renews it from its own thread).

Exit status 0 when all is well, 1 (with the reason on stderr) when not.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

from loraq.settings import Settings
from loraq.workers import KEY_PREFIX


def init(settings: Settings) -> None:
    from loraq.launcher import ensure_demo_files
    from loraq.migrate import upgrade

    upgrade(settings)
    ensure_demo_files(settings)


def check_api(settings: Settings, url: str | None = None, timeout: float = 5.0) -> str | None:
    """None when the API's /healthz answers 200, else why not."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = url or f"http://{host}:{settings.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own URL
            return None if response.status == 200 else f"{url} answered {response.status}"
    except OSError as error:  # urllib's HTTPError (a 503) and connection errors are OSErrors
        return f"{url}: {error}"


def check_worker(settings: Settings, host: str | None = None) -> str | None:
    """None when a worker of this host (container) has a live heartbeat, else why not."""
    import redis

    host = host or socket.gethostname()
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
        with client:
            if next(client.scan_iter(match=f"{KEY_PREFIX}{host}:*", count=1000), None) is not None:
                return None
    except redis.RedisError as error:
        return f"Redis at {settings.redis_url}: {error}"
    return f"no live worker heartbeat of host {host} in Redis"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = Settings()
    if argv == ["init"]:
        init(settings)
        return 0
    if argv == ["check-api"]:
        problem = check_api(settings)
    elif argv == ["check-worker"]:
        problem = check_worker(settings)
    else:
        print("usage: python -m loraq.deploy init | check-api | check-worker", file=sys.stderr)
        return 2
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
