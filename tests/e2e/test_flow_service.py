"""End to end with the flow-matching families: a real API, a real worker, Redis and the database.

A tiny-Flux (dev-like: guidance embedding) and a tiny-SD3 job each from upload to a LoRA that
FluxPipeline / StableDiffusion3Pipeline loads and that changes the image; options that are
misspelled or mean nothing for the family are a 422 naming them, at submit time.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from support.service import FINAL, read_sse, upload

# max_sequence_length 32: T5 pads to it every step, and 512 tokens would only slow the test down.
OPTIONS = {"resolution": 32, "train_batch_size": 2, "seed": 0, "max_train_steps": 4, "max_sequence_length": 32,
           "learning_rate": 5e-2, "lr_warmup_steps": 0, "checkpointing_steps": 2}
PIPELINES = {"flux": ("tiny-flux", FluxPipeline), "sd3": ("tiny-sd3", StableDiffusion3Pipeline)}
# One of the scripts' weighting schemes each (the trainer tests run every scheme).
SCHEMES = {"flux": "logit_normal", "sd3": "mode"}


@pytest.fixture
def service(settings, start_service, tiny_flux_model, tiny_sd3_model):
    """The API and one worker, with the demo models tiny-flux and tiny-sd3 generated beside tiny-sd."""
    shutil.copytree(tiny_flux_model, settings.demo_dir("tiny-flux"))
    shutil.copytree(tiny_sd3_model, settings.demo_dir("tiny-sd3"))
    return start_service(settings)


def submit(service, dataset_id: str, base_model: str, path: str = "/v1/jobs", **options):
    return service.client.post(path, json={"dataset_id": dataset_id, "base_model": base_model,
                                           "options": {**OPTIONS, **options}})


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_tiny_flow_job_upload_submit_stream_artifacts_and_lora_loads(service, settings, tmp_path, family):
    name, pipeline_class = PIPELINES[family]
    # given the demo model, as GET /v1/models names it
    models = {m["name"]: m for m in service.client.get("/v1/models").json()}
    assert (models[name]["family"], models[name]["kind"], models[name]["available"]) == (family, "folder", True)
    dataset_id = upload(service, tmp_path)

    # when a job is submitted and its events followed live
    response = submit(service, dataset_id, name, weighting_scheme=SCHEMES[family],
                      validation_prompt="a red circle", num_validation_images=1, validation_inference_steps=2)
    assert response.status_code == 201, response.text
    job = response.json()
    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events", timeout=300)
    done = service.wait_for(job["id"], FINAL, timeout=300)

    # then it ran as its family, step by step, with the options given
    assert done["state"] == "succeeded", f"{done['error']}\n{service.tail()}"
    assert job["config"]["family"] == family and job["total_steps"] == 4
    assert job["config"]["weighting_scheme"] == SCHEMES[family]
    assert [e["data"]["state"] for e in events if e["event"] == "state"] == ["queued", "running", "succeeded"]
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(s["loss"]) for s in steps)
    metrics = service.client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["loss"] for m in metrics] == [s["loss"] for s in steps]
    # and left the diffusers LoRA, a checkpoint and a validation sample, each with its sha256
    artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert "pytorch_lora_weights.safetensors" in artifacts
    assert {a["kind"] for a in artifacts.values()} >= {"lora", "checkpoint", "sample"}
    download = service.client.get(f"/v1/jobs/{job['id']}/artifacts/pytorch_lora_weights.safetensors")
    assert hashlib.sha256(download.content).hexdigest() == artifacts["pytorch_lora_weights.safetensors"]["sha256"]

    # and the LoRA loads into the family's diffusers pipeline and changes its output
    lora_dir = tmp_path / "downloaded"
    lora_dir.mkdir()
    (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(download.content)
    pipeline = pipeline_class.from_pretrained(settings.demo_dir(name), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                        max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipeline.load_lora_weights(str(lora_dir))
    assert np.abs(render() - before).max() > 1e-4


@pytest.mark.parametrize("backend", ["sqlite"])  # validation at submit time, not the database's
def test_options_misspelled_or_meaningless_for_the_family_are_422_naming_them(service, tmp_path):
    dataset_id = upload(service, tmp_path)
    cases = [
        ("tiny-flux", {"weighting_scheme": "logit_norml"}, "weighting_scheme"),
        ("tiny-sd3", {"weighting_scheme": "sigma-sqrt"}, "weighting_scheme"),
        ("tiny-flux", {"snr_gamma": 5.0}, "snr_gamma is not an option of the flux family"),
        ("tiny-sd3", {"noise_offset": 0.1}, "noise_offset is not an option of the sd3 family"),
        ("tiny-flux", {"precondition_outputs": False}, "precondition_outputs"),  # SD3's, not Flux's
        ("tiny-sd3", {"guidance_scale": 3.5}, "guidance_scale"),                # Flux's, not SD3's
        ("tiny-sd", {"weighting_scheme": "logit_normal"}, "weighting_scheme"),  # no meaning for DDPM
    ]
    for base_model, options, expected in cases:
        for path in ("/v1/jobs/validate", "/v1/jobs"):
            response = submit(service, dataset_id, base_model, path=path, **options)
            assert response.status_code == 422, (base_model, options, response.text)
            assert expected in response.json()["error"]["message"], (base_model, options, response.text)
    # nothing was queued, and the same options spelled right are accepted
    assert service.client.get("/v1/jobs").json()["items"] == []
    for base_model, options in [("tiny-flux", {"weighting_scheme": "logit_normal", "guidance_scale": 1.0}),
                                ("tiny-sd3", {"weighting_scheme": "sigma_sqrt", "precondition_outputs": False})]:
        response = submit(service, dataset_id, base_model, path="/v1/jobs/validate", **options)
        assert response.status_code == 200, response.text
