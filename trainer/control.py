"""Asking a running training to stop early, with a checkpoint at its next step boundary.

A worker being shut down (a deploy, a spot instance's notice) hands its job back instead of
throwing away the steps since the last scheduled checkpoint: it asks the training process to
stop (`request_stop`, typically from a signal handler: it only sets a flag), and the loop, after
its next optimizer step, saves a checkpoint at that step and raises `StopRequested`.

The flag is process-wide because the training runs once per process (the worker's child, the
CLI); `reset` clears it for a library caller that trains again in the same process.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

_requested = False


class StopRequested(BaseException):
    """The training stopped early on request, after saving `checkpoint-{step}`.

    A BaseException, like KeyboardInterrupt: it is not a failure, so `train`'s error reporting
    (which catches Exception) lets it through without an `error` event.
    """

    def __init__(self, step: int):
        super().__init__(f"stopped on request at step {step}, after saving checkpoint-{step}")
        self.step = step


def request_stop(*_signal_args) -> None:
    """Ask the training to checkpoint and stop at its next step boundary (signal-handler safe)."""
    global _requested
    _requested = True


def stop_requested() -> bool:
    """Whether to stop at this step boundary. Under several processes (torch.distributed) the
    request usually reaches one of them (the worker signals rank 0): the ranks combine their flags
    here (a MAX all-reduce), so every rank stops after the same step. Call it at the same points
    on every rank (the loop does, once per optimizer step)."""
    requested = _requested
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = bool(flag.item())
    return requested


def reset() -> None:
    global _requested, _request_folder
    _requested = False
    _request_folder = None


# ---- save now / sample now ----------------------------------------------------------------------
# A request file in the run's output folder (`.request-checkpoint`, `.request-sample`), written by
# whoever asks (the worker, for POST /v1/jobs/{id}/checkpoint and /sample; a user with `touch`);
# the loop takes them at each step boundary: two stat calls per step, nothing to set up.
REQUESTS = ("checkpoint", "sample")
_request_folder: str | None = None


def request_file(folder: str | os.PathLike, kind: str) -> Path:
    if kind not in REQUESTS:
        raise ValueError(f"unknown request {kind!r} (known: {', '.join(REQUESTS)})")
    return Path(folder) / f".request-{kind}"


def request(folder: str | os.PathLike, kind: str) -> Path:
    """Ask the run writing to `folder` for a checkpoint or samples at its next step boundary."""
    path = request_file(folder, kind)
    path.touch()
    return path


def watch_requests(folder: str | os.PathLike | None) -> None:
    """Take requests from `folder` (the loop sets its output_dir); None: none."""
    global _request_folder
    _request_folder = None if folder is None else str(folder)


def take_requests() -> frozenset[str]:
    """The requests made since the last call (their files removed). Under several processes
    the ranks combine what rank 0 found, like the stop flag, so all serve the same requests."""
    found = set()
    if _request_folder is not None:
        for kind in REQUESTS:
            path = request_file(_request_folder, kind)
            try:
                path.unlink()
                found.add(kind)
            except FileNotFoundError:
                pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flags = torch.tensor([kind in found and dist.get_rank() == 0 for kind in REQUESTS], dtype=torch.int32,
                             device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        found = {kind for kind, flag in zip(REQUESTS, flags.tolist()) if flag}
    return frozenset(found)


def stop_on_signal(sig: int = signal.SIGUSR1) -> None:
    """Make `sig` request the stop (call from the process's main thread)."""
    signal.signal(sig, request_stop)
