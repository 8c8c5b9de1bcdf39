"""The Flux family on the tiny Flux models (dev: guidance embedding; schnell: none): the flow-matching
inputs of `train_dreambooth_lora_flux.py` computed independently, each weighting scheme, refusals,
same seed, cache on = off, freed text encoders, resume, two processes, and the LoRA files
(FluxPipeline's and ComfyUI's)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import loop, metadata
from trainer.config import ConfigError, load_config
from support.resume import assert_resume_matches
from trainer.loop import draw_inputs, optimize, setup, train
from trainer.sample_data import write_sample_dataset
from support.torchrun import train_two_processes

SCHEMES = ["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"]


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory) -> Path:
    from trainer.tiny_flow import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("tiny-schnell"), variant="schnell")


def flux_config(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=3,
        max_sequence_length=16, lr_warmup_steps=0, device="cpu",
    )
    return load_config({**values, **options}, "flux")


# ------------------------------------------------------------------------------------------
# The script's step, written out independently


def script_inputs(vae, scheduler, pixel_values, config, generator_state):
    """`train_dreambooth_lora_flux.py`'s step up to the transformer call, from the same RNG state."""
    torch.set_rng_state(generator_state)
    model_input = vae.encode(pixel_values.to(dtype=vae.dtype)).latent_dist.sample()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn_like(model_input)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=config.weighting_scheme, batch_size=model_input.shape[0], logit_mean=config.logit_mean,
        logit_std=config.logit_std, mode_scale=config.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=config.weighting_scheme, sigmas=sigmas)
    return model_input, noise, timesteps, noisy, noise - model_input, weighting


