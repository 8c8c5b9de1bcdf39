"""Writes that fail: a full disk named in the job's error, atomic files, incomplete checkpoints.

tests/faults/test_disk_full.py fills a real disk under a running service; these are the pieces.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from trainer import checkpoints
from trainer.model import LORA_WEIGHTS_NAME
from worker import child
from worker.runner import Outcome, run_job


def _checkpoint(root, step: int, complete: bool = True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "optimizer.bin").write_bytes(b"x" * 10)
    if complete:
        (path / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": step}))
        (path / LORA_WEIGHTS_NAME).write_bytes(b"lora")
    return path


def test_torch_short_write_on_a_full_disk_names_the_disk_and_the_file(tmp_path, monkeypatch):
    _checkpoint(tmp_path, 10)
    partial = _checkpoint(tmp_path, 20, complete=False) / "optimizer.bin"
    os.utime(partial, ns=(2**62, 2**62))  # the file written last
    (tmp_path / "train.log").write_text("log")
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(child, "free_bytes", lambda path: 0)
    message = child.write_failure_message(torch_error, tmp_path, tmp_path / "train.log")

    assert message.startswith("no space left on device while writing checkpoint-20/optimizer.bin (0 bytes free")
    monkeypatch.setattr(child, "free_bytes", lambda path: 10 << 30)  # plenty of space: not the disk's doing
    assert child.write_failure_message(torch_error, tmp_path) is None


def test_disk_errors_by_errno_or_text_and_others_left_alone(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint-5" / "unet_lora.safetensors"))
    assert child.write_failure_message(full, tmp_path).startswith(
        "no space left on device while writing checkpoint-5/unet_lora.safetensors")
    quota = RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert child.write_failure_message(quota, tmp_path).startswith("disk quota exceeded while writing")
    too_big = OSError(errno.EFBIG, "File too large", str(tmp_path / "lora_kohya.safetensors"))
    assert child.write_failure_message(too_big, tmp_path).startswith("file too large while writing lora_kohya")
    assert child.write_failure_message(ValueError("resolution: must be a positive multiple of 8"), tmp_path) is None


def test_atomic_file_leaves_the_old_file_or_the_new_one_never_a_part(tmp_path):
    target = tmp_path / "pytorch_lora_weights.safetensors"
    target.write_bytes(b"old")

    with pytest.raises(OSError) as raised, checkpoints.atomic_file(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    with checkpoints.atomic_file(target) as partial:
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_incomplete_checkpoints_are_never_resumed_and_are_removed(tmp_path):
    _checkpoint(tmp_path, 5)
    _checkpoint(tmp_path, 10, complete=False)  # killed or out of space while being written
    (tmp_path / f".{LORA_WEIGHTS_NAME}.partial").write_bytes(b"half")

    assert checkpoints.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-5"
    with pytest.raises(ValueError, match="incomplete"):
        (tmp_path / "checkpoint-10" / checkpoints.STATE_FILE).write_text("{}")
        checkpoints.resolve_checkpoint(tmp_path, "checkpoint-10")

    removed = checkpoints.remove_incomplete(tmp_path)

    assert sorted(p.name for p in removed) == [f".{LORA_WEIGHTS_NAME}.partial", "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_a_job_folder_that_cannot_be_created_fails_the_job(settings, make_job, store):
    job_id = make_job(2)
    (settings.data_dir / "jobs").write_text("not a folder")  # as a full or read-only disk would refuse it

    assert run_job(settings, job_id, 1) == Outcome.failed

    job = store.job(job_id)
    assert job.state == "failed" and job.error.startswith("cannot create the job's folder"), job.error
    assert job.lease_until is None
