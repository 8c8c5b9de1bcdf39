"""The trainer's CLI as two data-parallel processes (torch.distributed.run over gloo on the CPU,
as `accelerate launch` does on GPUs), for the families' multi-process tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_two_processes(model: Path, data: Path, out: Path, *options: str, steps: int = 3,
                        resolution: int = 32) -> list[dict]:
    """Run `python -m trainer train` on two ranks (batch 2 each, a checkpoint every 2 steps) and
    return the events rank 0 printed; the run must succeed."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer", "train",
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--output_dir", str(out), "--max_train_steps", str(steps), "--resolution", str(resolution),
        "--train_batch_size", "2", "--seed", "0", "--checkpointing_steps", "2", "--no-progress",
        "--device", "cpu", *options,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]
