"""Save now / sample now through the running service: POST /v1/jobs/{id}/checkpoint and /sample
reach the worker's training process, which saves and renders at its next step; the results are
recorded as artifacts like scheduled ones. Owner-scoped (404) and refused unless running (409)."""

from __future__ import annotations

import time

import httpx
import pytest

from support.service import submit, upload

# Nothing scheduled: whatever checkpoint or sample appears was asked for.
OPTIONS = {"max_train_steps": 5000, "checkpointing_steps": 100000, "validation_steps": 100000,
           "validation_prompt": "a red circle", "num_validation_images": 1, "validation_inference_steps": 2}


def wait_until(check, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("backend", ["sqlite"])  # the route and worker plumbing, not the database
def test_save_now_and_sample_now_on_a_running_job(service, tmp_path):
    job = submit(service, upload(service, tmp_path), **OPTIONS)
    job_path = f"/v1/jobs/{job['id']}"
    service.wait_for(job["id"], {"running"})
    wait_until(lambda: service.client.get(job_path).json()["step"] > 0, "the first step")

    # Another owner's key: 404, as for every job route.
    other = service.client.post("/v1/keys", json={"owner": "someone-else"}).json()["key"]
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {other}"}) as stranger:
        for action in ("checkpoint", "sample"):
            assert stranger.post(f"{job_path}/{action}").status_code == 404

    asked_at = service.client.get(job_path).json()["step"]
    for action in ("checkpoint", "sample"):
        answer = service.client.post(f"{job_path}/{action}")
        assert answer.status_code == 202, answer.text
        assert answer.json()["action"] == action

    def artifacts():
        listed = service.client.get(f"{job_path}/artifacts").json()
        kinds = {a["kind"] for a in listed}
        return listed if {"checkpoint", "sample"} <= kinds else None

    listed = wait_until(artifacts, "the checkpoint and the image")
    checkpoint = next(a for a in listed if a["kind"] == "checkpoint")
    sample = next(a for a in listed if a["kind"] == "sample")
    assert checkpoint["step"] >= asked_at and sample["step"] >= asked_at
    assert checkpoint["name"] == f"checkpoint-{checkpoint['step']}/pytorch_lora_weights.safetensors"
    assert service.client.get(f"{job_path}/artifacts/{checkpoint['name']}").status_code == 200
    image = service.client.get(f"{job_path}/artifacts/{sample['name']}")
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"

    # Once the job is no longer running: 409.
    assert service.client.post(f"{job_path}/cancel").status_code == 200
    service.wait_for(job["id"], {"canceled"})
    for action in ("checkpoint", "sample"):
        refused = service.client.post(f"{job_path}/{action}")
        assert refused.status_code == 409 and "canceled" in refused.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sample_now_needs_a_validation_prompt(service, tmp_path):
    job = submit(service, upload(service, tmp_path), max_train_steps=5000)
    service.wait_for(job["id"], {"running"})
    refused = service.client.post(f"/v1/jobs/{job['id']}/sample")
    assert refused.status_code == 409 and "validation_prompt" in refused.text
    assert service.client.post(f"/v1/jobs/{job['id']}/checkpoint").status_code == 202
    assert service.client.post("/v1/jobs/nope/checkpoint").status_code == 404
    service.client.post(f"/v1/jobs/{job['id']}/cancel")
    service.wait_for(job["id"], {"canceled"})


def test_validation_loss_is_stored_and_the_best_checkpoint_marked(service, tmp_path):
    # (both databases: a new column, migration 0008)
    dataset_id = upload(service, tmp_path)
    job = submit(service, dataset_id, max_train_steps=6, checkpointing_steps=2,
                 validation_split=0.25, learning_rate=5e-3, lr_warmup_steps=0)
    job_path = f"/v1/jobs/{job['id']}"
    assert service.wait_for(job["id"], {"succeeded", "failed"})["state"] == "succeeded", service.tail()

    metrics = service.client.get(f"{job_path}/metrics").json()
    measured = {m["step"]: m["validation_loss"] for m in metrics if m["validation_loss"] is not None}
    assert sorted(measured) == [2, 4, 6] and all(m["loss"] is not None for m in metrics)
    best_step = min(measured, key=lambda step: (measured[step], step))
    shown = service.client.get(job_path).json()
    assert shown["best_checkpoint"] == f"checkpoint-{best_step}/pytorch_lora_weights.safetensors"

    download = service.client.get(f"{job_path}/best_checkpoint", follow_redirects=True)
    direct = service.client.get(f"{job_path}/artifacts/{shown['best_checkpoint']}")
    assert download.status_code == 200 and download.content == direct.content

    other = submit(service, dataset_id, max_train_steps=2)
    service.wait_for(other["id"], {"succeeded", "failed"})
    assert service.client.get(f"/v1/jobs/{other['id']}").json()["best_checkpoint"] is None
    assert service.client.get(f"/v1/jobs/{other['id']}/best_checkpoint").status_code == 404


@pytest.mark.parametrize("backend", ["sqlite"])
def test_validation_data_dir_is_not_a_service_option(service, tmp_path):
    body = {"dataset_id": upload(service, tmp_path), "base_model": "tiny-sd",
            "options": {"resolution": 32, "validation_data_dir": "/etc"}}
    refused = service.client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and "validation_data_dir: filesystem paths are not accepted" in refused.text