@pytest.mark.parametrize("scheme", SCHEMES)
def test_flow_matching_inputs_target_and_weighting_are_the_scripts(scheme, tiny_flux_model, square_data, tmp_path):
    run = setup(flux_config(tiny_flux_model, square_data, tmp_path, weighting_scheme=scheme, cache_latents=False))
    batch = next(iter(run.dataloader))
    state = torch.get_rng_state()
    latents, noise, timesteps, conditioning = draw_inputs(run, batch)
    objective = run.objective
    noisy = objective.noisy_input(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    weighting = objective.weighting(timesteps, latents)

    vae, scheduler = run.components.vae, run.components.noise_scheduler
    with torch.no_grad():
        expected = script_inputs(vae, scheduler, batch["pixel_values"], run.config, state)
    for name, ours, theirs in zip(("latents", "noise", "timesteps", "noisy", "target", "weighting"),
                                  (latents, noise, timesteps, noisy, target, weighting), expected):
        assert torch.equal(ours, theirs), name
    if scheme == "logit_normal":  # u = sigmoid(normal): timesteps strictly inside the grid
        assert all(0 < t < 1000 for t in timesteps.tolist())

    # The transformer call: 2x2 packing, image and text ids, the dev model's constant guidance,
    # timesteps / 1000, unpacked with the VAE's scale factor.
    model_input = expected[0]
    transformer = run.unet
    with torch.no_grad():
        ours = run.family.predict(transformer, noisy, timesteps, conditioning)
        b, c, h, w = model_input.shape
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        theirs = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
            guidance=torch.tensor([run.config.guidance_scale]).expand(b),
            pooled_projections=conditioning["pooled_prompt_embeds"], encoder_hidden_states=conditioning["prompt_embeds"],
            txt_ids=torch.zeros(conditioning["prompt_embeds"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32), return_dict=False,
        )[0]
        theirs = FluxPipeline._unpack_latents(theirs, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)
    assert torch.equal(ours, theirs)
    # The weighted loss as the script reduces it.
    script_loss = torch.mean((expected[5].float() * (theirs.float() - expected[4].float()) ** 2).reshape(b, -1), 1).mean()
    assert torch.equal(objective.loss(ours, target, timesteps), script_loss)
    # And the scheme trains: a real step, a finite loss.
    loss, grad_norm = optimize(run, latents, noise, timesteps, conditioning)
    assert np.isfinite(loss) and grad_norm is not None and grad_norm > 0


def test_the_prompt_encoding_is_the_scripts(tiny_flux_model, square_data, tmp_path):
    """CLIP's pooled output and T5's states over max_sequence_length tokens."""
    run = setup(flux_config(tiny_flux_model, square_data, tmp_path, cache_latents=False, max_sequence_length=12))
    batch = next(iter(run.dataloader))
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids_2"].shape == (2, 12)
    components = run.components
    encoded = run.family.encode_text(components, batch)
    with torch.no_grad():
        pooled = components.text_encoder(batch["input_ids"], output_hidden_states=False).pooler_output
        t5 = components.text_encoder_2(batch["input_ids_2"], output_hidden_states=False)[0]
    assert torch.equal(encoded["pooled_prompt_embeds"], pooled) and torch.equal(encoded["prompt_embeds"], t5)


def test_schnell_gets_no_guidance(tiny_schnell, square_data, tmp_path):
    run = setup(flux_config(tiny_schnell, square_data, tmp_path, cache_latents=False))
    *_, conditioning = draw_inputs(run, next(iter(run.dataloader)))
    assert "guidance" not in conditioning
    result = train(flux_config(tiny_schnell, square_data, tmp_path / "train", max_train_steps=2))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


# ------------------------------------------------------------------------------------------
# Options


def test_misspelled_scheme_and_ddpm_options_are_refused_by_name():
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
    with pytest.raises(ConfigError, match="weighting_scheme: Input should be"):
        load_config({**base, "weighting_scheme": "logit_norml"}, "flux")
    for option, value in (("snr_gamma", 5.0), ("noise_offset", 0.1), ("prediction_type", "epsilon")):
        with pytest.raises(ConfigError, match=f"{option} is not an option of the flux family"):
            load_config({**base, option: value}, "flux")
    with pytest.raises(ConfigError, match="pretrained_vae_model_name_or_path is not an option of the flux family"):
        load_config({**base, "pretrained_vae_model_name_or_path": "v"}, "flux")
    with pytest.raises(ConfigError, match="guidance_scale is not an option of the sd family"):
        load_config({**base, "guidance_scale": 3.5}, "sd")
    with pytest.raises(ConfigError, match="text_encoder_lr: an option of train_text_encoder, which is off"):
        load_config({**base, "text_encoder_lr": 1e-4}, "flux")
    with pytest.raises(ConfigError, match="adam_weight_decay_text_encoder: an option of the adamw"):
        load_config({**base, "train_text_encoder": True, "optimizer": "adafactor",
                     "adam_weight_decay_text_encoder": 0.1}, "flux")
    config = load_config({**base, "lora_layers": "attn.to_q, attn.to_v"}, "flux")
    assert config.lora_layers == ["attn.to_q", "attn.to_v"]
    # The script's defaults.
    assert (config.lr_warmup_steps, config.adam_weight_decay, config.max_grad_norm, config.guidance_scale,
            config.max_sequence_length, config.weighting_scheme, config.mode_scale) == (500, 1e-4, 1.0, 3.5, 512, "none", 1.29)
    assert (config.text_encoder_lr, config.adam_weight_decay_text_encoder) == (5e-6, 1e-3)
    # The script's lora_alpha is 4 at any rank; `--weighting_scheme none` arrives as a null.
    assert load_config({**base, "rank": 8}, "flux").effective_lora_alpha == 4.0
    assert load_config({**base, "weighting_scheme": None}, "flux").weighting_scheme == "none"
    # The form's schema offers none of the refused options.
    schema = type(config).model_json_schema()["properties"]
    assert "weighting_scheme" in schema and not {"snr_gamma", "noise_offset", "prediction_type"} & set(schema)


def test_lora_layers_choose_the_modules(tiny_flux_model, square_data, tmp_path):
    run = setup(flux_config(tiny_flux_model, square_data, tmp_path, lora_layers="attn.to_q,ff.net.2"))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in run.unet.named_parameters() if ".lora_A." in name}
    assert adapted and all(name.endswith(("attn.to_q", "ff.net.2")) for name in adapted)
    assert any(name.startswith("single_transformer_blocks.") for name in adapted)


