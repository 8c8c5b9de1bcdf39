"""The training loop on the real tiny model: learning, the objective, accumulation, resume, output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from trainer.config import ConfigError, load_config
from trainer.events import Event
from trainer.losses import diffusion_loss, min_snr_weights, training_target
from trainer.loop import draw_inputs, optimize, setup, train
from trainer.sample_data import write_sample_dataset
from trainer.tiny import write_tiny_model


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    """Four 32x32 images: at resolution 32 every crop is fixed, so latents are cacheable."""
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory) -> Path:
    """Four 48x40 images: a random crop has slack, so augmentations draw random numbers."""
    folder = write_sample_dataset(tmp_path_factory.mktemp("wide") / "data", n_images=4, size=48)
    for path in folder.glob("*.png"):
        Image.open(path).crop((0, 0, 48, 40)).save(path)
    return folder


def config_for(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=4,
    )
    return load_config({**values, **options})


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


# ------------------------------------------------------------------------------------------


def test_loss_falls_when_overfitting_a_few_images(tiny_model, square_data, tmp_path):
    config = config_for(tiny_model, square_data, tmp_path, train_batch_size=4, learning_rate=1e-2,
                        max_train_steps=80)
    result = train(config)

    assert len(result.losses) == 80
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)


def test_v_prediction_target_and_min_snr_weights_match_the_formulas(tmp_path):
    model = write_tiny_model(tmp_path / "v", prediction_type="v_prediction")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 4, 4, 4, generator=generator)
    noise = torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([10, 500, 999])

    alpha_bar = scheduler.alphas_cumprod[timesteps].view(3, 1, 1, 1)
    expected_v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(training_target(scheduler, latents, noise, timesteps), expected_v)

    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    gamma = 5.0
    expected_v_weights = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, gamma), expected_v_weights)

    scheduler.register_to_config(prediction_type="epsilon")
    torch.testing.assert_close(training_target(scheduler, latents, noise, timesteps), noise)
    expected_eps_weights = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, gamma), expected_eps_weights)

    prediction = torch.zeros_like(noise)
    per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    expected_loss = (per_sample * expected_eps_weights).mean()
    torch.testing.assert_close(diffusion_loss(prediction, noise, scheduler, timesteps, gamma), expected_loss)
    torch.testing.assert_close(diffusion_loss(prediction, noise, scheduler, timesteps, None), per_sample.mean())


def _one_update(model, data_dir, output_dir, inputs, accumulation: int):
    """One optimizer update from fixed inputs, split into `accumulation` micro-batches."""
    run = setup(config_for(model, data_dir, output_dir, train_batch_size=2 // accumulation,
                           gradient_accumulation_steps=accumulation, cache_latents=True, max_train_steps=1))
    grad_norm = None
    for part in range(accumulation):
        size = 2 // accumulation
        chunk = [t[part * size:(part + 1) * size] for t in inputs]
        with run.accelerator.accumulate(*run.trainable):
            _, grad_norm = optimize(run, *chunk)
    weights = {n: p.detach().clone() for n, p in run.unet.named_parameters() if p.requires_grad}
    return grad_norm, weights


def test_gradient_accumulation_2x1_equals_batch_of_2(tiny_model, square_data, tmp_path):
    run = setup(config_for(tiny_model, square_data, tmp_path / "draw", cache_latents=True))
    batch = next(iter(run.dataloader))
    inputs = [t.detach() for t in draw_inputs(run, batch)]
    assert inputs[0].shape[0] == 2

    norm_full, weights_full = _one_update(tiny_model, square_data, tmp_path / "full", inputs, accumulation=1)
    norm_accum, weights_accum = _one_update(tiny_model, square_data, tmp_path / "accum", inputs, accumulation=2)

    assert norm_accum == pytest.approx(norm_full, rel=1e-4)
    assert weights_full.keys() == weights_accum.keys()
    for name in weights_full:
        torch.testing.assert_close(weights_accum[name], weights_full[name], rtol=1e-4, atol=1e-6)


def test_gradient_clipping_applies(tiny_model, square_data, tmp_path):
    """The script's clip_grad_norm_ gets an exhausted iterator; ours must really clip."""
    def first_update(max_grad_norm, name):
        run = setup(config_for(tiny_model, square_data, tmp_path / name, max_grad_norm=max_grad_norm,
                               cache_latents=True))
        before = [p.detach().clone() for p in run.lora_parameters]
        torch.manual_seed(0)
        batch = next(iter(run.dataloader))
        _, grad_norm = optimize(run, *draw_inputs(run, batch))
        change = sum((p.detach() - b).abs().sum().item() for p, b in zip(run.lora_parameters, before))
        return grad_norm, change

    norm, unclipped_change = first_update(1.0, "loose")
    tiny_norm, clipped_change = first_update(1e-12, "tight")
    assert tiny_norm == pytest.approx(norm, rel=1e-4) and norm > 1e-12
    # Adam divides by sqrt(v) + eps: gradients clipped far below eps barely move the weights.
    assert clipped_change < 0.01 * unclipped_change


