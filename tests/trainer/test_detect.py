"""trainer.detect: a base model's family from its files alone (no torch, nothing loaded)."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from support.models import SINGLE_FILE_KEYS, header_only_checkpoint, pipeline_folder
from trainer import detect
from trainer.detect import ModelNotFound, UnsupportedModel, detect_family, inspect_model

# Transformer single files: BFL's Flux layout (dev has guidance_in) bare, and ComfyUI's under
# model.diffusion_model.; SD3 as Stability ships it, with its VAE and text encoders beside.
FLUX_FILE_KEYS = ["double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight",
                  "guidance_in.in_layer.weight", "img_in.weight"]
COMFY_FLUX_FILE_KEYS = ["model.diffusion_model." + key for key in FLUX_FILE_KEYS]
SD3_FILE_KEYS = ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
                 "first_stage_model.encoder.conv_in.weight", "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"]


def test_pipeline_folders(tiny_model, tmp_path):
    assert detect_family(tiny_model) == "sd"
    assert detect_family(pipeline_folder(tmp_path / "xl", "StableDiffusionXLPipeline")) == "sdxl"
    with pytest.raises(UnsupportedModel, match=r"pixart: PixArtSigmaPipeline is not a supported family \(supported: sd, sdxl"):
        detect_family(pipeline_folder(tmp_path / "pixart", "PixArtSigmaPipeline"))
    with pytest.raises(UnsupportedModel, match="not a diffusers pipeline folder"):
        detect_family(tmp_path)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_files_by_their_keys(tmp_path, family):
    path = header_only_checkpoint(tmp_path / "model.safetensors", SINGLE_FILE_KEYS[family])

    info = inspect_model(path)

    assert (info.family, info.kind, info.path) == (family, "single_file", str(path))


def test_sd2_single_file(tmp_path):
    keys = ["model.diffusion_model.x", "first_stage_model.y", "cond_stage_model.model.token_embedding.weight"]
    assert detect_family(header_only_checkpoint(tmp_path / "v2.safetensors", keys)) == "sd"


@pytest.mark.parametrize(("keys", "message"), [
    ([], "holds no tensors"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "a LoRA adapter"),
    (["first_stage_model.encoder.conv_in.weight"], "no UNet keys"),
    (["model.diffusion_model.x", "conditioner.embedders.0.model.text_projection", "first_stage_model.y"], "an SDXL refiner"),
    (["model.diffusion_model.x", "first_stage_model.y"], "no text encoder keys"),
    (SINGLE_FILE_KEYS["sdxl"][:1] + SINGLE_FILE_KEYS["sdxl"][2:], "no VAE keys"),
])
def test_single_files_that_are_no_full_checkpoint(tmp_path, keys, message):
    with pytest.raises(UnsupportedModel, match=message):
        detect_family(header_only_checkpoint(tmp_path / "x.safetensors", keys))


def test_files_that_are_not_safetensors(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    not_json = tmp_path / "text.safetensors"
    not_json.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\x00\x01")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"PK")

    for path, message in [(short, "only 3 bytes"), (huge_header, "a header of 1000000000000 bytes"),
                          (not_json, "its header is not JSON"), (pickle, ".ckpt files are pickles")]:
        with pytest.raises(UnsupportedModel, match=message):
            detect_family(path)


def test_missing_sources(tmp_path):
    with pytest.raises(ModelNotFound, match="no such folder or file"):
        detect_family(tmp_path / "nothing.safetensors")
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        detect_family("nobody/nothing-here")
    for name in ("x" * 900, f"/{'x' * 300}/model.safetensors", "~nosuchuser/model"):  # no OSError escapes
        with pytest.raises(ModelNotFound, match="no such folder or file"):
            detect_family(name)


def test_a_cached_hub_id(tmp_path, tiny_model, monkeypatch):
    # the hub cache's layout: models--org--name/refs/main -> snapshots/<commit>/...
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text((tiny_model / "model_index.json").read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = ("from trainer.detect import inspect_model; i = inspect_model('org/tiny'); "
            "print(i.family, i.kind, i.path)")

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.split() == ["sd", "hub", str(snapshot)]


def test_detect_imports_no_torch():
    code = "import sys, trainer.detect; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_flux_and_sd3_are_recognised_and_reported_once_supported(tmp_path, monkeypatch):
    flux = pipeline_folder(tmp_path / "flux", "FluxPipeline")
    sd3 = pipeline_folder(tmp_path / "sd3", "StableDiffusion3Pipeline")
    files = {"flux": [header_only_checkpoint(tmp_path / "flux.safetensors", FLUX_FILE_KEYS),
                      header_only_checkpoint(tmp_path / "comfy-flux.safetensors", COMFY_FLUX_FILE_KEYS)],
             "sd3": [header_only_checkpoint(tmp_path / "sd3.safetensors", SD3_FILE_KEYS)]}

    # While the trainer has no such family, each is refused by name, never taken for sd/sdxl.
    monkeypatch.setattr(detect, "FAMILY_NAMES", ("sd", "sdxl"))
    with pytest.raises(UnsupportedModel, match=r"FluxPipeline is not a supported family \(supported: sd, sdxl\)"):
        detect_family(flux)
    with pytest.raises(UnsupportedModel, match="StableDiffusion3Pipeline is not a supported family"):
        detect_family(sd3)
    for path in files["flux"]:
        with pytest.raises(UnsupportedModel, match="a FLUX checkpoint, not a supported family"):
            detect_family(path)
    with pytest.raises(UnsupportedModel, match="a Stable Diffusion 3 checkpoint, not a supported family"):
        detect_family(files["sd3"][0])

    # Registered, they are their families; their single files too once the family's loader takes them.
    monkeypatch.setattr(detect, "FAMILY_NAMES", ("sd", "sdxl", "flux", "sd3"))
    monkeypatch.setattr(detect, "SINGLE_FILE_FAMILIES", ("sd", "sdxl"))
    assert inspect_model(flux) == detect.ModelInfo("flux", "folder", str(flux))
    assert detect_family(sd3) == "sd3"
    for family, paths in files.items():
        for path in paths:
            with pytest.raises(UnsupportedModel, match=f"single-file checkpoint; the {family} family trains from a "
                                                       "diffusers pipeline folder"):
                detect_family(path)
    monkeypatch.undo()  # as shipped: every family takes single files
    assert set(detect.SINGLE_FILE_FAMILIES) == set(detect.FAMILY_NAMES)
    for family, paths in files.items():
        for path in paths:
            assert inspect_model(path) == detect.ModelInfo(family, "single_file", str(path))
    # A Flux LoRA (kohya names hold double_blocks too) is still no base model.
    lora = header_only_checkpoint(tmp_path / "lora.safetensors", ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    with pytest.raises(UnsupportedModel, match="a LoRA adapter"):
        detect_family(lora)


def test_the_tiny_flow_pipelines_are_their_families(tiny_flux_model, tiny_sd3_model):
    assert inspect_model(tiny_flux_model) == detect.ModelInfo("flux", "folder", str(tiny_flux_model))
    assert inspect_model(tiny_sd3_model) == detect.ModelInfo("sd3", "folder", str(tiny_sd3_model))


def test_supported_families_are_recognised_ones():
    assert set(detect.SINGLE_FILE_FAMILIES) <= set(detect.FAMILY_NAMES) <= set(detect.KNOWN_FAMILIES)
    assert set(detect.PIPELINE_FAMILIES.values()) == set(detect.KNOWN_FAMILIES)
