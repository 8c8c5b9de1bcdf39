"""A training child of several processes (num_gpus > 1; gloo ranks on the CPU): a stop request
sent to rank 0 stops every rank after the same step, with one checkpoint; a rank that dies ends
the training with a reason instead of leaving rank 0 waiting in a collective."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from trainer.config import load_config
from trainer.sample_data import write_sample_dataset
from worker.child import TrainingProcess


def _process(tiny_model, tmp_path: Path, steps: int) -> TrainingProcess:
    data = write_sample_dataset(tmp_path / "data", n_images=4, size=32)
    config = load_config({"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(data),
                          "output_dir": str(tmp_path / "out"), "resolution": 32, "train_batch_size": 1,
                          "max_train_steps": steps, "checkpointing_steps": steps, "seed": 0, "device": "auto"},
                         "sd")
    (tmp_path / "out").mkdir()
    return TrainingProcess(config, tmp_path / "out" / "train.log", num_processes=2)


def _read_until(process: TrainingProcess, seen: list[dict], done, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done(seen) and not process.finished:
        assert time.monotonic() < deadline, seen
        seen.extend(process.poll(0.2))


def test_a_stop_sent_to_rank_0_stops_both_ranks_after_the_same_step(tiny_model, tmp_path):
    process = _process(tiny_model, tmp_path, steps=200)
    try:
        process.start()
        seen: list[dict] = []
        _read_until(process, seen, lambda s: any(e["type"] == "step" and e["step"] >= 2 for e in s))
        assert seen[0]["type"] == "start" and seen[0]["data"]["total_batch_size"] == 2  # two ranks of batch 1
        process.request_stop()
        _read_until(process, seen, lambda s: False)
    finally:
        process.close()
    assert process.exitcode == 0, (tmp_path / "out" / "train.log").read_text()[-3000:]
    stopped = [e for e in seen if e["type"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] < 200
    steps = [e["step"] for e in seen if e["type"] == "step"]
    assert steps == list(range(1, stopped[0]["step"] + 1)), "each step reported once, by rank 0"
    assert (tmp_path / "out" / f"checkpoint-{stopped[0]['step']}").is_dir()
    rank1 = (tmp_path / "out" / "train.rank1.log").read_text()
    assert "Traceback" not in rank1


def test_a_rank_that_dies_ends_the_training_with_its_reason(tiny_model, tmp_path):
    process = _process(tiny_model, tmp_path, steps=500)
    try:
        pid = process.start()
        seen: list[dict] = []
        _read_until(process, seen, lambda s: any(e["type"] == "step" for e in s))
        peers = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(peers) == 1  # rank 1, forked by rank 0 (no data loader processes here)
        os.kill(peers[0], signal.SIGKILL)
        _read_until(process, seen, lambda s: False, timeout=60)
    finally:
        process.close()
    assert process.exitcode == 1
    assert "rank 1 was killed by SIGKILL" in process.failure_reason()
