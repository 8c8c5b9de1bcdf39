"""Checkpoints: accelerate state (optimizer, scheduler, RNG) plus LoRA weights and where the
data order stood, so a resumed run continues exactly as an uninterrupted one.

A checkpoint folder is written file by file (accelerate's state, then `trainer_state.json`, then
the LoRA file, each file atomically: a temporary name, then a rename). It counts as complete
only once its LoRA file, the last one written, is there; a run killed or out of disk space
midway leaves an incomplete folder that resuming and pruning skip and `remove_incomplete` deletes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.data import ResumePoint, capture_rng

STATE_FILE = "trainer_state.json"
RNG_FILE = "sampler_rng.safetensors"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"  # `.<name>.partial`: a file being written, renamed to <name> when whole
# Errors that mean the disk (or a quota, or the process's file size limit) took no more bytes.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large"}
# Libraries that do not raise OSError still name the cause: Rust's io::Error (safetensors) says
# "No space left on device (os error 28)".
_DISK_TEXT = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
              "disk quota exceeded": errno.EDQUOT, "os error 122": errno.EDQUOT,
              "file too large": errno.EFBIG, "os error 27": errno.EFBIG}


@dataclass
class TrainerState:
    """Progress recorded with a checkpoint."""

    global_step: int
    epoch: int  # the epoch to continue in
    position: int  # batches of that epoch already trained (in sampler units)
    epoch_seed: int | None  # the seed of that epoch's order, when it is under way


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders in `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: str | Path) -> bool:
    """Written to the end: its progress record reads back and its LoRA file (saved last) is there."""
    from trainer.model import LORA_WEIGHTS_NAME  # here: trainer.model imports this module

    checkpoint = Path(checkpoint)
    try:
        json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (checkpoint / LORA_WEIGHTS_NAME).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders in `output_dir`, oldest first."""
    return [path for path in list_checkpoints(output_dir) if is_complete(path)]


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """The folder to resume from: `latest` (the newest complete one; None when there is none yet)
    or an explicit path, which must be a complete checkpoint."""
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a checkpoint of this trainer")
    if not is_complete(path):
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete (its writing was "
                         "interrupted); use an earlier checkpoint")
    return path


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Before saving a new checkpoint, delete the oldest so that `keep` complete ones remain
    afterwards; incomplete folders (an interrupted earlier run's) go too."""
    if keep is None:
        return []
    doomed = remove_incomplete(output_dir)
    found = complete_checkpoints(output_dir)
    for path in found[: max(0, len(found) - keep + 1)]:
        shutil.rmtree(path)
        doomed.append(path)
    return doomed


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete what an interrupted run left half-written in `output_dir`: incomplete checkpoint
    folders and `.partial` files. Returns what it removed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = [path for path in list_checkpoints(root) if not is_complete(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    for path in sorted(root.rglob(f".*{PARTIAL_SUFFIX}")):
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write, renamed to `path` once the block ends.

    `path` is never seen half-written. On failure the temporary file is removed; when the cause
    was the disk (space, quota, file size limit) the error becomes an OSError with that errno and
    `path` as its filename, whatever the writing library raised.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        yield partial
        os.replace(partial, path)
    except Exception as error:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        code = disk_errno(error)
        if code is not None and not (isinstance(error, OSError) and error.errno == code and error.filename):
            raise OSError(code, os.strerror(code), str(path)) from error
        raise


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what caused it (`__cause__`, else `__context__`), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_errno(error: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when `error` (or what caused it) says the disk took no more bytes."""
    for link in error_chain(error):
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:
            return link.errno
        text = str(link).lower()
        for needle, code in _DISK_TEXT.items():
            if needle in text:
                return code
    return None


def write_state(path: Path, state: TrainerState, rng_before, config: dict) -> None:
    """Record progress (and the config that made it) next to accelerate's files. `rng_before` is
    torch's CPU state, or (torch's, Python's `random`) as `trainer.data.capture_rng` gives it."""
    payload = {**state.__dict__, "config": config}
    with atomic_file(path / STATE_FILE) as partial:
        partial.write_text(json.dumps(payload, indent=2))
    if rng_before is not None:
        torch_state, python_state = rng_before if isinstance(rng_before, tuple) else (rng_before, None)
        tensors = {"rng_before": torch_state.contiguous()}
        if python_state is not None:
            version, internal, gauss_next = python_state
            tensors["python_rng_before"] = torch.tensor([version, *internal], dtype=torch.int64)
            tensors["python_gauss_next"] = torch.tensor([float("nan") if gauss_next is None else gauss_next],
                                                        dtype=torch.float64)
        with atomic_file(path / RNG_FILE) as partial:
            save_file(tensors, str(partial))


def read_state(path: Path) -> tuple[TrainerState, tuple | None]:
    """Progress and the saved pre-batch random state, (torch's, Python's or None), None when the
    epoch was at a boundary."""
    payload = json.loads((path / STATE_FILE).read_text())
    state = TrainerState(**{k: payload[k] for k in TrainerState.__dataclass_fields__})
    rng_file = path / RNG_FILE
    if not rng_file.is_file():
        return state, None
    tensors = load_file(str(rng_file))
    python_state = None
    if "python_rng_before" in tensors:
        values = [int(v) for v in tensors["python_rng_before"].tolist()]
        gauss_next = float(tensors["python_gauss_next"][0])
        python_state = (values[0], tuple(values[1:]), None if math.isnan(gauss_next) else gauss_next)
    return state, (tensors["rng_before"], python_state)


def resume_point(state: TrainerState, rng_before) -> ResumePoint | None:
    """How the data sampler continues the interrupted epoch, if one was under way."""
    if state.epoch_seed is None or state.position == 0:
        return None
    return ResumePoint(
        seed=state.epoch_seed, position=state.position, rng_before=rng_before,
        rng_after=capture_rng() if rng_before is not None else None,
    )
