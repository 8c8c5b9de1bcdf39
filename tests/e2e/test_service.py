"""End to end: a real uvicorn API, a real Celery worker process, the real Redis and database."""

from __future__ import annotations

import hashlib
import time

import httpx
import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from support.service import FINAL, read_sse, submit, upload


def test_upload_train_stream_and_download(service, settings, tmp_path):
    dataset_id = upload(service, tmp_path)
    job = submit(service, dataset_id, max_train_steps=12, checkpointing_steps=5, learning_rate=5e-2,
                 validation_prompt="a red circle", num_validation_images=1, validation_inference_steps=2,
                 validation_steps=6)
    assert job["state"] == "queued" and job["total_steps"] == 12

    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")

    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), "ids are gapless and ordered"
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert {e["event"] for e in events} >= {"checkpoint", "sample"}
    # Events arrived live, spread over the run, not in one burst at the end.
    step_times = [e["received"] for e in events if e["event"] == "step"]
    assert step_times[-1] - step_times[0] > 0.05

    metrics = service.client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["step"] for m in metrics] == [s["step"] for s in steps]
    assert [m["loss"] for m in metrics] == [s["loss"] for s in steps]

    finished = service.client.get(f"/v1/jobs/{job['id']}").json()
    assert finished["state"] == "succeeded" and finished["step"] == 12

    artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    lora = artifacts["pytorch_lora_weights.safetensors"]
    assert lora["kind"] == "lora"
    assert any(a["kind"] == "sample" for a in artifacts.values())
    assert any(a["kind"] == "checkpoint" for a in artifacts.values())
    download = service.client.get(f"/v1/jobs/{job['id']}/artifacts/pytorch_lora_weights.safetensors")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == lora["sha256"]
    assert len(download.content) == lora["size"]

    # Another owner's key, on the running service: the job, its download and its stream are 404.
    other = service.client.post("/v1/keys", json={"owner": "someone-else"}).json()["key"]
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {other}"}) as stranger:
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events",
                     f"/v1/jobs/{job['id']}/artifacts/pytorch_lora_weights.safetensors"):
            assert stranger.get(path).status_code == 404, path
        assert stranger.get("/v1/jobs").json()["total"] == 0

    lora_dir = tmp_path / "downloaded"
    lora_dir.mkdir()
    (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(download.content)
    pipeline = StableDiffusionPipeline.from_pretrained(settings.demo_model_dir, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("a red circle", num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipeline.load_lora_weights(str(lora_dir))
    assert np.abs(render() - before).max() > 1e-4


def test_cancel_then_next_job_then_retry_resumes(service, tmp_path):
    dataset_id = upload(service, tmp_path)
    long_job = submit(service, dataset_id, max_train_steps=150, checkpointing_steps=5, train_batch_size=1)
    short_job = submit(service, dataset_id, max_train_steps=3)

    deadline = time.monotonic() + 120
    while service.client.get(f"/v1/jobs/{long_job['id']}").json()["step"] < 6:
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.1)
    asked = time.monotonic()
    response = service.client.post(f"/v1/jobs/{long_job['id']}/cancel")
    assert response.status_code == 200, response.text
    canceled = service.wait_for(long_job["id"], FINAL, timeout=30)
    assert canceled["state"] == "canceled"
    assert time.monotonic() - asked < 10, "cancel must take effect within 10 s"
    stopped_at = canceled["step"]
    assert stopped_at < 150

    # The same worker goes on to the next job.
    done = service.wait_for(short_job["id"], FINAL)
    assert done["state"] == "succeeded" and done["worker"] == canceled["worker"]

    response = service.client.post(f"/v1/jobs/{long_job['id']}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "queued" and response.json()["attempt"] == 2
    resumed = service.wait_for(long_job["id"], FINAL, timeout=180)
    assert resumed["state"] == "succeeded" and resumed["step"] == 150

    metrics = service.client.get(f"/v1/jobs/{long_job['id']}/metrics").json()
    assert [m["step"] for m in metrics] == list(range(1, 151)), "one loss per step, no gap, no repeat"
    events = read_sse(service.client, f"/v1/jobs/{long_job['id']}/events")
    running = [i for i, e in enumerate(events) if e["event"] == "state" and e["data"]["state"] == "running"]
    assert len(running) == 2
    first_resumed_step = next(e["data"]["step"] for e in events[running[1]:] if e["event"] == "step")
    assert first_resumed_step > 1, "the retry resumed from a checkpoint instead of starting over"
    assert (first_resumed_step - 1) % 5 == 0 and first_resumed_step - 1 <= stopped_at
