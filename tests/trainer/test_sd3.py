"""The SD3 family on the tiny SD3 model: `train_dreambooth_lora_sd3.py`'s flow-matching inputs,
preconditioned target and weighting computed independently, its prompt encoding, refusals,
lora_blocks, same seed = cache on = off, freed text encoders, resume, and the LoRA that
StableDiffusion3Pipeline loads."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import loop
from trainer.config import ConfigError, load_config
from support.resume import assert_resume_matches
from trainer.loop import draw_inputs, optimize, setup, train
from trainer.sample_data import write_sample_dataset


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


def sd3_config(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=3,
        max_sequence_length=16, lr_warmup_steps=0, device="cpu",
    )
    return load_config({**values, **options}, "sd3")


@pytest.mark.parametrize("scheme,precondition", [("logit_normal", True), ("cosmap", False), ("sigma_sqrt", True)])
def test_flow_matching_inputs_target_and_weighting_are_the_scripts(scheme, precondition, tiny_sd3_model,
                                                                  square_data, tmp_path):
    run = setup(sd3_config(tiny_sd3_model, square_data, tmp_path, weighting_scheme=scheme,
                           precondition_outputs=precondition, cache_latents=False))
    batch = next(iter(run.dataloader))
    state = torch.get_rng_state()
    latents, noise, timesteps, conditioning = draw_inputs(run, batch)
    objective, config = run.objective, run.config
    noisy = objective.noisy_input(latents, noise, timesteps)
    with torch.no_grad():
        prediction = objective.prediction(run.family.predict(run.unet, noisy, timesteps, conditioning), noisy, timesteps)
    target = objective.target(latents, noise, timesteps)
    loss = objective.loss(prediction, target, timesteps)

    # The script's step, written out.
    vae, scheduler = run.components.vae, run.components.noise_scheduler
    torch.set_rng_state(state)
    with torch.no_grad():
        model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
        model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
        script_noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=2, logit_mean=config.logit_mean,
                                                  logit_std=config.logit_std, mode_scale=config.mode_scale)
        script_timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
        indices = [(scheduler.timesteps == t).nonzero().item() for t in script_timesteps]
        sigmas = scheduler.sigmas[indices].flatten().reshape(-1, 1, 1, 1)
        script_noisy = (1.0 - sigmas) * model_input + sigmas * script_noise
        model_pred = run.unet(hidden_states=script_noisy, timestep=script_timesteps,
                              encoder_hidden_states=conditioning["prompt_embeds"],
                              pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False)[0]
        if precondition:
            model_pred = model_pred * (-sigmas) + script_noisy
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        script_target = model_input if precondition else script_noise - model_input
        script_loss = torch.mean(
            (weighting.float() * (model_pred.float() - script_target.float()) ** 2).reshape(2, -1), 1).mean()

    for name, ours, theirs in (("latents", latents, model_input), ("noise", noise, script_noise),
                               ("timesteps", timesteps, script_timesteps), ("noisy", noisy, script_noisy),
                               ("prediction", prediction, model_pred), ("target", target, script_target),
                               ("weighting", objective.weighting(timesteps, latents), weighting)):
        assert torch.equal(ours, theirs), name
    assert torch.equal(loss, script_loss)
    # SD3's scheduler shifts its grid (shift 3): sigmas above the plain t / 1000.
    assert (sigmas.flatten() >= script_timesteps / 1000 - 1e-6).all()
    step_loss, _ = optimize(run, latents, noise, timesteps, conditioning)
    assert np.isfinite(step_loss)


def test_the_prompt_encoding_is_the_scripts(tiny_sd3_model, square_data, tmp_path):
    """Both CLIPs' penultimate states side by side, padded to T5's width, T5's states after them;
    the pooled conditioning is both CLIPs' projections side by side."""
    run = setup(sd3_config(tiny_sd3_model, square_data, tmp_path, cache_latents=False))
    batch = next(iter(run.dataloader))
    c = run.components
    encoded = run.family.encode_text(c, batch)
    with torch.no_grad():
        one = c.text_encoder(batch["input_ids"], output_hidden_states=True)
        two = c.text_encoder_2(batch["input_ids_2"], output_hidden_states=True)
        t5 = c.text_encoder_3(batch["input_ids_3"])[0]
    clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    assert torch.equal(encoded["prompt_embeds"], torch.cat([clip, t5], dim=-2))
    assert encoded["prompt_embeds"].shape[1] == 77 + 16
    assert torch.equal(encoded["pooled_prompt_embeds"], torch.cat([one[0], two[0]], dim=-1))


