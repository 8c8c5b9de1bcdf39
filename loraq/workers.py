"""Live workers, announced in Redis with a short TTL.

A worker runs one training at a time in its main thread (Celery's solo pool), where it cannot
answer Celery's remote-control pings; a heartbeat key renewed from a thread stays true.
"""

from __future__ import annotations

import json
import threading
import time

KEY_PREFIX = "loraq:workers:"
TTL_S = 15
INTERVAL_S = 5


def announce_forever(redis, name: str, info: dict, stop: threading.Event) -> None:
    """Renew this worker's key until `stop` is set, then remove it."""
    key = KEY_PREFIX + name
    payload = json.dumps({**info, "name": name})
    while not stop.is_set():
        try:
            redis.set(key, payload, ex=TTL_S)
        except Exception:  # noqa: BLE001 - Redis briefly away: try again next round
            pass
        stop.wait(INTERVAL_S)
    try:
        redis.delete(key)
    except Exception:  # noqa: BLE001
        pass


def start_heartbeat(redis, name: str, info: dict) -> threading.Event:
    """Announce this worker from a daemon thread; set the returned event to stop."""
    stop = threading.Event()
    threading.Thread(target=announce_forever, args=(redis, name, {**info, "since": time.time()}, stop),
                     name="loraq-worker-heartbeat", daemon=True).start()
    return stop


def live_workers(redis) -> list[dict]:
    """The workers whose heartbeat has not expired."""
    workers = []
    for key in redis.scan_iter(match=KEY_PREFIX + "*", count=100):
        value = redis.get(key)
        if value:
            workers.append(json.loads(value))
    return workers
