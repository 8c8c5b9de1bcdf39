"""/v1/models: each model's family, unsupported pipelines named, admins adding and removing base
models (folders, single-file checkpoints, refusals), and per-family validation at submit."""

from __future__ import annotations

import pytest

from support.models import SINGLE_FILE_KEYS, header_only_checkpoint, pipeline_folder


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def user_key(client) -> str:
    response = client.post("/v1/keys", json={"owner": "bob"})
    assert response.status_code == 201, response.text
    return response.json()["key"]


@pytest.fixture
def sdxl_folder(tmp_path):
    return pipeline_folder(tmp_path / "models" / "my-sdxl", "StableDiffusionXLPipeline")


def _models(client) -> dict[str, dict]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {item["name"]: item for item in response.json()}


def test_models_name_their_family_and_unsupported_pipelines(make_client, settings, tmp_path, sdxl_folder):
    # given LORAQ_MODELS with an SDXL folder, a PixArt folder and a folder that is no pipeline
    pixart = pipeline_folder(tmp_path / "models" / "pixart", "PixArtSigmaPipeline")
    empty = tmp_path / "models" / "empty"
    empty.mkdir()
    client = make_client(settings.model_copy(update={"models": [str(sdxl_folder), str(pixart), str(empty)]}))

    models = _models(client)

    assert (models["tiny-sd"]["family"], models["tiny-sd"]["available"], models["tiny-sd"]["origin"]) == ("sd", True, "demo")
    assert (models["my-sdxl"]["family"], models["my-sdxl"]["kind"], models["my-sdxl"]["origin"]) == ("sdxl", "folder", "settings")
    assert models["pixart"]["family"] is None and not models["pixart"]["available"]
    assert "PixArtSigmaPipeline is not a supported family (supported: sd, sdxl, flux, sd3)" in models["pixart"]["problem"]
    assert "no model_index.json" in models["empty"]["problem"]
    # the demo SDXL model is listed even before it is generated, and says why it cannot train
    assert models["tiny-sdxl"]["available"] is False and "no such folder" in models["tiny-sdxl"]["problem"]


def test_submitting_on_an_unsupported_pipeline_is_a_422_naming_it(make_client, settings, tmp_path, dataset_id):
    pixart = pipeline_folder(tmp_path / "models" / "pixart", "PixArtSigmaPipeline")
    client = make_client(settings.model_copy(update={"models": [str(pixart)]}))

    for path in ("/v1/jobs", "/v1/jobs/validate"):
        response = client.post(path, json={"dataset_id": dataset_id, "base_model": "pixart", "options": {}})

        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert message.startswith("base_model: 'pixart' cannot be trained here:")
        assert "PixArtSigmaPipeline is not a supported family" in message


def test_a_wrong_family_option_is_refused_at_submit(make_client, settings, sdxl_folder, dataset_id):
    client = make_client(settings.model_copy(update={"models": [str(sdxl_folder)]}))

    sd = client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                       "options": {"pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix"}})
    checked = client.post("/v1/jobs/validate", json={"dataset_id": dataset_id, "base_model": "my-sdxl",
                                                     "options": {"pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix"}})
    as_path = client.post("/v1/jobs/validate", json={"dataset_id": dataset_id, "base_model": "my-sdxl",
                                                     "options": {"pretrained_vae_model_name_or_path": str(sdxl_folder)}})

    assert sd.status_code == 422
    assert sd.json()["error"]["message"] == "pretrained_vae_model_name_or_path is not an option of the sd family"
    assert checked.status_code == 200, checked.text
    config = checked.json()["config"]
    assert config["family"] == "sdxl" and config["resolution"] == 1024  # the SDXL script's default
    assert as_path.status_code == 422 and "filesystem paths are not accepted" in as_path.json()["error"]["message"]


def test_a_family_option_that_disagrees_with_the_model_is_refused(client, dataset_id):
    response = client.post("/v1/jobs/validate", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                                      "options": {"family": "sdxl"}})

    assert response.status_code == 422 and response.json()["error"]["message"].startswith("family:")


