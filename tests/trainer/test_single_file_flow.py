"""Flux and SD3 finetunes shared as one file (BFL's / Stability's layout, as ComfyUI saves them):
the file's transformer, converted by diffusers, with the rest from the family's config folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from trainer.config import load_config
from trainer.detect import inspect_model
from trainer.families import get_family
from trainer.loop import train
from trainer.model import ModelLoadError
from trainer.sample_data import write_sample_dataset
from trainer.tiny_flow import flux_original_state_dict, write_flow_single_file

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


def test_sd3_single_file_trains_as_its_folder(tiny_sd3_model, square_data, tmp_path):
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_model, subfolder="transformer")
    single = write_flow_single_file(transformer, tmp_path / "finetune.safetensors")
    assert inspect_model(single).family == "sd3" and inspect_model(single).single_file
    options = dict(train_data_dir=str(square_data), resolution=32, train_batch_size=2, seed=0, max_train_steps=3,
                   max_sequence_length=16, lr_warmup_steps=0, random_flip=True, device="cpu", learning_rate=5e-2)
    from_folder = train(load_config({**options, "output_dir": str(tmp_path / "folder"),
                                     "pretrained_model_name_or_path": str(tiny_sd3_model)}, "sd3"))
    from_file = train(load_config({**options, "output_dir": str(tmp_path / "file"), "validation_steps": 2,
                                   "pretrained_model_name_or_path": str(single),
                                   "pretrained_config_dir": str(tiny_sd3_model), "validation_prompt": "a red circle",
                                   "num_validation_images": 1, "validation_inference_steps": 2}, "sd3"))
    assert len(from_file.losses) == 3 and from_file.losses == from_folder.losses
    # Validation during the run (the in-memory transformer) and at the end (the file again + the LoRA).
    assert [Path(p).name for p in from_file.validation_images] == ["step-000002-0.png", "final-step-000003-0.png"]
    assert load_file(str(from_file.lora_path)).keys() == load_file(str(from_folder.lora_path)).keys()
    # The LoRA loads into the config folder's pipeline around the file's transformer.
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3_model, transformer=SD3Transformer2DModel.from_single_file(
            str(single), config=str(tiny_sd3_model), subfolder="transformer", local_files_only=True))
    pipeline.load_lora_weights(str(tmp_path / "file"))
    assert any(".lora_A." in n for n, _ in pipeline.transformer.named_parameters())
    # Without the config folder the file alone cannot say its components' shapes: named, not guessed.
    with pytest.raises(ModelLoadError, match="pretrained_config_dir"):
        train(load_config({**options, "output_dir": str(tmp_path / "no-config"),
                           "pretrained_model_name_or_path": str(single)}, "sd3"))


def test_flux_single_file_loads_exactly_through_the_family(tiny_flux_model, tmp_path):
    """diffusers' BFL converter assumes the real model's width (3072, MLP 4x), so this file has
    it, with one block of each kind (about 530M parameters in bf16, random): the family loads its
    transformer from the file and the rest from the config folder, and every tensor arrives where
    BFL's layout puts it (written back to that layout, the file's tensors exactly)."""
    from accelerate import init_empty_weights

    config_dir = tmp_path / "flux-config"  # the tiny pipeline with a transformer config of real width
    shutil.copytree(tiny_flux_model, config_dir)
    for weights in (config_dir / "transformer").glob("*.safetensors"):
        weights.unlink()  # the folder's transformer is the config alone: its weights come from the file
    config_file = config_dir / "transformer" / "config.json"
    wide = {**json.loads(config_file.read_text()), "num_layers": 1, "num_single_layers": 1,
            "attention_head_dim": 128, "num_attention_heads": 24, "axes_dims_rope": [16, 56, 56]}
    config_file.write_text(json.dumps(wide))
    with init_empty_weights():
        shapes = flux_original_state_dict(FluxTransformer2DModel.from_config(wide).state_dict())
    generator = torch.Generator().manual_seed(0)
    written = {key: torch.randn(value.shape, generator=generator, dtype=torch.bfloat16) for key, value in shapes.items()}
    single = tmp_path / "flux1-finetune.safetensors"
    save_file({PREFIX + key: value for key, value in written.items()}, str(single))
    assert inspect_model(single).family == "flux" and inspect_model(single).single_file

    config = load_config({"pretrained_model_name_or_path": str(single), "pretrained_config_dir": str(config_dir),
                          "train_data_dir": str(tmp_path)}, "flux")
    family = get_family("flux")
    components = family.load(config)
    assert components.text_encoder is not None and components.vae is not None  # from the config folder
    read = flux_original_state_dict(components.unet.to(torch.bfloat16).state_dict())
    assert read.keys() == written.keys()
    for key, value in written.items():
        assert torch.equal(read[key], value), key
