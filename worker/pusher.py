"""An attempt's uploads to the object store, in order, on a thread of their own.

The supervisor's loop (worker/runner.py) renews the job's lease between writes of the trainer's
events; an artifact pushed from that loop (a checkpoint of hundreds of MB to a slow store) would
hold the loop for the whole upload, long enough for the lease to expire and the reaper to start a
second attempt. So the recorder only queues its pushes here; one thread per attempt sends them in
the order they were queued (a checkpoint folder with its LoRA file last, then a later removal of
a pruned checkpoint's objects), while the loop goes on renewing the lease.

A push is tried PUSH_TRIES times with backoff (boto3 retries within each try as well); one that
still fails is kept, tried once more when the attempt settles (`finish`), and if it fails then too
the recorder is told which files are not in the store: a job does not succeed with artifacts the
API could not serve (worker/recorder.py). A file gone before its push (a checkpoint the trainer
pruned meanwhile) is skipped: its row is gone too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraq import object_store
from loraq.object_store import ObjectStore
from loraq.settings import Settings

log = logging.getLogger("loraq.storage")

PUSH_TRIES = 3
PUSH_BACKOFF_S = (2.0, 30.0)  # first wait between tries of one push, and the longest
FINISH_POLL_S = 0.2  # how often `finish` calls its keep_alive while pushes are under way


@dataclass
class _Op:
    kind: str  # "push" (a file, or with `last` its whole folder) or "remove" (a key prefix)
    rel: str  # the key relative to the store's prefix (the path relative to the data directory)
    path: Path | None = None
    last: str | None = None
    error: str | None = None

    def gone(self) -> bool:
        """The local file (or folder) is no longer there: nothing to push."""
        return self.kind == "push" and not (self.path.parent.is_dir() if self.last else self.path.is_file())

    def __str__(self) -> str:
        return f"{self.rel}{'/' if self.last else ''}" + (f" ({self.error})" if self.error else "")


class Pusher:
    """Queued pushes and removals for one attempt; a no-op without an object store."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None):
        self.settings = settings
        self.store = store if store is not None else object_store.from_settings(settings)
        self._ops: deque[_Op] = deque()
        self._running: _Op | None = None
        self._failed: list[_Op] = []
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    def push(self, path: Path, folder_last: str | None = None) -> None:
        """Queue a file the attempt wrote, or with `folder_last` its whole folder, that file last
        (object_store.ObjectStore.put_folder)."""
        if self.store is None:
            return
        path = Path(path)
        rel = object_store.relative(self.settings, path.parent if folder_last else path)
        self._submit(_Op("push", rel, path, folder_last))

    def remove(self, rel_prefix: str) -> None:
        """Queue the removal of the objects under a prefix (after the pushes queued before it)."""
        if self.store is not None:
            self._submit(_Op("remove", rel_prefix))

    def pending(self) -> int:
        """Pushes and removals queued or under way."""
        with self._cond:
            return len(self._ops) + (self._running is not None)

    def finish(self, keep_alive: Callable[[], bool] = lambda: True) -> list[str]:
        """Wait for every queued push, trying each failed one once more (those that failed before
        this call and those that fail during it); `keep_alive()` is called every FINISH_POLL_S
        meanwhile (the supervisor renews the lease there) and may end the wait by answering
        False. Returns what is not in the store ("key (error)"), [] when all is."""
        if self.store is None:
            return []
        retried: set[int] = set()
        while True:
            with self._cond:
                if not self._ops and self._running is None:
                    retry = [op for op in self._failed if id(op) not in retried and not op.gone()]
                    if not retry:
                        return [str(op) for op in self._failed if not op.gone()]
                    log.info("storage.push_retry keys=%s", ",".join(op.rel for op in retry))
                    retried.update(id(op) for op in retry)
                    self._failed = [op for op in self._failed if op not in retry]
                    self._ops.extend(retry)
                    self._start()
                self._cond.wait(FINISH_POLL_S)
            if not keep_alive():
                with self._cond:
                    left = [op for op in (self._running, *self._ops) if op is not None and op.kind == "push"]
                    return [str(op) for op in self._failed] + [f"{op.rel} (still being pushed)" for op in left]

    # ----------------------------------------------------------------------------------------

    def _submit(self, op: _Op) -> None:
        with self._cond:
            self._ops.append(op)
            self._start()

    def _start(self) -> None:
        """Start the sending thread unless it runs (call with the lock held). It ends when the
        queue is empty, so an idle worker holds no thread per finished attempt."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_all, name="loraq-push", daemon=True)
            self._thread.start()

    def _send_all(self) -> None:
        while True:
            with self._cond:
                if not self._ops:
                    self._running = None
                    self._thread = None
                    self._cond.notify_all()
                    return
                op = self._running = self._ops.popleft()
            failed = not self._send(op)
            with self._cond:
                if failed:
                    self._failed.append(op)
                self._running = None
                self._cond.notify_all()

    def _send(self, op: _Op) -> bool:
        """Try one push or removal PUSH_TRIES times; True once done (or nothing left to push)."""
        delay = PUSH_BACKOFF_S[0]
        for attempt in range(1, PUSH_TRIES + 1):
            if op.gone():
                log.info("storage.push_skipped key=%s: the file is gone (pruned)", op.rel)
                return True
            started = time.monotonic()
            try:
                if op.kind == "remove":
                    self.store.delete_prefix(op.rel)
                elif op.last is not None:
                    self.store.put_folder(op.path.parent, op.rel, last=op.last)
                else:
                    self.store.put_file(op.path, op.rel)
            except Exception as error:  # noqa: BLE001 - kept and reported; the job goes on meanwhile
                op.error = f"{type(error).__name__}: {error}"
                log.warning("storage.push_failed key=%s try=%d/%d store=%s: %s", op.rel, attempt, PUSH_TRIES,
                            self.store.url, op.error)
                if attempt < PUSH_TRIES:
                    time.sleep(delay)
                    delay = min(delay * 2, PUSH_BACKOFF_S[1])
                continue
            op.error = None
            log.debug("storage.pushed key=%s in %.1f s", op.rel, time.monotonic() - started)
            return True
        if op.kind == "remove":  # leftover objects only cost space; never a reason to fail a job
            log.error("storage.delete_failed prefix=%s store=%s: %s", op.rel, self.store.url, op.error)
            return True
        log.error("storage.push_gave_up key=%s store=%s: %s", op.rel, self.store.url, op.error)
        return False