def test_instance_prompt_captions_the_uncaptioned_images(tiny_flux_model, tmp_path):
    data = write_sample_dataset(tmp_path / "data", n_images=2, size=32)
    for caption in data.glob("*.txt"):
        caption.unlink()
    (data / "metadata.jsonl").unlink(missing_ok=True)
    with pytest.raises(Exception, match="no caption"):
        setup(flux_config(tiny_flux_model, data, tmp_path / "a"))
    run = setup(flux_config(tiny_flux_model, data, tmp_path / "b", instance_prompt="a photo of sks dog"))
    assert {e.caption for e in run.dataloader.dataset.examples} == {"a photo of sks dog"}


# ------------------------------------------------------------------------------------------
# Reproducibility, cache, memory, resume, processes


def test_same_seed_same_losses_and_cache_on_equals_off(tiny_flux_model, square_data, tmp_path):
    options = dict(max_train_steps=3, weighting_scheme="logit_normal", random_flip=True)
    first = train(flux_config(tiny_flux_model, square_data, tmp_path / "a", cache_latents=False, **options))
    second = train(flux_config(tiny_flux_model, square_data, tmp_path / "b", cache_latents=False, **options))
    cached = train(flux_config(tiny_flux_model, square_data, tmp_path / "c", cache_latents=True, **options))
    assert len(first.losses) == 3
    assert first.losses == second.losses == cached.losses