def test_options_defaults_and_refusals(tiny_sd3_model, square_data, tmp_path):
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
    config = load_config(base, "sd3")
    assert (config.weighting_scheme, config.precondition_outputs, config.max_sequence_length,
            config.adam_weight_decay) == ("logit_normal", True, 77, 1e-4)
    with pytest.raises(ConfigError, match="weighting_scheme: Input should be"):
        load_config({**base, "weighting_scheme": "cosine"}, "sd3")
    with pytest.raises(ConfigError, match="snr_gamma is not an option of the sd3 family"):
        load_config({**base, "snr_gamma": 5}, "sd3")
    with pytest.raises(ConfigError, match="guidance_scale is not an option of the sd3 family"):
        load_config({**base, "guidance_scale": 3.5}, "sd3")
    # lora_blocks: only those transformer blocks get LoRA.
    run = setup(sd3_config(tiny_sd3_model, square_data, tmp_path, lora_blocks="1"))
    adapted = {n for n, _ in run.unet.named_parameters() if ".lora_A." in n}
    assert adapted and all(n.startswith("transformer_blocks.1.") for n in adapted)


def test_same_seed_same_losses_cache_on_equals_off_and_text_encoders_freed(tiny_sd3_model, square_data, tmp_path):
    first = train(sd3_config(tiny_sd3_model, square_data, tmp_path / "a", cache_latents=False))
    second = train(sd3_config(tiny_sd3_model, square_data, tmp_path / "b", cache_latents=False))
    cached = train(sd3_config(tiny_sd3_model, square_data, tmp_path / "c", cache_latents=True))
    assert len(first.losses) == 3 and first.losses == second.losses == cached.losses

    run = setup(sd3_config(tiny_sd3_model, square_data, tmp_path / "d", cache_latents=True))
    refs = [weakref.ref(model) for model in run.family.text_encoders(run.components).values()]
    assert len(refs) == 3
    loop._release_text_encoders(run)
    gc.collect()
    assert all(ref() is None for ref in refs) and run.family.text_encoders(run.components) == {}
    assert np.isfinite(optimize(run, *draw_inputs(run, next(iter(run.dataloader))))[0])


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_resumed_run_ends_with_the_uninterrupted_weights(train_text_encoder, tiny_sd3_model, square_data, tmp_path):
    common = dict(max_train_steps=4, checkpointing_steps=2, random_flip=True, train_text_encoder=train_text_encoder)
    assert_resume_matches(lambda out, **extra: sd3_config(tiny_sd3_model, square_data, out, **common, **extra),
                          tmp_path, crash_step=3, checkpoint_step=2)


def test_lora_loads_into_the_sd3_pipeline_and_changes_the_output(tiny_sd3_model, square_data, tmp_path):
    result = train(sd3_config(tiny_sd3_model, square_data, tmp_path, learning_rate=5e-2, validation_prompt="a red circle",
                              num_validation_images=1, validation_inference_steps=2))
    assert len(result.validation_images) == 3 and "final-step-000003-0.png" in result.validation_images[-1]
    weights = load_file(str(result.lora_path))
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert any(".attn.to_q.lora_A." in k for k in weights) and any(".attn.add_k_proj.lora_B." in k for k in weights)

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a red circle", num_inference_steps=2, generator=generator, height=32, width=32,
                        max_sequence_length=16, output_type="np").images

    before = render()
    pipeline.load_lora_weights(str(tmp_path))
    # Every adapter in the file reached the transformer (none skipped as unknown names).
    loaded = {n for n, _ in pipeline.transformer.named_parameters() if ".lora_A." in n}
    assert len(loaded) == len([k for k in weights if ".lora_A." in k])
    after = render()
    assert abs(after - before).max() > 1e-3
    pipeline.unload_lora_weights()
    np.testing.assert_allclose(render(), before, atol=1e-6)


