"""The training child: `trainer.loop.train` in a process forked from the warm worker.

The child writes each trainer event as one JSON line to a pipe and everything else (its log,
warnings, tracebacks) to `train.log`. A crash, an out-of-memory kill or a hang ends only the
child; the worker that forked it reads the pipe, records the outcome and takes the next job.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("loraq.worker")

TERM_GRACE_S = 5.0  # after SIGTERM, this long before SIGKILL
STEP_LOG_EVERY = 10  # a step line in train.log every this many steps
LOG_TAIL_BYTES = 2000
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class TrainingProcess:
    """The parent's handle on one training child: start it, read its events, stop it."""

    def __init__(self, config, log_path: Path):
        self.config = config
        self.log_path = log_path
        self.pid: int | None = None
        self._pidfd: int | None = None  # readable once the child exits
        self._returncode: int | None = None
        self._fd: int | None = None
        self._buffer = b""
        self._eof = False

    @property
    def exitcode(self) -> int | None:
        """The child's exit code (negative: killed by that signal), None while it runs."""
        if self._returncode is None and self.pid is not None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    @property
    def finished(self) -> bool:
        """The child has exited and every event it wrote has been read."""
        return self.exitcode is not None and self._eof

    def start(self) -> int:
        """Fork the child; returns its pid."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            # CUDA does not survive a fork: the child's first CUDA call would fail.
            log.warning("worker.cuda_initialized_before_fork: the training child cannot use CUDA")
        read_fd, write_fd = os.pipe()
        parent_pid = os.getpid()
        # A bare fork, not spawn: the child inherits the imported torch/diffusers and starts in
        # milliseconds instead of the seconds a fresh interpreter needs. Not multiprocessing's
        # fork either: its after-fork hooks let kombu close the parent's broker connections from
        # the child, which blocked reading the parent's socket.
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child_main(self.config, read_fd, write_fd, str(self.log_path), parent_pid)
            except BaseException:  # noqa: BLE001 - whatever happens, never return into the worker
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001
                        pass
                os._exit(code)
        os.close(write_fd)  # only the child writes, so the pipe ends when the child does
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        try:  # also set here (the child does it too), so a stop right after start hits the group
            os.setpgid(pid, pid)
        except OSError:
            pass
        return pid

    def poll(self, timeout: float) -> list[dict]:
        """The events written since the last call, waiting up to `timeout` s for something."""
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if not self._eof:
            poller.register(self._fd, select.POLLIN)
        if poller.poll(timeout * 1000):
            # Once the child has exited, its last events are all in the pipe already: read
            # them now, because a grandchild holding the pipe open would delay the EOF forever.
            self._drain()
            if self.exitcode is not None:
                self._eof = True
        return self._take_events()

    def stop(self, grace: float = TERM_GRACE_S) -> None:
        """SIGTERM the child's process group, then SIGKILL it if still there after `grace` s."""
        if self.pid is None or self.exitcode is not None:
            return
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # a stopped process would never act on the SIGTERM
        if not self._wait(grace):
            self._signal(signal.SIGKILL)
            self._wait(None)

    def _wait(self, timeout: float | None) -> bool:
        """Wait for the child to exit (at most `timeout` s); True once it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exitcode is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            select.select([self._pidfd], [], [], 0.05)
        return True

    def close(self) -> None:
        """Stop the child if needed and release the pipe."""
        self.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._pidfd is not None and self.exitcode is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def failure_reason(self) -> str:
        """Why the child ended without finishing, for when it could not say so itself."""
        code = self.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            reason = f"the training process was killed by {name}"
            if -code == signal.SIGKILL:
                reason += " (possibly out of memory)"
        elif code == 0:
            reason = "the training process ended without reporting completion"
        else:
            reason = f"the training process exited with code {code} without an error message"
        tail = log_tail(self.log_path)
        return f"{reason}; last lines of train.log:\n{tail}" if tail else reason

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def _drain(self) -> None:
        while not self._eof:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self._eof = True
                return
            self._buffer += chunk

    def _take_events(self) -> list[dict]:
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("job.bad_event_line %r", line[:200])
        return events


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last lines of a log file, at most about `limit` bytes."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - limit))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    if len(text) >= limit and "\n" in text:
        text = text.split("\n", 1)[1]  # drop the partial first line
    return text.strip()


# --------------------------------------------------------------------------------------------
# In the child


def _child_main(config, read_fd: int, write_fd: int, log_path: str, parent_pid: int) -> int:
    """Train with events to `write_fd`; 0 on success, 1 after reporting an error event."""
    os.close(read_fd)
    _detach(parent_pid)
    log_file = _redirect_output(log_path)
    events_out = os.fdopen(write_fd, "w", buffering=1, encoding="utf-8")

    from trainer.events import ConsoleReporter
    from trainer.loop import train

    reporter = ConsoleReporter(out=events_out, log=log_file, bar=False)

    def on_event(event) -> None:
        reporter(event)
        if event.type == "step" and (event.step % STEP_LOG_EVERY == 0 or event.step == event.total_steps):
            log_file.write(f"step {event.step}/{event.total_steps} loss {event.loss:.5g} lr {event.lr:.3g}\n")

    try:
        train(config, on_event)
    except Exception:  # the error event already went to the parent; the traceback goes to the log
        logging.getLogger("trainer").exception("training failed")
        return 1
    return 0


def _detach(parent_pid: int) -> None:
    """Own process group and default signal handling; die with the worker."""
    # Its own group: the worker stops the child and anything it started (data loader workers)
    # together, and a Ctrl-C in the worker's terminal reaches the worker, which decides.
    os.setpgid(0, 0)
    for sig in _RESET_SIGNALS:  # the Celery pool process's handlers are inherited by fork
        signal.signal(sig, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the broken pipe at the next event ends it
        return
    if os.getppid() != parent_pid:  # the worker died before the prctl took effect
        os._exit(1)


def _redirect_output(log_path: str):
    """Send stdout, stderr and logging to the attempt's log file."""
    log_file = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    sys.stdout = sys.stderr = log_file
    root = logging.getLogger()
    for handler in list(root.handlers):  # the worker's handlers (console, test capture)
        root.removeHandler(handler)
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return log_file