def test_gradient_checkpointing_gives_the_same_losses(tiny_flux_model, square_data, tmp_path):
    plain = train(flux_config(tiny_flux_model, square_data, tmp_path / "plain", max_train_steps=2))
    checkpointed = train(flux_config(tiny_flux_model, square_data, tmp_path / "ckpt", max_train_steps=2,
                                     gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)


def test_text_encoders_are_freed_when_captions_are_fixed(tiny_flux_model, square_data, tmp_path):
    run = setup(flux_config(tiny_flux_model, square_data, tmp_path, cache_latents=True))
    t5 = weakref.ref(run.components.text_encoder_2)
    clip = weakref.ref(run.components.text_encoder)
    loop._release_text_encoders(run)
    gc.collect()
    assert run.components.text_encoder is None and run.components.text_encoder_2 is None
    assert run.family.text_encoders(run.components) == {}
    assert t5() is None and clip() is None, "nothing holds the text encoders any more"
    # Training goes on from the cached text conditioning.
    loss, _ = optimize(run, *draw_inputs(run, next(iter(run.dataloader))))
    assert np.isfinite(loss)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_resumed_run_ends_with_the_uninterrupted_weights(train_text_encoder, tiny_flux_model, square_data, tmp_path):
    common = dict(max_train_steps=5, checkpointing_steps=3, random_flip=True, weighting_scheme="mode",
                  train_text_encoder=train_text_encoder, text_encoder_lr=1e-2 if train_text_encoder else 5e-6)
    assert_resume_matches(lambda out, **extra: flux_config(tiny_flux_model, square_data, out, **common, **extra),
                          tmp_path, crash_step=4, checkpoint_step=3)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_two_processes_report_each_step_once(train_text_encoder, tiny_flux_model, tmp_path):
    data = write_sample_dataset(tmp_path / "data", n_images=8, size=32)
    out = tmp_path / "out"
    extra = ["--train_text_encoder", "--text_encoder_lr", "0.01"] if train_text_encoder else []
    events = train_two_processes(tiny_flux_model, data, out, "--max_sequence_length", "16", *extra)
    assert events[0]["type"] == "start" and events[0]["data"]["total_batch_size"] == 4
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["type"] == "done"
    # With train_text_encoder the CLIP encoder is DDP-wrapped beside the transformer, and saved.
    prefixes = {k.split(".", 1)[0] for k in load_file(str(out / "pytorch_lora_weights.safetensors"))}
    assert prefixes == ({"transformer", "text_encoder"} if train_text_encoder else {"transformer"})


# ------------------------------------------------------------------------------------------
# Files

# ComfyUI's key map for a model (comfy/lora.py, model_lora_keys_unet): every checkpoint weight
# `diffusion_model.<path>.weight` is looked up as `lora_unet_<path with dots as underscores>`, with
# `.lora_down.weight`, `.lora_up.weight` and `.alpha` after it. sd-scripts' networks/lora_flux.py
# names its modules the same way (prefix `lora_unet`, the module's path in the original BFL Flux
# model, dots as underscores). The BFL modules a Flux LoRA can target:
DOUBLE_BLOCK_MODULES = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
                        "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
SINGLE_BLOCK_MODULES = ("linear1", "linear2", "modulation.lin")
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def comfy_lora_names(num_double: int, num_single: int) -> set[str]:
    paths = [f"double_blocks.{i}.{m}" for i in range(num_double) for m in DOUBLE_BLOCK_MODULES]
    paths += [f"single_blocks.{i}.{m}" for i in range(num_single) for m in SINGLE_BLOCK_MODULES]
    return {"lora_unet_" + path.replace(".", "_") for path in paths}


def test_lora_loads_into_flux_pipeline_and_the_comfyui_file_gives_the_same_image(tiny_flux_model, square_data, tmp_path):
    result = train(flux_config(tiny_flux_model, square_data, tmp_path, learning_rate=5e-2, max_train_steps=3,
                               rank=2, lora_alpha=4, validation_prompt="a red circle", num_validation_images=1,
                               validation_inference_steps=2))
    assert "final-step-000003-0.png" in result.validation_images[-1]
    weights = load_file(str(result.lora_path))
    assert weights and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in weights)

    kohya_path = tmp_path / "lora_kohya.safetensors"
    kohya = load_file(str(kohya_path))
    with safe_open(str(kohya_path), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora_flux"
    # Every key is one ComfyUI maps onto the BFL checkpoint's modules, as sd-scripts names them.
    names = comfy_lora_names(num_double=1, num_single=2)  # the tiny model's blocks
    for key in kohya:
        name, suffix = key.split(".", 1)
        assert name in names and "." + suffix in LORA_SUFFIXES, key
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_double_blocks_0_txt_mlp_2.lora_up.weight" in kohya
    assert "lora_unet_single_blocks_1_linear1.alpha" in kohya
    # q, k, v fused: rank 3 x 2, alpha 3 x 4 (the scale alpha / rank stays 4 / 2).
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 12.0
    assert kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 4.0

    pipeline = FluxPipeline.from_pretrained(tiny_flux_model)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a red circle", num_inference_steps=2, generator=generator, height=32, width=32,
                        max_sequence_length=16, output_type="np").images

    before = render()
    pipeline.load_lora_weights(str(tmp_path))
    after = render()
    assert abs(after - before).max() > 1e-3
    pipeline.unload_lora_weights()
    np.testing.assert_allclose(render(), before, atol=1e-6)

    # What ComfyUI adds to each fused BFL weight, (alpha / rank) * up @ down, is exactly the
    # diffusers file's updates (lora_alpha / r) * B @ A stacked in BFL's order (q, k, v[, mlp]).
    # (diffusers' own kohya-Flux loader hard-codes the real model's widths, so the tiny model
    # cannot go through it.)
    def delta(module: str) -> torch.Tensor:
        return 2.0 * weights[f"transformer.{module}.lora_B.weight"] @ weights[f"transformer.{module}.lora_A.weight"]

    def kohya_delta(name: str) -> torch.Tensor:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        return kohya[f"{name}.alpha"] / down.shape[0] * up @ down

    qkv = torch.cat([delta(f"transformer_blocks.0.attn.to_{x}") for x in "qkv"])
    torch.testing.assert_close(kohya_delta("lora_unet_double_blocks_0_img_attn_qkv"), qkv)
    torch.testing.assert_close(kohya_delta("lora_unet_double_blocks_0_txt_mlp_0"),
                               delta("transformer_blocks.0.ff_context.net.0.proj"))
    linear1 = kohya_delta("lora_unet_single_blocks_1_linear1")
    attention = torch.cat([delta(f"single_transformer_blocks.1.attn.to_{x}") for x in "qkv"])
    torch.testing.assert_close(linear1[: attention.shape[0]], attention)
    assert not linear1[attention.shape[0]:].any()  # the MLP-in part has no LoRA by default


