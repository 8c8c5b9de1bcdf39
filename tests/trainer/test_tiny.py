"""The tiny SD pipeline and the synthetic dataset are what every trainer test builds on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from trainer.sample_data import write_sample_dataset
from trainer.tiny import write_tiny_model

CAPTION = "a red circle on a blue background"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(tiny_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_generates_default_32px_image_deterministically(pipe):
    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe(CAPTION, num_inference_steps=2, generator=generator, output_type="np").images

    first = generate()
    assert first.shape == (1, 32, 32, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, generate())


def test_components_have_sd_shape(pipe):
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    names = {name.rsplit(".", 1)[-1] for name, _ in pipe.unet.named_modules() if ".attn" in name}
    assert {"to_q", "to_k", "to_v"} <= names
    assert any(name.endswith("attn2.to_out.0") for name, _ in pipe.unet.named_modules())


def test_tokenizer_loads_back_and_round_trips(tiny_dir, pipe):
    tok = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer", local_files_only=True)
    assert tok.model_max_length == 77
    ids = tok(CAPTION, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0]
    assert tok.decode(ids[0], skip_special_tokens=True) == CAPTION

    long_ids = tok(CAPTION * 20, padding="max_length", truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tok.eos_token_id

    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    assert hidden.shape == (1, 77, 32)


def test_prediction_type_is_stored(tmp_path):
    out = write_tiny_model(tmp_path, prediction_type="v_prediction")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert DDPMScheduler.from_pretrained(out, subfolder="scheduler").config.prediction_type == "v_prediction"


def test_weights_depend_only_on_seed(tmp_path, tiny_dir):
    rng_before = torch.get_rng_state()
    again = write_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for weights in (UNET_WEIGHTS, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tiny_dir / weights), load_file(again / weights)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), weights

    other = load_file(write_tiny_model(tmp_path / "other", seed=1) / UNET_WEIGHTS)
    first = load_file(tiny_dir / UNET_WEIGHTS)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_sample_dataset_txt_captions(tmp_path):
    out = write_sample_dataset(tmp_path, n_images=5, size=40)
    images = sorted(out.glob("*.png"))
    assert len(images) == 5
    for path in images:
        with Image.open(path) as im:
            assert (im.mode, im.size) == ("RGB", (40, 40))
        caption = path.with_suffix(".txt").read_text()
        assert caption.startswith(("a ", "an ")) and caption.endswith(" background")
    assert not (out / "metadata.jsonl").exists()


def test_sample_dataset_jsonl_captions(tmp_path):
    out = write_sample_dataset(tmp_path, caption_style="jsonl")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 == len(list(out.glob("*.png")))
    assert all((out / row["file_name"]).is_file() and row["text"] for row in rows)
    assert len({row["text"] for row in rows}) == 8
    assert not list(out.glob("*.txt"))


def test_sample_dataset_is_deterministic_and_seeded(tmp_path):
    def pixels(out):
        return [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]

    a, b = (pixels(write_sample_dataset(tmp_path / d, n_images=3, seed=7)) for d in ("a", "b"))
    c = pixels(write_sample_dataset(tmp_path / "c", n_images=3, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_sample_dataset_rejects_unknown_caption_style(tmp_path):
    with pytest.raises(ValueError, match="caption_style"):
        write_sample_dataset(tmp_path, caption_style="csv")