@pytest.mark.parametrize("dataset, options, interrupt_after", [
    ("wide_data", {"random_flip": True}, 3),  # random crops and flips, uncached, mid-epoch
    ("square_data", {"random_flip": True, "cache_latents": True}, 3),  # cached, mid-epoch
    ("square_data", {"center_crop": True}, 4),  # at an epoch boundary
])
def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_model, dataset, options, interrupt_after,
                                                         request, tmp_path):
    data_dir = request.getfixturevalue(dataset)
    common = dict(max_train_steps=6, checkpointing_steps=interrupt_after, **options)
    full = train(config_for(tiny_model, data_dir, tmp_path / "full", **common))

    class Crash(RuntimeError):
        pass

    def crash_after_checkpoint(event: Event) -> None:
        if event.type == "step" and event.step == interrupt_after + 1:
            raise Crash("simulated crash")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Crash):
        train(config_for(tiny_model, data_dir, interrupted, **common), crash_after_checkpoint)
    assert (interrupted / f"checkpoint-{interrupt_after}").is_dir()
    assert not (interrupted / "pytorch_lora_weights.safetensors").exists()

    resumed = train(config_for(tiny_model, data_dir, interrupted, resume_from_checkpoint="latest", **common))

    assert resumed.global_step == 6
    assert resumed.losses == pytest.approx(full.losses[interrupt_after:], rel=1e-6)
    assert_same_weights(lora_weights(resumed.lora_path), lora_weights(full.lora_path), atol=1e-7)


def test_cached_latents_follow_the_uncached_run(tiny_model, square_data, tmp_path):
    options = dict(max_train_steps=4, random_flip=True)
    cached = train(config_for(tiny_model, square_data, tmp_path / "cached", cache_latents=True, **options))
    plain = train(config_for(tiny_model, square_data, tmp_path / "plain", cache_latents=False, **options))
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-5)


def test_cache_refused_when_crops_are_random(tiny_model, wide_data, tmp_path):
    with pytest.raises(ConfigError, match="cache_latents"):
        train(config_for(tiny_model, wide_data, tmp_path, cache_latents=True))