# ComfyUI's key map for Flux's CLIP-L (comfy/lora.py, model_lora_keys_clip): each
# `text_model.encoder.layers.<i>.self_attn.<q|k|v|out>_proj` as `lora_te1_<path, dots as underscores>`.
def comfy_clip_names(num_layers: int) -> set[str]:
    return {f"lora_te1_text_model_encoder_layers_{i}_self_attn_{m}_proj" for i in range(num_layers)
            for m in ("q", "k", "v", "out")}


def test_train_text_encoder_trains_clip_at_its_own_rate_and_leaves_t5(tiny_flux_model, square_data, tmp_path):
    options = dict(train_text_encoder=True, learning_rate=1e-3, text_encoder_lr=1e-2, max_train_steps=3, rank=2,
                   lora_alpha=4, validation_prompt="a red circle", num_validation_images=1, validation_inference_steps=2)
    run = setup(flux_config(tiny_flux_model, square_data, tmp_path / "setup", **options))
    # The script's groups: the transformer at learning_rate, CLIP at text_encoder_lr with its own decay.
    groups = run.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1e-3, 1e-4, sum(1 for p in run.unet.parameters() if p.requires_grad)),
        (1e-2, 1e-3, sum(1 for p in run.components.text_encoder.parameters() if p.requires_grad))]
    assert not any(p.requires_grad for p in run.components.text_encoder_2.parameters()), "T5 stays frozen"
    prodigy = setup(flux_config(tiny_flux_model, square_data, tmp_path / "prodigy", optimizer="prodigy",
                                **{**options, "learning_rate": 1.0}))
    assert [g["lr"] for g in prodigy.optimizer.param_groups] == [1.0, 1.0], "Prodigy: one rate, as the script"

    events = []
    config = flux_config(tiny_flux_model, square_data, tmp_path / "out", **options)
    with metadata.recording(config) as recorder:
        result = train(config, lambda event: (events.append(event), recorder(event)))
    start = next(e for e in events if e.type == "start")
    assert start.data["text_cache"] is False, "a trained text encoder's conditioning changes every step"
    assert "final-step-000003-0.png" in result.validation_images[-1]
    weights = load_file(str(result.lora_path))
    clip_keys = [k for k in weights if k.startswith("text_encoder.")]
    assert clip_keys and all(k.startswith(("transformer.", "text_encoder.")) for k in weights)
    assert any(weights[k].abs().max() > 0 for k in clip_keys if ".lora_B." in k), "CLIP's adapters trained"
    with safe_open(str(result.lora_path), "pt") as handle:
        assert handle.metadata()["ss_text_encoder_lr"] == "0.01"

    # The file loads whole into FluxPipeline: CLIP's adapters too, and they change the image.
    pipeline = FluxPipeline.from_pretrained(tiny_flux_model)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=32,
                        width=32, max_sequence_length=16, output_type="np").images

    pipeline.load_lora_weights(str(result.lora_path.parent))
    loaded = {n for n, _ in pipeline.text_encoder.named_parameters() if ".lora_A." in n}
    assert len(loaded) == len([k for k in clip_keys if ".lora_A." in k])
    both = render()
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights({k: v for k, v in weights.items() if k.startswith("transformer.")})
    assert abs(render() - both).max() > 1e-4, "the CLIP adapters change the image"

    # The ComfyUI file names CLIP-L's adapters as ComfyUI maps them, with the same update.
    kohya = load_file(str(result.lora_path.parent / "lora_kohya.safetensors"))
    clip_names = comfy_clip_names(pipeline.text_encoder.config.num_hidden_layers)
    te1 = {key.split(".", 1)[0] for key in kohya if key.startswith("lora_te1_")}
    assert te1 == clip_names
    down = kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    up = kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    alpha = kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    a, b = (weights[f"text_encoder.{k}" if f"text_encoder.{k}" in weights else f"text_encoder.text_model.{k}"]
            for k in ("encoder.layers.0.self_attn.q_proj.lora_A.weight", "encoder.layers.0.self_attn.q_proj.lora_B.weight"))
    torch.testing.assert_close(alpha / down.shape[0] * up @ down, 2.0 * b @ a)
