"""A worker's shutdown: hand the running job back, and never outlive the grace period.

The first SIGTERM or SIGINT (a deploy, a spot instance's notice, Ctrl-C) sets `requested`: the
worker takes no new job, and the supervisor of a running one asks its training to checkpoint at
the next step boundary, then puts the job back in the queue as the next attempt. The process
exits within `grace_s` of that signal whatever happens: a watchdog thread kills the training child
and ends the process when the grace runs out, or at once on a second signal. A job left that way
is covered by its lease (the reaper requeues it from its last complete checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("loraq.worker")

EXIT_FORCED = 1


class Shutdown:
    """One worker process's shutdown state; `request` is safe to call from a signal handler."""

    def __init__(self, grace_s: float, exit=os._exit):
        self.grace_s = grace_s
        self.requested = threading.Event()
        self.requested_at: float | None = None  # time.monotonic() of the first request
        self._deadline: float | None = None
        self._child_pid: int | None = None
        self._wake = threading.Event()
        self._exit = exit  # tests pass a recorder instead of ending the test process

    @property
    def deadline(self) -> float | None:
        """When the process ends at the latest (time.monotonic()), once a shutdown was requested."""
        return self._deadline

    def request(self, reason: str = "signal") -> None:
        """The first call starts the graceful hand-back; a second one ends the process now."""
        now = time.monotonic()
        if not self.requested.is_set():
            self.requested_at = now
            self._deadline = now + self.grace_s
            self.requested.set()
            threading.Thread(target=self._watchdog, name="loraq-shutdown-watchdog", daemon=True).start()
            log.warning("worker.shutting_down (%s): handing back the running job; exiting within %g s",
                        reason, self.grace_s)
        else:
            self._deadline = now
            log.warning("worker.shutting_down_now (%s): second request; stopping at once", reason)
        self._wake.set()

    def left_s(self) -> float:
        """Seconds of grace left (infinite while no shutdown was requested)."""
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def watch_child(self, pid: int | None) -> None:
        """The training child to kill if the grace runs out (None: no child any more)."""
        self._child_pid = pid

    def _watchdog(self) -> None:
        while True:
            left = self.left_s()
            if left <= 0:
                break
            self._wake.wait(left)
            self._wake.clear()
        pid = self._child_pid
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.warning("worker.exit_forced: the shutdown grace of %g s ran out or a second signal came; "
                    "a job still running is left to its lease", self.grace_s)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        self._exit(EXIT_FORCED)


_current: Shutdown | None = None


def install(grace_s: float) -> Shutdown:
    """This process's Shutdown (one per process)."""
    global _current
    if _current is None:
        _current = Shutdown(grace_s)
    return _current


def current() -> Shutdown | None:
    return _current
