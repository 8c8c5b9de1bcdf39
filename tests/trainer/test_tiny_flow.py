"""The tiny Flux and SD3 pipelines: built offline, loaded by diffusers' own pipeline classes,
rendering an image, with a locally generated T5 tokenizer that round-trips captions."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from transformers import T5TokenizerFast

from trainer.tiny import write_tiny_model

CAPTION = "a photo of a Red cat, 42 cats!"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (the hub must never be asked)."""
    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-flux"), family="flux")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sd3"), family="sd3")


def _render(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cat", height=32, width=32, num_inference_steps=2, generator=generator,
                output_type="np", max_sequence_length=32, **kwargs).images


def test_flux_dev_loads_offline_and_renders_deterministically(flux_dir, no_network):
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is True
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64  # packed 2x2
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.use_dynamic_shifting is True
    first = _render(pipe, guidance_scale=3.5)
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, _render(pipe, guidance_scale=3.5))
    # The guidance value reaches the transformer: another value, another image.
    assert not np.array_equal(first, _render(pipe, guidance_scale=1.0))


def test_flux_schnell_has_no_guidance_embedding(tmp_path, no_network):
    path = write_tiny_model(tmp_path / "schnell", family="flux", flux_variant="schnell")
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is False
    assert not any("guidance_embedder" in name for name, _ in pipe.transformer.named_modules())
    assert pipe.scheduler.config.use_dynamic_shifting is False and pipe.scheduler.config.shift == 1.0
    assert _render(pipe).shape == (1, 32, 32, 3)


def test_sd3_loads_offline_with_three_text_encoders_and_renders(sd3_dir, no_network):
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    assert type(pipe.text_encoder).__name__ == type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    config = pipe.transformer.config
    assert config.in_channels == pipe.vae.config.latent_channels == 16
    assert config.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                            + pipe.text_encoder_2.config.projection_dim)
    # The pipeline pads the CLIPs' joined hidden states to T5's width: that width must hold them.
    assert config.joint_attention_dim == pipe.text_encoder_3.config.d_model >= (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size)
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    images = _render(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, _render(pipe))


@pytest.mark.parametrize("family, subfolder", [("flux", "tokenizer_2"), ("sd3", "tokenizer_3")])
def test_t5_tokenizer_loads_as_the_pipelines_do_and_round_trips(family, subfolder, flux_dir, sd3_dir, no_network):
    folder = flux_dir if family == "flux" else sd3_dir
    tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    assert tokenizer.model_max_length == 512
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(CAPTION, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 64)
    assert tokenizer.unk_token_id not in ids[0]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == CAPTION
    # Whole words are single pieces (the Unigram segmentation prefers them), ending in </s>.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(CAPTION).input_ids)
    assert pieces[:2] == ["▁a", "▁photo"] and pieces[-1] == "</s>"
    text_encoder = json.loads((folder / subfolder.replace("tokenizer", "text_encoder") / "config.json").read_text())
    assert text_encoder["vocab_size"] == len(tokenizer)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from safetensors.torch import load_file

    weights = "transformer/diffusion_pytorch_model.safetensors"
    a = load_file(write_tiny_model(tmp_path / "a", family="sd3", seed=1) / weights)
    b = load_file(write_tiny_model(tmp_path / "b", family="sd3", seed=1) / weights)
    c = load_file(write_tiny_model(tmp_path / "c", family="sd3", seed=2) / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_writes_flux_schnell(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "tiny-model", str(tmp_path / "m"), "--family", "flux",
         "--flux-variant", "schnell"], capture_output=True, text=True, check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"type": "done", "paths": [str(tmp_path / "m")]}
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())["guidance_embeds"] is False
