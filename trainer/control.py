"""Asking a running training to stop early, with a checkpoint at its next step boundary.

A worker being shut down (a deploy, a spot instance's notice) hands its job back instead of
throwing away the steps since the last scheduled checkpoint: it asks the training process to
stop (`request_stop`, typically from a signal handler: it only sets a flag), and the loop, after
its next optimizer step, saves a checkpoint at that step and raises `StopRequested`.

The flag is process-wide because the training runs once per process (the worker's child, the
CLI); `reset` clears it for a library caller that trains again in the same process.
"""

from __future__ import annotations

import signal
import sys

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
    global _requested
    _requested = False


def stop_on_signal(sig: int = signal.SIGUSR1) -> None:
    """Make `sig` request the stop (call from the process's main thread)."""
    signal.signal(sig, request_stop)
