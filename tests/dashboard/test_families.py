"""The new-job form per model family, in a real browser (see conftest.py): the options offered are
the chosen model's family's, and a tiny-sdxl job submitted from the form trains to the end."""

from __future__ import annotations

import shutil

import pytest

from support.service import upload

STEPS = 4


@pytest.fixture
def service(settings, start_service, tiny_sdxl_model, tiny_flux_model, tiny_sd3_model):
    """The API and one worker, with the demo models tiny-sdxl, tiny-flux and tiny-sd3 beside tiny-sd."""
    for name, model in (("tiny-sdxl", tiny_sdxl_model), ("tiny-flux", tiny_flux_model), ("tiny-sd3", tiny_sd3_model)):
        shutil.copytree(model, settings.demo_dir(name))
    return start_service(settings)


def test_the_form_follows_the_family_and_submits_a_tiny_sdxl_job(service, browse, tmp_path, screenshots):
    dataset_id = upload(service, tmp_path)

    seen = browse("families.mjs", dataset_id=dataset_id, steps=STEPS)

    # the form offered SD's options for tiny-sd, SDXL's for tiny-sdxl, and said which family
    assert seen["sd"]["family"] == "sd" and seen["sdxl"]["family"] == "sdxl"
    assert "pretrained_vae_model_name_or_path" in seen["sdxl"]["options"]
    assert "pretrained_vae_model_name_or_path" not in seen["sd"]["options"]
    assert "family" not in seen["sd"]["options"] + seen["sdxl"]["options"]
    assert seen["sd"]["note"].startswith("Family: sd. Stable Diffusion 1.x/2.x")
    assert seen["sdxl"]["note"] == "Family: sdxl. Stable Diffusion XL: the options of `train_text_to_image_lora_sdxl.py`."
    # the values typed before the switch stayed, the quick preset's size for a tiny model too
    assert seen["kept"] == {"max_train_steps": str(STEPS), "rank": "2", "resolution": "32"}
    assert "Looks good: 4 steps at resolution 32" in seen["verdict"]

    # and the job the form submitted trained tiny-sdxl with those options; its page names the family
    job = service.client.get(f"/v1/jobs/{seen['job_id']}").json()
    assert (job["state"], job["base_model"], job["name"]) == ("succeeded", "tiny-sdxl", "sdxl from the form")
    assert (job["config"]["family"], job["config"]["rank"], job["config"]["max_train_steps"]) == ("sdxl", 2, STEPS)
    assert seen["facts"]["Family"] == "sdxl" and seen["facts"]["Base model"] == "tiny-sdxl"
    # the flow-matching families' forms: their own options, not the DDPM ones they refuse
    assert (seen["flux"]["family"], seen["sd3"]["family"]) == ("flux", "sd3")
    assert {"weighting_scheme", "guidance_scale", "max_sequence_length"} <= set(seen["flux"]["options"])
    assert {"weighting_scheme", "precondition_outputs"} <= set(seen["sd3"]["options"])
    assert "guidance_scale" not in seen["sd3"]["options"] and "precondition_outputs" not in seen["flux"]["options"]
    assert not {"snr_gamma", "noise_offset", "prediction_type"} & set(seen["flux"]["options"] + seen["sd3"]["options"])
    assert seen["flux"]["note"].startswith("Family: flux.") and seen["sd3"]["note"].startswith("Family: sd3.")
    assert {p.name for p in screenshots.iterdir()} >= {f"new-job-{f}-{size}.png" for f in ("sd", "sdxl", "flux", "sd3")
                                                       for size in ("laptop", "phone")}
