"""The family interface: the registry, per-family configs, the SD family's hooks, the tiny models."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from trainer.config import CommonConfig, ConfigError, SDXLConfig, TrainConfig, config_model, load_config
from trainer.families import FAMILIES, Conditioning, Family, get_family
from trainer.loop import setup
from trainer.sample_data import write_sample_dataset

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"pretrained_model_name_or_path": "model", "train_data_dir": "data"}

# train_text_to_image_lora_sdxl.py's argparse defaults that differ from, or are new beside, the SD script's.
SDXL_SCRIPT_DEFAULTS = {"resolution": 1024, "pretrained_vae_model_name_or_path": None, "rank": 4,
                        "train_batch_size": 16, "learning_rate": 1e-4, "lr_scheduler": "constant",
                        "lr_warmup_steps": 500, "max_grad_norm": 1.0, "train_text_encoder": False}


def test_registry_names_the_detectable_families():
    from trainer.detect import FAMILY_NAMES

    assert tuple(FAMILIES) == FAMILY_NAMES == ("sd", "sdxl", "flux", "sd3")
    for name, family in FAMILIES.items():
        assert get_family(name) is family and family.name == name
        assert family.config_model is config_model(name)
    with pytest.raises(ConfigError, match="'pixart' is not a supported family"):
        get_family("pixart")
    with pytest.raises(ConfigError, match="family: 'pixart' is not a supported family"):
        config_model("pixart")


def test_every_family_implements_the_interface():
    abstract = [name for name, member in vars(Family).items()
                if inspect.isfunction(member) and "raise NotImplementedError" in inspect.getsource(member)]
    assert {"load", "image_transform", "dataset", "tokenize", "encode_text", "predict"} <= set(abstract)
    for family in FAMILIES.values():
        missing = [name for name in abstract if getattr(type(family), name) is getattr(Family, name)]
        assert not missing, f"{family.name} lacks {missing}"


def test_configs_per_family_record_their_family_and_defaults():
    assert config_model("sd") is TrainConfig and config_model("sdxl") is SDXLConfig
    assert load_config(REQUIRED).family == "sd"  # the old call keeps meaning SD
    sdxl = load_config(REQUIRED, "sdxl")
    assert {name: getattr(sdxl, name) for name in SDXL_SCRIPT_DEFAULTS} == SDXL_SCRIPT_DEFAULTS
    assert load_config({**REQUIRED, "family": "sdxl"}).family == "sdxl"  # a stored config says its family
    with pytest.raises(ConfigError, match="family"):
        load_config({**REQUIRED, "family": "sdxl"}, "sd")
    with pytest.raises(ConfigError, match="family"):
        load_config({**REQUIRED, "family": "sd"}, "sdxl")  # the Literal refuses another name too
    # Each schema is its family's form: the field exists only where it means something.
    assert "pretrained_vae_model_name_or_path" in config_model("sdxl").model_json_schema()["properties"]
    assert "pretrained_vae_model_name_or_path" not in config_model("sd").model_json_schema()["properties"]
    for model in (TrainConfig, SDXLConfig):
        assert issubclass(model, CommonConfig)
        assert model.model_json_schema()["properties"]["family"]["default"] == model.model_fields["family"].default
    # A typo stays a typo, an option of another family says so.
    with pytest.raises(ConfigError) as error:
        load_config({**REQUIRED, "pretrained_vae_model_name_or_path": "v", "learning_rat": 1})
    assert str(error.value) == ("pretrained_vae_model_name_or_path is not an option of the sd family; "
                                "learning_rat: unknown option")


def test_conditioning_slices_every_tensor():
    conditioning = Conditioning(a=torch.arange(6).view(3, 2), b=torch.arange(3.0, requires_grad=True))
    part = conditioning[1:]
    assert isinstance(part, Conditioning) and part["a"].tolist() == [[2, 3], [4, 5]]
    assert part["b"].tolist() == [1.0, 2.0]
    assert not conditioning.detach()["b"].requires_grad


def test_sd_hooks_give_the_text_encoder_output_and_the_vae_posterior(tiny_model, tmp_path):
    data = write_sample_dataset(tmp_path / "data", n_images=2, size=32)
    config = load_config({"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(data),
                          "output_dir": str(tmp_path / "out"), "resolution": 32, "train_batch_size": 2,
                          "cache_latents": False, "seed": 0})
    run = setup(config)
    family, components = run.family, run.components
    batch = next(iter(run.dataloader))
    with torch.no_grad():
        text = family.encode_text(components, batch)
        expected = components.text_encoder(batch["input_ids"], return_dict=False)[0]
        params = family.encode_image_params(components, batch["pixel_values"])
        posterior = components.vae.encode(batch["pixel_values"]).latent_dist
    assert set(text) == set(family.text_keys) == {"encoder_hidden_states"}
    torch.testing.assert_close(text["encoder_hidden_states"], expected, rtol=0, atol=0)
    assert params.shape == (2, 8, 4, 4)  # mean and logvar of 4 latent channels
    torch.testing.assert_close(params, posterior.parameters, rtol=0, atol=0)
    # Cached text in the batch is used as it is, not encoded again.
    cached = {"encoder_hidden_states": torch.zeros_like(expected)}
    assert family.text_conditioning(components, {**batch, **cached})["encoder_hidden_states"].abs().sum() == 0


def test_tiny_model_command_writes_an_sdxl_pipeline_with_local_tokenizers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer", "tiny-model", str(tmp_path / "xl"), "--family", "sdxl"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["paths"] == [str(tmp_path / "xl")]
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    one = CLIPTokenizer.from_pretrained(tmp_path / "xl", subfolder="tokenizer", local_files_only=True)
    two = CLIPTokenizer.from_pretrained(tmp_path / "xl", subfolder="tokenizer_2", local_files_only=True)
    ids_one, ids_two = one("a red circle").input_ids, two("a red circle").input_ids
    assert ids_one == ids_two and len(ids_one) > 3  # same vocabulary, real tokens
    assert two.pad_token == "!" and one.pad_token == "<|endoftext|>"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
