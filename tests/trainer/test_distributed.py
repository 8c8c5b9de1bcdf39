"""Several processes (data parallel over gloo on the CPU, as `accelerate launch` does on GPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from trainer.sample_data import write_sample_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_train_one_lora_and_report_once(tiny_model, tmp_path):
    data = write_sample_dataset(tmp_path / "data", n_images=8, size=32)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer", "train",
        "--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(data),
        "--output_dir", str(out), "--max_train_steps", "4", "--resolution", "32",
        "--train_batch_size", "2", "--seed", "0", "--checkpointing_steps", "2", "--no-progress",
        "--device", "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    events = [json.loads(line) for line in result.stdout.splitlines()]
    start = events[0]
    assert start["type"] == "start" and start["data"]["total_batch_size"] == 4  # 2 per process x 2
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4], "only the main process reports"
    assert events[-1]["type"] == "done"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert load_file(str(out / "pytorch_lora_weights.safetensors"))
