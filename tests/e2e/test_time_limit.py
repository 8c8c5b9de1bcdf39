"""LORAQ_MAX_JOB_SECONDS against the running service: a job past its wall-clock limit checkpoints
at its next step, fails with a message saying so, keeps its checkpoints, and a retry resumes from
the last one."""

from __future__ import annotations

import hashlib
import re

import pytest

from loraq import storage
from support.service import FINAL, submit, upload
from trainer.checkpoints import complete_checkpoints

LIMIT_S = 3


@pytest.mark.parametrize("backend", ["sqlite"])  # the worker's timing; the failure is recorded as any other


def test_a_job_past_its_wall_clock_limit_fails_and_keeps_its_checkpoints(settings, start_service, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("LORAQ_MAX_JOB_SECONDS", str(LIMIT_S))  # the service's processes read it
    service = start_service(settings)
    dataset_id = upload(service, tmp_path)
    # Far more steps than 3 s allow (a tiny-model step takes a few hundredths of a second).
    job = submit(service, dataset_id, max_train_steps=20000, checkpointing_steps=7)

    failed = service.wait_for(job["id"], FINAL, timeout=120)

    assert failed["state"] == "failed", service.tail()
    stopped_at = int(re.search(r"stopped at step (\d+)", failed["error"]).group(1))
    assert failed["error"] == (f"the job ran past this server's wall-clock limit of {LIMIT_S} s per attempt "
                               f"(LORAQ_MAX_JOB_SECONDS); stopped at step {stopped_at} with "
                               f"checkpoint-{stopped_at} kept, so a retry resumes from it")
    assert 0 < stopped_at < 20000 and failed["step"] == stopped_at
    # The checkpoint at the step it stopped on is complete on disk and listed, and downloads intact;
    # the scheduled ones before it stay too.
    on_disk = [path.name for path in complete_checkpoints(storage.attempt_dir(settings, job["id"], 1))]
    assert on_disk[-1] == f"checkpoint-{stopped_at}"
    assert on_disk[:-1] == [f"checkpoint-{n}" for n in range(7, stopped_at, 7)]
    artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    last = artifacts[f"checkpoint-{stopped_at}/pytorch_lora_weights.safetensors"]
    assert last["kind"] == "checkpoint" and last["step"] == stopped_at
    body = service.client.get(f"/v1/jobs/{job['id']}/artifacts/checkpoint-{stopped_at}/"
                              "pytorch_lora_weights.safetensors").content
    assert hashlib.sha256(body).hexdigest() == last["sha256"]
    events = service.client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["step"] for m in events] == list(range(1, stopped_at + 1))

    # A retry resumes from that checkpoint (and, with a new attempt's time, runs out again later).
    assert service.client.post(f"/v1/jobs/{job['id']}/retry").status_code == 200
    again = service.wait_for(job["id"], FINAL, timeout=120)
    assert again["state"] == "failed" and again["attempt"] == 2
    assert "LORAQ_MAX_JOB_SECONDS" in again["error"] and again["step"] > stopped_at
    metrics = service.client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert metrics[stopped_at]["step"] == stopped_at + 1  # the new attempt's steps follow the checkpoint
