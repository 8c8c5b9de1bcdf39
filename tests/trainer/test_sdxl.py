"""The SDXL family on the tiny SDXL model: the script's conditioning, objectives, cache, resume,
several processes, the LoRA files and refusals."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError, load_config
from trainer.data import load_rgb
from trainer.events import Event
from trainer.loop import draw_inputs, setup, train
from trainer.model import ModelLoadError
from trainer.sample_data import write_sample_dataset
from support.torchrun import train_two_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory) -> Path:
    """Four 48x40 images (w x h): resized to 38x32 at resolution 32, so random crops have slack."""
    folder = write_sample_dataset(tmp_path_factory.mktemp("wide") / "data", n_images=4, size=48)
    for path in folder.glob("*.png"):
        Image.open(path).crop((0, 0, 48, 40)).save(path)
    return folder


def sdxl_config(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=4,
    )
    return load_config({**values, **options}, "sdxl")


# ------------------------------------------------------------------------------------------


def test_conditioning_is_the_scripts(tiny_sdxl, wide_data, tmp_path):
    """Rebuild the script's inputs for a batch independently: its augmentation draws (Python's
    random for the flip, then RandomHorizontalFlip(p=1)'s torch draw, then RandomCrop's), its
    time ids from original size, crop and target size, and its encode_prompt."""
    config = sdxl_config(tiny_sdxl, wide_data, tmp_path, random_flip=True, cache_latents=False)
    run = setup(config)
    family = run.family
    dataset = run.dataloader.dataset
    indices = [0, 1, 2, 3]

    random.seed(7)
    torch.manual_seed(7)
    items = dataset.__getitems__(indices)

    random.seed(7)
    torch.manual_seed(7)
    expected_flips, expected_crops = [], []
    for index in indices:
        image = load_rgb(dataset.examples[index].path)
        assert image.size == (48, 40)
        flip = random.random() < 0.5
        if flip:
            torch.rand(1)
        # Resized to 38x32 (short side 32): slack only in width, but the script draws both.
        top = int(torch.randint(0, 32 - 32 + 1, size=(1,)).item())
        left = int(torch.randint(0, 38 - 32 + 1, size=(1,)).item())
        expected_flips.append(flip)
        expected_crops.append((top, left))
        resized = image.resize((38, 32), Image.Resampling.LANCZOS)
        if flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
        got = items[indices.index(index)]
        np.testing.assert_allclose(got["pixel_values"].permute(1, 2, 0).numpy(), (pixels - 0.5) / 0.5, atol=1e-6)
    assert any(expected_flips) and not all(expected_flips), "the seed should flip some images, not all"

    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    conditioning = family.conditioning(run.components, batch, config, torch.float32)

    expected_time_ids = torch.tensor([[40, 48, top, left, 32, 32] for top, left in expected_crops], dtype=torch.float32)
    torch.testing.assert_close(conditioning["time_ids"], expected_time_ids, rtol=0, atol=0)

    components = run.components
    with torch.no_grad():
        one = components.text_encoder(batch["input_ids_one"], output_hidden_states=True)
        two = components.text_encoder_2(batch["input_ids_two"], output_hidden_states=True)
    expected_embeds = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(conditioning["prompt_embeds"], expected_embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditioning["pooled_prompt_embeds"], two.text_embeds, rtol=0, atol=0)
    assert conditioning["prompt_embeds"].shape == (4, 77, 72) and conditioning["pooled_prompt_embeds"].shape == (4, 32)
    # The second tokenizer pads with "!" as SDXL's does; the first with its end token.
    assert components.tokenizer_2.pad_token == "!" and components.tokenizer.pad_token != "!"


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sdxl_v"])
def test_epsilon_and_v_prediction_with_min_snr(model, square_data, request, tmp_path):
    model_dir = request.getfixturevalue(model)
    plain = train(sdxl_config(model_dir, square_data, tmp_path / "plain", max_train_steps=2))
    # A small gamma caps the weight of every timestep but the noisiest (gamma 5 leaves most at 1).
    weighted = train(sdxl_config(model_dir, square_data, tmp_path / "snr", max_train_steps=2, snr_gamma=0.01))
    assert all(math.isfinite(loss) for loss in plain.losses + weighted.losses)
    # Same draws, so the same first batch; Min-SNR only reweights it.
    assert weighted.losses[0] != pytest.approx(plain.losses[0], rel=1e-3)

    run = setup(sdxl_config(model_dir, square_data, tmp_path / "draw", snr_gamma=5.0))
    expected = "v_prediction" if model == "tiny_sdxl_v" else "epsilon"
    assert run.components.noise_scheduler.config.prediction_type == expected
    assert type(run.components.noise_scheduler).__name__ == "DDPMScheduler"  # from Euler's config


def test_cache_on_and_off_give_equal_losses(tiny_sdxl, square_data, tmp_path):
    options = dict(max_train_steps=4, random_flip=True)
    cached = train(sdxl_config(tiny_sdxl, square_data, tmp_path / "cached", cache_latents=True, **options))
    plain = train(sdxl_config(tiny_sdxl, square_data, tmp_path / "plain", cache_latents=False, **options))
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)


def test_vae_stays_fp32_under_bf16_and_text_encoders_train(tiny_sdxl, square_data, tmp_path):
    run = setup(sdxl_config(tiny_sdxl, square_data, tmp_path, mixed_precision="bf16", train_text_encoder=True))
    assert run.components.vae.dtype == torch.float32
    # Never cast through bf16 on the way: the weights are the file's, bit for bit.
    from diffusers import AutoencoderKL

    original = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").state_dict()
    assert all(torch.equal(value, original[key]) for key, value in run.components.vae.state_dict().items())
    assert run.components.unet.dtype == torch.bfloat16
    assert set(run.models) == {"unet", "text_encoder", "text_encoder_2"}
    latents, noise, timesteps, conditioning = draw_inputs(run, next(iter(run.dataloader)))
    assert latents.dtype == torch.bfloat16 and conditioning["time_ids"].dtype == torch.bfloat16
    # A separate VAE (a folder holding the VAE alone, as the fp16-fix one) runs in the weight dtype.
    separate = setup(sdxl_config(tiny_sdxl, square_data, tmp_path / "vae", mixed_precision="bf16",
                                 pretrained_vae_model_name_or_path=str(tiny_sdxl / "vae")))
    assert separate.components.vae.dtype == torch.bfloat16


def test_separate_vae_with_the_same_weights_gives_the_same_losses(tiny_sdxl, square_data, tmp_path):
    own = train(sdxl_config(tiny_sdxl, square_data, tmp_path / "own", max_train_steps=2))
    separate = train(sdxl_config(tiny_sdxl, square_data, tmp_path / "separate", max_train_steps=2,
                                 pretrained_vae_model_name_or_path=str(tiny_sdxl / "vae")))
    assert separate.losses == own.losses
    with pytest.raises(ModelLoadError, match="pretrained_vae_model_name_or_path: cannot load"):
        train(sdxl_config(tiny_sdxl, square_data, tmp_path / "missing",
                          pretrained_vae_model_name_or_path=str(tmp_path / "no-such-vae")))


def test_resumed_run_ends_with_the_uninterrupted_weights(tiny_sdxl, wide_data, tmp_path):
    common = dict(max_train_steps=5, checkpointing_steps=3, random_flip=True, train_text_encoder=True)
    full = train(sdxl_config(tiny_sdxl, wide_data, tmp_path / "full", **common))

    class Crash(RuntimeError):
        pass

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == 4:
            raise Crash("simulated crash")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Crash):
        train(sdxl_config(tiny_sdxl, wide_data, interrupted, **common), crash)
    resumed = train(sdxl_config(tiny_sdxl, wide_data, interrupted, resume_from_checkpoint="latest", **common))

    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-6)
    a, b = load_file(str(resumed.lora_path)), load_file(str(full.lora_path))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_lora_loads_into_the_sdxl_pipeline_and_kohya_gives_the_same_image(tiny_sdxl, square_data, tmp_path):
    result = train(sdxl_config(tiny_sdxl, square_data, tmp_path, learning_rate=5e-2, max_train_steps=4,
                               train_text_encoder=True, rank=2, lora_alpha=4, validation_prompt="a red circle",
                               num_validation_images=1, validation_inference_steps=2))
    # Validation renders with StableDiffusionXLPipeline, the last time from the saved file.
    # After each of the 2 epochs, then once more from the saved file.
    assert len(result.validation_images) == 3 and "final-step-000004-0.png" in result.validation_images[-1]
    assert all(Image.open(path).size == (32, 32) for path in result.validation_images)
    weights = load_file(str(result.lora_path))
    assert {key.split(".")[0] for key in weights} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(str(tmp_path / "lora_kohya.safetensors"))
    assert {key.split("_")[0] + "_" + key.split("_")[1] for key in kohya} == {"lora_unet", "lora_te1", "lora_te2"}
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    # sd-scripts' names: the original UNet's blocks (one layer a block here: down block 1's
    # attention is input block 3), transformers' text encoder modules.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in kohya
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_out_0.alpha" in kohya
    assert not any("down_blocks" in key or "up_blocks" in key for key in kohya)
    assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" not in kohya  # attention only
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha" in kohya

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a red circle", num_inference_steps=2, generator=generator, height=32, width=32,
                        output_type="np").images

    before = render()
    pipeline.load_lora_weights(str(tmp_path))
    after = render()
    assert abs(after - before).max() > 1e-3
    pipeline.unload_lora_weights()
    np.testing.assert_allclose(render(), before, atol=1e-6)
    pipeline.load_lora_weights(str(tmp_path), weight_name="lora_kohya.safetensors")
    np.testing.assert_allclose(render(), after, atol=1e-5)


def test_option_of_another_family_is_refused(tiny_model, tiny_sdxl, square_data, tmp_path):
    with pytest.raises(ConfigError, match="pretrained_vae_model_name_or_path is not an option of the sd family"):
        load_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                     "pretrained_vae_model_name_or_path": "vae"}, "sd")
    assert load_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                        "pretrained_vae_model_name_or_path": "vae"}, "sdxl").family == "sdxl"
    # The command line takes the family from the model and refuses there too (exit 2).
    command = [sys.executable, "-m", "trainer", "train", "--pretrained_model_name_or_path", str(tiny_model),
               "--train_data_dir", str(square_data), "--pretrained_vae_model_name_or_path", "vae", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert "pretrained_vae_model_name_or_path is not an option of the sd family" in result.stdout
    # SD options given for an SDXL model: named, before anything loads.
    with pytest.raises(ConfigError, match="is a sdxl model, but the options are for the sd family"):
        train(load_config({"pretrained_model_name_or_path": str(tiny_sdxl), "train_data_dir": str(square_data),
                           "output_dir": str(tmp_path)}))


def test_unsupported_pipelines_and_random_files_are_named(square_data, tmp_path):
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ModelLoadError, match="PixArtSigmaPipeline is not a supported family"):
        train(load_config({"pretrained_model_name_or_path": str(pixart), "train_data_dir": str(square_data),
                           "output_dir": str(tmp_path / "out")}))
    random_file = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(random_file))
    events: list[Event] = []
    with pytest.raises(ModelLoadError, match="random.safetensors"):
        train(load_config({"pretrained_model_name_or_path": str(random_file), "train_data_dir": str(square_data),
                           "output_dir": str(tmp_path / "out2")}), events.append)
    assert events[-1].type == "error" and "pretrained_model_name_or_path" in events[-1].message


def test_two_processes_report_each_step_once(tiny_sdxl, tmp_path):
    data = write_sample_dataset(tmp_path / "data", n_images=8, size=32)
    out = tmp_path / "out"
    events = train_two_processes(tiny_sdxl, data, out, "--train_text_encoder")
    assert events[0]["type"] == "start" and events[0]["data"]["total_batch_size"] == 4
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["type"] == "done"
    assert any(k.startswith("text_encoder_2.") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_checkpoint_trains_as_its_folder(family, tiny_model, tiny_sdxl, square_data, tmp_path):
    from trainer.tiny import write_single_file

    folder = tiny_sdxl if family == "sdxl" else tiny_model
    single = write_single_file(folder, tmp_path / f"tiny-{family}.safetensors")
    options = dict(pretrained_model_name_or_path=str(folder), train_data_dir=str(square_data), resolution=32,
                   train_batch_size=2, seed=0, max_train_steps=3, random_flip=True, cache_latents=False)
    from_folder = train(load_config({**options, "output_dir": str(tmp_path / "folder")}, family))
    from_file = train(load_config({**options, "output_dir": str(tmp_path / "file"),
                                   "pretrained_model_name_or_path": str(single),
                                   "pretrained_config_dir": str(folder)}, family))
    assert from_file.losses == from_folder.losses
    # Without the config folder the file alone cannot say its components' shapes: named, not guessed.
    with pytest.raises(ModelLoadError, match="pretrained_config_dir"):
        train(load_config({**options, "output_dir": str(tmp_path / "no-config"),
                           "pretrained_model_name_or_path": str(single)}, family))
