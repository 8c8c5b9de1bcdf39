"""Checkpoints: accelerate state (optimizer, scheduler, RNG) plus LoRA weights and where the
data order stood, so a resumed run continues exactly as an uninterrupted one."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.data import ResumePoint

STATE_FILE = "trainer_state.json"
RNG_FILE = "sampler_rng.safetensors"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """The folder to resume from: `latest` (None when there is none yet) or an explicit path."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a checkpoint of this trainer")
    return path


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Before saving a new checkpoint, delete the oldest so that `keep` remain afterwards."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - keep + 1)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def write_state(path: Path, state: TrainerState, rng_before: torch.Tensor | None, config: dict) -> None:
    """Record progress (and the config that made it) next to accelerate's files."""
    payload = {**state.__dict__, "config": config}
    (path / STATE_FILE).write_text(json.dumps(payload, indent=2))
    if rng_before is not None:
        save_file({"rng_before": rng_before.contiguous()}, str(path / RNG_FILE))


def read_state(path: Path) -> tuple[TrainerState, torch.Tensor | None]:
    """Progress and the saved pre-batch RNG state (None when the epoch was at a boundary)."""
    payload = json.loads((path / STATE_FILE).read_text())
    state = TrainerState(**{k: payload[k] for k in TrainerState.__dataclass_fields__})
    rng_file = path / RNG_FILE
    rng_before = load_file(str(rng_file))["rng_before"] if rng_file.is_file() else None
    return state, rng_before


def resume_point(state: TrainerState, rng_before: torch.Tensor | None) -> ResumePoint | None:
    """How the data sampler continues the interrupted epoch, if one was under way."""
    if state.epoch_seed is None or state.position == 0:
        return None
    return ResumePoint(
        seed=state.epoch_seed, position=state.position, rng_before=rng_before,
        rng_after=torch.get_rng_state() if rng_before is not None else None,
    )