def test_saved_lora_loads_into_a_pipeline_and_changes_its_output(tiny_model, square_data, tmp_path):
    result = train(config_for(tiny_model, square_data, tmp_path, learning_rate=5e-2, max_train_steps=6))
    weights = lora_weights(result.lora_path)
    assert weights and all(key.startswith("unet.") for key in weights)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a red circle", num_inference_steps=3, generator=generator, output_type="np").images

    before = render()
    pipeline.load_lora_weights(str(tmp_path))
    after = render()
    assert abs(after - before).max() > 1e-3

    # The kohya-format copy (for AUTOMATIC1111 and ComfyUI) holds the same adapter.
    kohya = lora_weights(tmp_path / "lora_kohya.safetensors")
    assert all(key.startswith("lora_unet_") for key in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(str(tmp_path), weight_name="lora_kohya.safetensors")
    np.testing.assert_allclose(render(), after, atol=1e-5)


def test_checkpoints_are_pruned_and_each_holds_a_lora(tiny_model, square_data, tmp_path):
    events: list[Event] = []
    train(config_for(tiny_model, square_data, tmp_path, max_train_steps=5, checkpointing_steps=1,
                     checkpoints_total_limit=2), events.append)

    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-5"]
    for name in kept:
        assert (tmp_path / name / "pytorch_lora_weights.safetensors").is_file()
        assert not list((tmp_path / name).glob("model*.safetensors")), "the frozen base must not be copied"
    assert [e.step for e in events if e.type == "checkpoint"] == [1, 2, 3, 4, 5]


def test_events_and_validation_images(tiny_model, square_data, tmp_path):
    events: list[Event] = []
    result = train(config_for(tiny_model, square_data, tmp_path, max_train_steps=4, validation_prompt="a red circle",
                              num_validation_images=2, validation_inference_steps=2, validation_steps=2),
                   events.append)

    types = [e.type for e in events]
    assert types[0] == "start" and types[-1] == "done"
    steps = [e for e in events if e.type == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4]
    assert all(e.total_steps == 4 and e.loss is not None and e.lr == pytest.approx(1e-4) for e in steps)
    assert all(e.grad_norm is not None and math.isfinite(e.grad_norm) for e in steps)
    assert steps[-1].images_per_s > 0 and steps[-1].eta_s == 0
    validations = [e for e in events if e.type == "validation"]
    assert [e.step for e in validations] == [2, 4, 4]  # every 2 steps, then the final one from the file
    for event in validations:
        assert len(event.paths) == 2
        for path in event.paths:
            assert Image.open(path).size == (32, 32)
    assert len(result.validation_images) == 6
    without = train(config_for(tiny_model, square_data, tmp_path / "without", max_train_steps=4))
    assert result.losses == without.losses, "validation must not disturb the training random stream"
    assert json.loads(events[-1].to_json())["paths"] == [str(result.lora_path), str(tmp_path / "lora_kohya.safetensors")]


def test_text_encoder_lora_dora_min_snr_noise_offset_and_bf16(tiny_model, square_data, tmp_path):
    """The options beyond the script train, save and load together."""
    config = config_for(tiny_model, square_data, tmp_path, max_train_steps=3, train_text_encoder=True,
                        use_dora=True, snr_gamma=5.0, noise_offset=0.1, mixed_precision="bf16",
                        gradient_checkpointing=True, lr_scheduler="cosine", lr_warmup_steps=1)
    run = setup(config)
    lora = {p.dtype for n, p in run.unet.named_parameters() if p.requires_grad}
    frozen = {p.dtype for n, p in run.unet.named_parameters() if not p.requires_grad}
    assert lora == {torch.float32} and frozen == {torch.bfloat16}
    assert any(p.requires_grad for p in run.text_encoder.parameters())

    result = train(config)
    assert all(math.isfinite(loss) for loss in result.losses)
    weights = lora_weights(result.lora_path)
    assert any(k.startswith("text_encoder.") for k in weights)
    assert any("magnitude" in k for k in weights), "DoRA magnitudes missing"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipeline.load_lora_weights(str(tmp_path))


def test_bad_model_path_is_named(square_data, tmp_path):
    events: list[Event] = []
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        train(config_for(tmp_path / "no-such-model", square_data, tmp_path / "out"), events.append)
    assert events[-1].type == "error" and "pretrained_model_name_or_path" in events[-1].message


def test_zip_dataset_trains(tiny_model, square_data, tmp_path):
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in square_data.iterdir():
            zf.write(path, f"pictures/{path.name}")
    result = train(config_for(tiny_model, archive, tmp_path / "out", max_train_steps=2, cache_latents=False))
    assert result.lora_path.is_file() and result.global_step == 2
