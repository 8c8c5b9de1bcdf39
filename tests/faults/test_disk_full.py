"""Faults: the disk fills up while a job writes a checkpoint.

The jobs folder (`<data_dir>/jobs`, where every attempt writes) is a 400 KiB tmpfs in a private
mount namespace that the API and the worker run in; the database, the datasets and the uploads
are elsewhere. One checkpoint of the tiny model takes about 252 KiB, so checkpoint-10 fits and
checkpoint-20 runs out of space halfway (in torch's write of optimizer.bin, which says only
"unexpected pos 64 vs 0").
"""

from __future__ import annotations

import pytest

from faults.checks import (
    assert_artifacts, assert_finished, checkpoint_loras, final_loras, logs, metric_steps,
)
from support.service import FINAL, submit, upload

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # the database does not sit on the small disk

DISK_SIZE = "400k"


def test_full_disk_during_a_checkpoint_fails_the_job_and_the_worker_runs_the_next(
        settings, small_disk, start_service_on, scratch, footprint):
    jobs_dir = settings.data_dir / "jobs"
    disk = small_disk(jobs_dir, DISK_SIZE)
    service = start_service_on(settings, disk)
    worker_pid = service.worker.pid
    dataset_id = upload(service, scratch)

    job = submit(service, dataset_id, max_train_steps=30, checkpointing_steps=10)
    done = service.wait_for(job["id"], FINAL, timeout=120)

    # Failed (not running, not requeued) with a message that names the disk and the file.
    context = f"{disk.free_bytes()} bytes free\n{service.tail()}"
    assert_finished(done, "failed", 20, attempt=1, context=context)
    assert done["error"].startswith("no space left on device while writing checkpoint-20/"), done["error"]
    assert metric_steps(service, job["id"]) == list(range(1, 21))
    # Only what was written whole is registered: checkpoint-10's LoRA and the log.
    assert_artifacts(service, job["id"], checkpoint_loras(10) | logs(1))
    # The half-written checkpoint-20 is gone; checkpoint-10 stays for a retry to resume from.
    attempt_dir = disk.view(jobs_dir / job["id"] / "attempt-1")
    assert sorted(p.name for p in attempt_dir.iterdir()) == ["checkpoint-10", "train.log"], context
    assert not list(attempt_dir.rglob("*.partial"))

    # The same worker runs the next job, in the space the half-written checkpoint took.
    after = submit(service, dataset_id, max_train_steps=2)
    finished = service.wait_for(after["id"], FINAL, timeout=60)
    assert_finished(finished, "succeeded", 2, attempt=1, context=service.tail())
    assert_artifacts(service, after["id"], final_loras() | logs(1))
    assert service.worker.poll() is None and service.worker.pid == worker_pid, "the worker kept running"
    assert "job.worker_error" not in (service.logs / "worker-1.log").read_text()
    footprint.assert_clean()
