"""End to end with the SDXL family: a real API, a real worker, Redis and the database.

A tiny-SDXL job from upload to a LoRA that StableDiffusionXLPipeline loads; single-file
checkpoints of both families added while the service runs (admin API and loraq-admin) training
exactly as their folder form, SD and SDXL jobs in turn on one warm worker.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from support.service import FINAL, ROOT, read_sse, upload

OPTIONS = {"resolution": 32, "train_batch_size": 2, "seed": 0, "max_train_steps": 4}


@pytest.fixture
def service(settings, start_service, tiny_sdxl_model):
    """The API and one worker, with the demo model tiny-sdxl generated beside tiny-sd."""
    shutil.copytree(tiny_sdxl_model, settings.demo_dir("tiny-sdxl"))
    return start_service(settings)


def train(service, dataset_id: str, base_model: str, **options) -> dict:
    """Submit a job with the tiny options (and these); the queued job."""
    response = service.client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": base_model,
                                                      "options": {**OPTIONS, **options}})
    assert response.status_code == 201, response.text
    return response.json()


def finish(service, job: dict) -> dict:
    """Wait for the job to succeed; the finished job with its per-step `losses`."""
    done = service.wait_for(job["id"], FINAL, timeout=240)
    assert done["state"] == "succeeded", f"{done['error']}\n{service.tail()}"
    done["losses"] = [m["loss"] for m in service.client.get(f"/v1/jobs/{job['id']}/metrics").json()]
    return done


def test_tiny_sdxl_job_upload_submit_stream_artifacts(service, settings, tmp_path):
    # given the demo models, as GET /v1/models names them
    models = {m["name"]: m for m in service.client.get("/v1/models").json()}
    assert (models["tiny-sdxl"]["family"], models["tiny-sdxl"]["available"]) == ("sdxl", True)
    assert models["tiny-sd"]["family"] == "sd"
    dataset_id = upload(service, tmp_path)

    # when a tiny-SDXL job is submitted and its events followed live
    job = train(service, dataset_id, "tiny-sdxl", checkpointing_steps=2, learning_rate=5e-2,
                validation_prompt="a red circle", num_validation_images=1, validation_inference_steps=2)
    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")

    # then it ran as SDXL, step by step, and left both LoRA files, a checkpoint and a sample
    assert job["config"]["family"] == "sdxl" and job["total_steps"] == 4
    assert [e["data"]["state"] for e in events if e["event"] == "state"] == ["queued", "running", "succeeded"]
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [m["loss"] for m in service.client.get(f"/v1/jobs/{job['id']}/metrics").json()] == [s["loss"] for s in steps]
    artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors"} <= artifacts.keys()
    assert {a["kind"] for a in artifacts.values()} >= {"lora", "checkpoint", "sample"}
    download = service.client.get(f"/v1/jobs/{job['id']}/artifacts/pytorch_lora_weights.safetensors")
    assert hashlib.sha256(download.content).hexdigest() == artifacts["pytorch_lora_weights.safetensors"]["sha256"]

    # and the LoRA loads into StableDiffusionXLPipeline and changes its output
    lora_dir = tmp_path / "downloaded"
    lora_dir.mkdir()
    (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(download.content)
    pipeline = StableDiffusionXLPipeline.from_pretrained(settings.demo_dir("tiny-sdxl"))
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipeline.load_lora_weights(str(lora_dir))
    assert np.abs(render() - before).max() > 1e-4


@pytest.mark.parametrize("backend", ["sqlite"])  # the worker's and the registry's behaviour, not the database's
def test_single_files_added_at_run_time_and_sd_sdxl_jobs_on_one_warm_worker(service, settings, tmp_path):
    from trainer.tiny import write_single_file

    # given both demo pipelines saved as single-file checkpoints, added while the service runs:
    # the SD one through the admin API, the SDXL one with loraq-admin on the server
    sd_file = write_single_file(settings.demo_dir("tiny-sd"), tmp_path / "ckpt" / "my-sd.safetensors")
    sdxl_file = write_single_file(settings.demo_dir("tiny-sdxl"), tmp_path / "ckpt" / "my-sdxl.safetensors")
    added = service.client.post("/v1/models", json={"source": str(sd_file), "config": str(settings.demo_dir("tiny-sd"))})
    assert added.status_code == 201, added.text
    assert (added.json()["family"], added.json()["kind"]) == ("sd", "single_file")
    admin = subprocess.run([sys.executable, "-m", "loraq.admin", "models", "add", str(sdxl_file),
                            "--name", "my-xl", "--config", str(settings.demo_dir("tiny-sdxl"))],
                           cwd=ROOT, env=service.env, capture_output=True, text=True, timeout=60)
    assert admin.returncode == 0, admin.stderr
    models = {m["name"]: m for m in service.client.get("/v1/models").json()}
    assert (models["my-xl"]["family"], models["my-xl"]["kind"], models["my-xl"]["origin"]) == ("sdxl", "single_file", "added")

    # and a random .safetensors file is refused with a message
    random_file = tmp_path / "ckpt" / "random.safetensors"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    refused = service.client.post("/v1/models", json={"source": str(random_file)})
    assert refused.status_code == 422 and "not a safetensors file" in refused.json()["error"]["message"]

    # when the same options train each single file and its folder, SD and SDXL jobs in turn on the
    # one worker that was started before the models were added
    dataset_id = upload(service, tmp_path)
    jobs = {name: train(service, dataset_id, name) for name in ("tiny-sd", "tiny-sdxl", "my-sd", "my-xl")}
    done = {name: finish(service, job) for name, job in jobs.items()}

    # then one warm worker ran them all, one after the other, each as its family
    runs = list(done.values())
    assert len({job["worker"] for job in runs}) == 1 and len(service.workers) == 1 and service.worker.poll() is None
    assert all(b["started_at"] >= a["finished_at"] for a, b in zip(runs, runs[1:]))
    assert [job["config"]["family"] for job in runs] == ["sd", "sdxl", "sd", "sdxl"]
    # and each file trains with exactly its folder's losses
    assert done["my-sd"]["losses"] == pytest.approx(done["tiny-sd"]["losses"], rel=1e-5, abs=1e-7)
    assert done["my-xl"]["losses"] == pytest.approx(done["tiny-sdxl"]["losses"], rel=1e-5, abs=1e-7)
    assert done["tiny-sd"]["losses"] != done["tiny-sdxl"]["losses"]
