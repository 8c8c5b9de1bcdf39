"""An exponential moving average of the LoRA weights (`use_ema`, `ema_decay`).

Only the LoRA parameters are averaged (a few MB), in fp32 beside the trained ones: after each
optimizer step, ema = decay * ema + (1 - decay) * weight. The average is written as a second
LoRA file, `pytorch_lora_weights_ema.safetensors`, beside the plain one (the run's and each
checkpoint's), by swapping the averaged values into the model for the family's own LoRA writer:
the file has the same keys and format and loads into the pipeline the same way. A checkpoint
also holds the averages as they are (`ema_state.safetensors`), so a resumed run continues them
exactly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMA_WEIGHTS_NAME = "pytorch_lora_weights_ema.safetensors"
EMA_STATE_FILE = "ema_state.safetensors"


class LoraEMA:
    """The moving average of a fixed list of parameters."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.parameters]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values in (after an optimizer step)."""
        for average, parameter in zip(self.shadow, self.parameters):
            average.lerp_(parameter.detach().float(), 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in the model's parameters for the block; the trained values after it."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for average, parameter in zip(self.shadow, self.parameters):
                parameter.copy_(average.to(parameter.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for value, parameter in zip(saved, self.parameters):
                    parameter.copy_(value)

    def save_lora(self, folder: Path, write_lora: Callable[[Path], Path]) -> Path:
        """Write the averaged LoRA into `folder` as EMA_WEIGHTS_NAME; `write_lora(dir)` is the
        family's writer of the plain file, run on a scratch folder with the averages applied."""
        folder = Path(folder)
        scratch = Path(tempfile.mkdtemp(prefix=".ema-", dir=folder))
        try:
            with self.applied():
                written = write_lora(scratch)
            os.replace(written, folder / EMA_WEIGHTS_NAME)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return folder / EMA_WEIGHTS_NAME

    def save_state(self, folder: Path) -> None:
        tensors = {f"shadow.{index}": value.contiguous() for index, value in enumerate(self.shadow)}
        tensors["updates"] = torch.tensor([self.updates], dtype=torch.int64)
        partial = Path(folder) / f".{EMA_STATE_FILE}.partial"
        save_file(tensors, str(partial))
        os.replace(partial, Path(folder) / EMA_STATE_FILE)

    def load_state(self, folder: Path) -> bool:
        """Continue the averages a checkpoint saved; False (averages start from the resumed
        weights) when it has none, e.g. use_ema was turned on only now."""
        path = Path(folder) / EMA_STATE_FILE
        if not path.is_file():
            self.shadow = [p.detach().float().clone() for p in self.parameters]
            return False
        tensors = load_file(str(path))
        if len([k for k in tensors if k.startswith("shadow.")]) != len(self.shadow):
            raise ValueError(f"resume_from_checkpoint: {path} averages other LoRA parameters than this run trains")
        self.shadow = [tensors[f"shadow.{index}"].to(p.device) for index, p in enumerate(self.parameters)]
        self.updates = int(tensors["updates"][0])
        return True