def test_admin_adds_a_folder_that_jobs_may_then_name(client, sdxl_folder, dataset_id):
    # when an admin adds a folder while the service runs
    added = client.post("/v1/models", json={"source": str(sdxl_folder), "name": "xl-base"})

    assert added.status_code == 201, added.text
    assert (added.json()["family"], added.json()["origin"], added.json()["kind"]) == ("sdxl", "added", "folder")
    # then it is listed and a job may train on it, with the SDXL config
    assert _models(client)["xl-base"]["source"] == str(sdxl_folder.resolve())
    checked = client.post("/v1/jobs/validate", json={"dataset_id": dataset_id, "base_model": "xl-base",
                                                     "options": {"resolution": 32}})
    assert checked.status_code == 200 and checked.json()["config"]["family"] == "sdxl"
    # a second model of the same name is refused
    again = client.post("/v1/models", json={"source": str(sdxl_folder), "name": "xl-base"})
    clash = client.post("/v1/models", json={"source": str(sdxl_folder), "name": "tiny-sd"})
    assert again.status_code == 409 and clash.status_code == 409
    assert "already exists" in clash.json()["error"]["message"]


def test_admin_adds_a_single_file_with_its_family_config(client, tmp_path, sdxl_folder, dataset_id):
    checkpoint = header_only_checkpoint(tmp_path / "ckpt" / "juggernaut.safetensors", SINGLE_FILE_KEYS["sdxl"])
    sd_file = header_only_checkpoint(tmp_path / "ckpt" / "dreamshaper.safetensors", SINGLE_FILE_KEYS["sd"])

    without_config = client.post("/v1/models", json={"source": str(checkpoint)})
    wrong_config = client.post("/v1/models", json={"source": str(sd_file), "config": str(sdxl_folder)})
    added = client.post("/v1/models", json={"source": str(checkpoint), "config": str(sdxl_folder)})

    assert without_config.status_code == 422
    assert "needs its family's config folder" in without_config.json()["error"]["message"]
    assert wrong_config.status_code == 422
    assert "it is a pipeline of the sdxl family, but" in wrong_config.json()["error"]["message"]
    assert added.status_code == 201, added.text
    body = added.json()
    assert (body["name"], body["family"], body["kind"], body["config"]) == (
        "juggernaut", "sdxl", "single_file", str(sdxl_folder.resolve()))
    checked = client.post("/v1/jobs/validate", json={"dataset_id": dataset_id, "base_model": "juggernaut",
                                                     "options": {"resolution": 32}})
    assert checked.status_code == 200, checked.text
    assert checked.json()["config"]["family"] == "sdxl" and "pretrained_config_dir" not in checked.json()["config"]


def test_a_single_file_takes_its_family_config_from_the_settings(make_client, settings, tmp_path, sdxl_folder):
    client = make_client(settings.model_copy(update={"model_configs": {"sdxl": str(sdxl_folder)}}))
    checkpoint = header_only_checkpoint(tmp_path / "ckpt" / "pony.safetensors", SINGLE_FILE_KEYS["sdxl"])

    added = client.post("/v1/models", json={"source": str(checkpoint)})

    assert added.status_code == 201, added.text
    assert added.json()["config"] == str(sdxl_folder.resolve())


def test_single_files_in_loraq_models(make_client, settings, tmp_path, sdxl_folder):
    checkpoint = header_only_checkpoint(tmp_path / "ckpt" / "animagine.safetensors", SINGLE_FILE_KEYS["sdxl"])
    sd_file = header_only_checkpoint(tmp_path / "ckpt" / "realistic.safetensors", SINGLE_FILE_KEYS["sd"])
    client = make_client(settings.model_copy(update={"models": [str(checkpoint), str(sd_file)],
                                                     "model_configs": {"sdxl": str(sdxl_folder)}}))

    models = _models(client)

    assert (models["animagine"]["family"], models["animagine"]["kind"], models["animagine"]["available"]) == (
        "sdxl", "single_file", True)
    assert models["animagine"]["config"] == str(sdxl_folder.resolve())
    # an SD file with no SD config folder is listed with what it needs, and a job on it is refused
    assert (models["realistic"]["family"], models["realistic"]["available"]) == ("sd", False)
    assert "LORAQ_MODEL_CONFIGS=sd=FOLDER" in models["realistic"]["problem"]


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: d.joinpath("random.safetensors").write_bytes(bytes(range(256)) * 8) and d / "random.safetensors",
     "not a safetensors file"),
    (lambda d: header_only_checkpoint(d / "lora.safetensors", ["lora_unet_down_blocks_0.alpha"]),
     "a LoRA adapter, not a base model"),
    (lambda d: header_only_checkpoint(d / "vae.safetensors", ["encoder.conv_in.weight"]),
     "not a diffusion checkpoint: no UNet keys"),
    (lambda d: header_only_checkpoint(d / "auraflow.safetensors", ["double_layers.0.attn.w1q.weight"]),
     "AuraFlow checkpoint, not a supported family"),
    (lambda d: d.joinpath("model.ckpt").write_bytes(b"PK\x03\x04") and d / "model.ckpt",
     "only single-file .safetensors checkpoints are accepted"),
    (lambda d: d / "missing.safetensors", "no such folder or file"),
    (lambda d: pipeline_folder(d / "pixart", "PixArtSigmaPipeline"), "PixArtSigmaPipeline is not a supported family"),
    (lambda d: "nobody/not-cached", "not in the local Hugging Face cache"),
    (lambda d: "x" * 900, "no such folder or file"),  # too long for the filesystem: still a 422
    (lambda d: "~nosuchuser/model", "no such folder or file"),
], ids=["random-bytes", "lora", "vae-only", "auraflow-file", "ckpt", "missing", "pixart-folder", "hub-not-cached",
        "name-too-long", "unknown-home"])
