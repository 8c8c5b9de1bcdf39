"""The resume check every family's tests share: a run that crashes after a checkpoint and is
resumed ends where an uninterrupted run does (the same later losses, the same LoRA weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from trainer.events import Event
from trainer.loop import train


class Crash(RuntimeError):
    pass


def assert_resume_matches(make_config: Callable[..., object], tmp_path: Path, crash_step: int,
                          checkpoint_step: int) -> None:
    """`make_config(output_dir, **extra)` builds the run's config; the crash comes at `crash_step`."""
    full = train(make_config(tmp_path / "full"))

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == crash_step:
            raise Crash("simulated crash")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Crash):
        train(make_config(interrupted), crash)
    resumed = train(make_config(interrupted, resume_from_checkpoint="latest"))
    assert resumed.losses == pytest.approx(full.losses[checkpoint_step:], rel=1e-6)
    a, b = load_file(str(resumed.lora_path)), load_file(str(full.lora_path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
