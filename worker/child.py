"""The training child: `trainer.loop.train` in a process forked from the warm worker.

The child writes each trainer event as one JSON line to a pipe and everything else (its log,
warnings, tracebacks) to `train.log`. A crash, an out-of-memory kill or a hang ends only the
child; the worker that forked it reads the pipe, records the outcome and takes the next job.
The child never touches the database or Redis, so it trains on while either is away.

`STOP_SIGNAL` (SIGUSR1) asks the child to save a checkpoint at its next step boundary and end
(trainer/control.py); it then reports a `stopped` event and exits 0. A worker shutting down uses
it to hand its job over without losing a step.
"""

from __future__ import annotations

import ctypes
import errno
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
STOP_SIGNAL = signal.SIGUSR1
STOPPED = "stopped"  # the event the child writes after stopping on STOP_SIGNAL: {"type", "step"}


class TrainingProcess:
    """The parent's handle on one training child: start it, read its events, stop it."""

    def __init__(self, config, log_path: Path, num_processes: int = 1):
        self.config = config
        self.log_path = log_path
        # More than 1: the child is rank 0 of that many training processes (one per GPU, or
        # gloo processes on the CPU); it starts the others, which share its process group.
        self.num_processes = num_processes
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
        # STOP_SIGNAL stays blocked across the fork until the child has its own handler: one sent
        # right after start waits instead of running the worker's inherited handler (or killing).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
        # A bare fork, not spawn: the child inherits the imported torch/diffusers and starts in
        # milliseconds instead of the seconds a fresh interpreter needs. Not multiprocessing's
        # fork either: its after-fork hooks let kombu close the parent's broker connections from
        # the child, which blocked reading the parent's socket.
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child_main(self.config, read_fd, write_fd, str(self.log_path), parent_pid, mask,
                                   self.num_processes)
            except BaseException:  # noqa: BLE001 - whatever happens, never return into the worker
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001
                        pass
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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

    def request_stop(self) -> None:
        """Ask the training to checkpoint at its next step boundary and end (a `stopped` event).
        With several processes rank 0 alone is told: the ranks combine their flags at each step
        boundary (trainer/control.py), so all stop after the same step."""
        if self.pid is not None and self.exitcode is None:
            try:  # the child only: its data loader processes would die of the signal
                os.kill(self.pid, STOP_SIGNAL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """End the child and its group at once (a worker that must exit now)."""
        if self.pid is not None and self.exitcode is None:
            self._signal(signal.SIGKILL)
            self._wait(None)

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
            if -code == signal.SIGXFSZ:
                reason = ("the training process went past the file size limit (SIGXFSZ) while writing "
                          "the job's files")
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


def _child_main(config, read_fd: int, write_fd: int, log_path: str, parent_pid: int, mask=frozenset(),
                num_processes: int = 1) -> int:
    """Train with events to `write_fd`; 0 on success or a stop on request, 1 after reporting an
    error event."""
    from trainer import control

    os.close(read_fd)
    _detach(parent_pid)
    control.reset()
    control.stop_on_signal(STOP_SIGNAL)
    peers = None
    if num_processes > 1:
        config = _distributed_device(config)
        peers = _start_peers(config, num_processes, write_fd, log_path, mask)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop sent since the fork arrives now
    log_file = _redirect_output(log_path)
    if peers is not None:
        peers.watch(log_file)
    code = _train_rank0(config, write_fd, log_path, log_file)
    if code == 0 and peers is not None and not peers.wait(PEER_EXIT_WAIT_S):
        log_file.write("the other training processes did not end after rank 0 did\n")
        return 1
    return code


def _train_rank0(config, write_fd: int, log_path: str, log_file) -> int:
    from trainer import control

    events_out = os.fdopen(write_fd, "w", buffering=1, encoding="utf-8")

    from trainer.events import ConsoleReporter, Event
    from trainer import metadata as training_metadata
    from trainer.loop import train

    from worker.tensorboard import TensorBoardSink, tensorboard_dir

    reporter = ConsoleReporter(out=events_out, log=log_file, bar=False)
    board = TensorBoardSink(tensorboard_dir(Path(config.output_dir)))  # the scalars, for TensorBoard
    run_metadata = training_metadata.MetadataRecorder(config)  # the LoRA files' ss_*/modelspec.* keys

    def on_event(event) -> None:
        run_metadata(event)
        reporter(event)
        board(event)
        if event.type == "step" and (event.step % STEP_LOG_EVERY == 0 or event.step == event.total_steps):
            log_file.write(f"step {event.step}/{event.total_steps} loss {event.loss:.5g} lr {event.lr:.3g}\n")

    try:
        with training_metadata.recording(config, run_metadata):
            train(config, on_event)
    except control.StopRequested as stopped:
        log_file.write(f"{stopped}\n")
        events_out.write(json.dumps({"type": STOPPED, "step": stopped.step, "time": time.time()}) + "\n")
        events_out.flush()
        return 0
    except Exception as error:  # the error event already went to the parent; the traceback goes to the log
        logging.getLogger("trainer").exception("training failed")
        message = write_failure_message(error, Path(config.output_dir), Path(log_path))
        if message:  # clearer than the library's words (torch: "unexpected pos 64 vs 0"); the last error wins
            events_out.write(Event("error", message=message).to_json() + "\n")
            events_out.flush()
        return 1
    finally:
        board.close()
    return 0


# --------------------------------------------------------------------------------------------
# Several processes (num_gpus > 1)

PEER_EXIT_WAIT_S = 120.0  # after rank 0 ended well, how long the others may take to end


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Peers:
    """Ranks 1.. of a several-process training, forked by rank 0 (the worker's child), the way
    torchrun would start them: the same environment variables, one process per GPU. They are in
    rank 0's process group (a stop or kill of the group reaches them) and die with it
    (PDEATHSIG). One of them failing ends rank 0 too (a collective would wait for it for ever)."""

    def __init__(self, pids: dict[int, int], log_path: str):
        self.pids = pids  # pid -> rank
        self.log_path = log_path
        self._done = None

    def watch(self, log_file) -> None:
        import threading

        self._done = threading.Event()
        threading.Thread(target=self._watch, args=(log_file,), name="loraq-peers", daemon=True).start()

    def _watch(self, log_file) -> None:
        for pid, rank in list(self.pids.items()):
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                tail = log_tail(Path(_rank_log(self.log_path, rank)))
                log_file.write(f"training process rank {rank} {how}; last lines of its log:\n{tail}\n")
                log_file.flush()
                for other in self.pids:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os._exit(1)  # rank 0 too: it would wait for the failed rank in its next collective
        self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done is not None and self._done.wait(timeout)


def _rank_log(log_path: str, rank: int) -> str:
    path = Path(log_path)
    return str(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))