def test_adding_what_is_no_base_model_is_refused_with_a_message(client, tmp_path, make, expected):
    source = make(tmp_path)

    response = client.post("/v1/models", json={"source": str(source)})

    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("source: ") and expected in message
    assert str(source).rsplit("/", 1)[-1] in message  # the message names what was refused


def test_only_admins_add_or_remove_models(client, user_key, sdxl_folder):
    as_user = client.post("/v1/models", json={"source": str(sdxl_folder)}, headers=_as(user_key))
    listed = client.get("/v1/models", headers=_as(user_key))
    assert client.post("/v1/models", json={"source": str(sdxl_folder)}).status_code == 201
    removed_by_user = client.delete("/v1/models/my-sdxl", headers=_as(user_key))

    assert as_user.status_code == 403 and removed_by_user.status_code == 403
    assert listed.status_code == 200 and "my-sdxl" not in {m["name"] for m in listed.json()}
    assert "my-sdxl" in _models(client)


def test_removing_models(client, submit, sdxl_folder, tmp_path):
    assert client.post("/v1/models", json={"source": str(sdxl_folder), "name": "org/xl"}).status_code == 201
    in_use = pipeline_folder(tmp_path / "other-sd", "StableDiffusionPipeline")
    assert client.post("/v1/models", json={"source": str(in_use)}).status_code == 201
    queued = submit({"resolution": 32}, base_model="other-sd")
    assert queued.status_code == 201, queued.text

    demo = client.delete("/v1/models/tiny-sd")
    busy = client.delete("/v1/models/other-sd")
    unknown = client.delete("/v1/models/nothing")
    removed = client.delete("/v1/models/org/xl")

    assert demo.status_code == 409 and "comes from the settings" in demo.json()["error"]["message"]
    assert busy.status_code == 409 and queued.json()["id"] in busy.json()["error"]["message"]
    assert unknown.status_code == 404
    assert removed.status_code == 204 and "org/xl" not in _models(client)
    refused = submit({"resolution": 32}, base_model="org/xl")
    assert refused.status_code == 422 and "unknown base model 'org/xl'" in refused.json()["error"]["message"]


def test_the_options_form_schema_is_per_family(client):
    sd = client.get("/dashboard/options.json?family=sd").json()
    sdxl = client.get("/dashboard/options.json?family=sdxl").json()
    flux = client.get("/dashboard/options.json?family=flux").json()
    sd3 = client.get("/dashboard/options.json?family=sd3").json()
    unknown = client.get("/dashboard/options.json?family=pixart")

    assert (sd["family"], sdxl["family"]) == ("sd", "sdxl")
    assert "train_text_to_image_lora_sdxl.py" in sdxl["description"]  # the family config's own words
    assert "pretrained_vae_model_name_or_path" in sdxl["properties"]
    assert "pretrained_vae_model_name_or_path" not in sd["properties"]
    assert sdxl["properties"]["resolution"]["default"] == 1024 and sd["properties"]["resolution"]["default"] == 512
    # the flow-matching families offer their own options and not the DDPM ones they refuse
    assert (flux["family"], sd3["family"]) == ("flux", "sd3")
    assert {"weighting_scheme", "guidance_scale", "max_sequence_length"} <= flux["properties"].keys()
    assert {"weighting_scheme", "precondition_outputs"} <= sd3["properties"].keys()
    assert "guidance_scale" not in sd3["properties"] and "precondition_outputs" not in flux["properties"]
    assert not {"snr_gamma", "noise_offset", "prediction_type"} & (flux["properties"].keys() | sd3["properties"].keys())
    for schema in (sd, sdxl, flux, sd3):  # what the service or the model decides is not a form field
        assert not {"family", "pretrained_model_name_or_path", "pretrained_config_dir"} & schema["properties"].keys()
    assert unknown.status_code == 404