def test_train_text_encoder_trains_both_clips_and_the_file_loads(tiny_sd3_model, square_data, tmp_path):
    options = dict(train_text_encoder=True, text_encoder_lr=1e-2, learning_rate=1e-3)
    run = setup(sd3_config(tiny_sd3_model, square_data, tmp_path / "setup", **options))
    encoders = run.family.text_encoders(run.components)
    assert [(g["lr"], g["weight_decay"]) for g in run.optimizer.param_groups] == [(1e-3, 1e-4), (1e-2, 1e-3), (1e-2, 1e-3)]
    assert not any(p.requires_grad for p in encoders["text_encoder_3"].parameters()), "T5 stays frozen"

    result = train(sd3_config(tiny_sd3_model, square_data, tmp_path / "out", **options))
    weights = load_file(str(result.lora_path))
    assert {k.split(".", 1)[0] for k in weights} == {"transformer", "text_encoder", "text_encoder_2"}
    for prefix in ("text_encoder.", "text_encoder_2."):
        assert any(weights[k].abs().max() > 0 for k in weights if k.startswith(prefix) and ".lora_B." in k), prefix

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    for name in ("text_encoder", "text_encoder_2"):
        loaded = {n for n, _ in getattr(pipeline, name).named_parameters() if ".lora_A." in n}
        assert len(loaded) == len([k for k in weights if k.startswith(name + ".") and ".lora_A." in k]), name
    kohya = load_file(str(tmp_path / "out" / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)


def test_the_comfyui_file_is_the_same_update_on_stabilitys_layout(tiny_sd3_model, square_data, tmp_path):
    """sd-scripts' SD3 names (`lora_unet_` + the MMDiT module path), which ComfyUI maps onto every
    checkpoint module: merged into Stability's layout and converted by diffusers, the kohya file
    gives exactly the weights the diffusers file gives merged into diffusers' layout (fused q/k/v,
    and the last block's context modulation with its halves in the original order)."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from trainer.tiny_flow import sd3_original_state_dict

    layers = "attn.to_q,attn.to_k,attn.to_v,attn.add_k_proj,attn.to_out.0,attn.to_add_out,norm1_context.linear,ff.net.2"
    result = train(sd3_config(tiny_sd3_model, square_data, tmp_path / "out", learning_rate=5e-2, rank=2, lora_alpha=4,
                              lora_layers=layers))
    weights = load_file(str(result.lora_path))
    kohya = load_file(str(tmp_path / "out" / "lora_kohya.safetensors"))
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_model, subfolder="transformer").state_dict()
    original = sd3_original_state_dict(base)
    comfy_names = {"lora_unet_" + key[: -len(".weight")].replace(".", "_"): key
                   for key in original if key.endswith(".weight")}
    modules = {key.split(".", 1)[0] for key in kohya}
    assert modules <= set(comfy_names), sorted(modules - set(comfy_names))
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in modules  # the last block's
    assert "lora_unet_joint_blocks_0_context_block_attn_qkv" in modules  # k alone trained, q and v zeros
    with safe_open(str(tmp_path / "out" / "lora_kohya.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora_sd3"

    merged_original = dict(original)
    for module in modules:
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        key = comfy_names[module]
        merged_original[key] = original[key] + kohya[f"{module}.alpha"] / down.shape[0] * up @ down
    single = tmp_path / "merged.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in merged_original.items()}, str(single))
    from_kohya = SD3Transformer2DModel.from_single_file(str(single), config=str(tiny_sd3_model),
                                                         subfolder="transformer", local_files_only=True).state_dict()

    merged = dict(base)
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key[len("transformer."): -len(".lora_A.weight")]
            lora_b = weights[f"transformer.{module}.lora_B.weight"]
            merged[f"{module}.weight"] = base[f"{module}.weight"] + 2.0 * lora_b @ weights[key]  # alpha 4 / rank 2
    assert from_kohya.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(from_kohya[key], merged[key], rtol=0, atol=1e-6, msg=key)