def _start_peers(config, num_processes: int, write_fd: int, log_path: str, mask) -> _Peers:
    """Set rank 0's distributed environment and fork ranks 1..num_processes-1."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "WORLD_SIZE": str(num_processes), "LOCAL_WORLD_SIZE": str(num_processes),
                       "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"})
    _share_cpu_threads(config, num_processes)
    leader = os.getpid()
    pids = {}
    for rank in range(1, num_processes):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(write_fd)  # only rank 0 reports events
                code = _peer_main(config, rank, leader, log_path, mask)
            except BaseException:  # noqa: BLE001 - never return into rank 0's code
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001
                        pass
                os._exit(code)
        pids[pid] = rank
    return _Peers(pids, log_path)


def _distributed_device(config):
    """`auto` with no CUDA device means the CPU, said explicitly: accelerate starts gloo processes
    only when told `cpu` (with `auto` each rank would train alone, as rank 0 of 1)."""
    if getattr(config, "device", None) != "auto":
        return config
    # NVML's count, not the CUDA runtime's: the ranks are forked after this, and a CUDA runtime
    # initialised before a fork is unusable in the children.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return config if torch.cuda.is_available() else config.model_copy(update={"device": "cpu"})


def _share_cpu_threads(config, num_processes: int) -> None:
    """On the CPU the processes share the cores: each gets its part (torch would take all)."""
    if getattr(config, "device", None) == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))


def _peer_main(config, rank: int, leader: int, log_path: str, mask) -> int:
    from trainer import control

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != leader:  # rank 0 died before the prctl took effect
        return 1
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _redirect_output(_rank_log(log_path, rank))

    from trainer.loop import train

    try:
        train(config)  # events: only rank 0's are reported (the loop emits on the main process only)
    except control.StopRequested:
        return 0
    except Exception:  # noqa: BLE001 - rank 0's watcher reports it with this log's tail
        logging.getLogger("trainer").exception("training failed on rank %s", rank)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# A full disk


LOW_SPACE_BYTES = 1 << 20  # less free than this where the job writes: a failed write was the disk's doing
# What torch's and safetensors' writers say when a write comes up short (the errno is lost there).
_WRITE_FAILURES = ("inline_container", "pytorchstreamwriter", "file write failed", "i/o error",
                   "error while serializing")


def write_failure_message(error: BaseException, output_dir: Path, log_path: Path | None = None) -> str | None:
    """A message naming the disk and the file, when `error` came from writing to a full disk (or
    past a quota or the file size limit); None for any other error."""
    from trainer.checkpoints import DISK_ERRNOS, disk_errno, error_chain

    code = disk_errno(error)
    free = free_bytes(output_dir)
    if code is None and free is not None and free < LOW_SPACE_BYTES and _is_write_error(error):
        code = errno.ENOSPC
    if code is None:
        return None
    filename = next((e.filename for e in error_chain(error) if isinstance(e, OSError) and e.filename), None)
    target = _shown(Path(filename), output_dir) if filename else _newest_entry(output_dir, log_path)
    space = f"{free} bytes free where the job writes" if free is not None else "free space unknown"
    return (f"{DISK_ERRNOS[code]} while writing {target} ({space}); free some space and retry the job, "
            "which resumes from its last complete checkpoint")


def free_bytes(path: Path) -> int | None:
    """Bytes this process may still write on `path`'s filesystem (root may use the reserve)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    return blocks * stats.f_frsize


def _is_write_error(error: BaseException) -> bool:
    from trainer.checkpoints import error_chain

    return any(isinstance(e, OSError) or any(text in str(e).lower() for text in _WRITE_FAILURES)
               for e in error_chain(error))


def _shown(path: Path, output_dir: Path) -> str:
    """`path` relative to the job's folder when it lies inside it."""
    try:
        return path.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _newest_entry(output_dir: Path, log_path: Path | None) -> str:
    """The file or folder last changed in `output_dir` (what was being written), the log aside."""
    newest, best = None, (-1, -1)
    for folder, dirs, files in os.walk(output_dir):
        for name in dirs + files:
            path = Path(folder, name)
            if log_path is not None and path == log_path:
                continue
            try:
                changed = path.lstat().st_mtime_ns
            except OSError:
                continue
            key = (changed, len(path.parts))
            if key > best:
                newest, best = path, key
    return _shown(newest, output_dir) if newest is not None else "the job's folder"


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


class _LogFile:
    """The attempt's log as a text stream whose write errors (a full disk) are dropped: losing
    log lines must not stop the training, nor hide the error the trainer reports."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, text: str) -> int:
        try:
            return self._handle.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def _redirect_output(log_path: str):
    """Send stdout, stderr and logging to the attempt's log file."""
    raw = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - the child's life
    os.dup2(raw.fileno(), 1)
    os.dup2(raw.fileno(), 2)
    log_file = _LogFile(raw)
    sys.stdout = sys.stderr = log_file
    root = logging.getLogger()
    for handler in list(root.handlers):  # the worker's handlers (console, test capture)
        root.removeHandler(handler)
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return log_file
