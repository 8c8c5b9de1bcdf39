"""Tiny, randomly initialised Flux.1- and SD3-shaped pipelines for tests and smoke runs.

Each has the component layout, class names and module names of the real pipeline
(`FluxPipeline`: CLIP L + T5, a `FluxTransformer2DModel` with or without the guidance embedding
of the dev model; `StableDiffusion3Pipeline`: CLIP L and CLIP G with projections + T5, an
`SD3Transformer2DModel`), a 16-channel VAE with the real shift and scaling factors and no
quant convolutions, and the flow-matching Euler scheduler with the real shift settings, but is a
few MB and builds offline in about a second.

The T5 tokenizer is generated here: a small Unigram vocabulary (the model T5's SentencePiece
tokenizer is) covering ASCII letters, digits and punctuation, wrapped as `T5TokenizerFast`, so
`T5TokenizerFast.from_pretrained(dir, subfolder="tokenizer_2")` loads it as the pipelines do.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast,
)

from trainer.tiny import _tiny_text_config, build_tokenizer

FLUX_VARIANTS = ("dev", "schnell")
T5_MAX_LENGTH = 512  # what the real T5 tokenizers of Flux and SD3 declare
# A few whole words so the Unigram segmentation path (longest pieces win) is exercised; any
# other ASCII text falls back to one piece per character, so every caption round-trips.
_T5_WORDS = ("a", "the", "photo", "of", "red", "blue", "green", "cat", "dog", "on", "in", "with", "and")
_FLUX_VAE = {"shift_factor": 0.1159, "scaling_factor": 0.3611}   # black-forest-labs/FLUX.1-dev
_SD3_VAE = {"shift_factor": 0.0609, "scaling_factor": 1.5305}    # stabilityai/stable-diffusion-3-medium


def build_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (pad 0, ``</s>`` 1, unk 2, then pieces) built from a local Unigram vocab."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    # Whole words score better than their letters combined, so "▁photo" is one piece.
    pieces += [("▁" + word, -3.0) for word in _T5_WORDS]
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces += [("▁" + char, -6.0) for char in characters if "▁" + char not in dict(pieces)]
    pieces += [(char, -5.0) for char in characters]
    # extra_ids=0: T5's 100 sentinel tokens are for span corruption, which no pipeline uses.
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _tiny_t5(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        # v1.1 (what Flux and SD3 use): gated GELU feed-forward, no tied embeddings.
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def _tiny_flow_vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """16 latent channels, downsampling by 8 (four blocks), no quant convs: the Flux/SD3 VAE shape."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=4, latent_channels=16, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def write_tiny_flux(out_dir: str | Path, variant: str = "dev", seed: int = 0) -> Path:
    """A tiny random FluxPipeline: "dev" has the guidance embedding and the dynamic (resolution
    dependent) scheduler shift, "schnell" neither, as the two real models ship."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"flux variant: {variant!r} is not one of {', '.join(FLUX_VARIANTS)}")
    out_dir = Path(out_dir)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32,      # T5's width
            pooled_projection_dim=32,    # CLIP's pooled output (its hidden size)
            guidance_embeds=variant == "dev", axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        vae = _tiny_flow_vae(**_FLUX_VAE)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        text_encoder_2 = _tiny_t5(tokenizer_2, d_model=32)
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random StableDiffusion3Pipeline: CLIP L and CLIP G (both with projections, of
    different widths as the real 768/1280) and T5, whose width is at least the two CLIPs' hidden
    states side by side (the pipeline pads those to it before joining T5's)."""
    out_dir = Path(out_dir)
    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(pad_token="!"), build_t5_tokenizer()
    clip_l, clip_g, t5_width = 32, 40, 80
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=4,  # the pipeline's default image: 4 latents x 8 = 32 px
            patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
            pooled_projection_dim=clip_l + clip_g,  # both CLIPs' projected pooled outputs joined
            pos_embed_max_size=32,  # up to 32 x 2 x 8 = 512 px
        )
        vae = _tiny_flow_vae(**_SD3_VAE)
        text_encoder = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, projection_dim=clip_l))
        text_encoder_2 = CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer_2, projection_dim=clip_g, hidden_size=clip_g))
        text_encoder_3 = _tiny_t5(tokenizer_3, d_model=t5_width)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ------------------------------------------------------------------------------------------
# Single-file checkpoints (BFL's Flux layout, Stability's SD3 MMDiT layout), for the single-file
# tests: the inverse of diffusers' convert_flux/sd3_transformer_checkpoint_to_diffusers, so that
# `from_single_file` reads back exactly the transformer written. Every tensor is kept exactly
# (renamed or concatenated; the final norms' halves swapped back).


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' swap_scale_shift, which is its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _move(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor], original: str, name: str) -> None:
    """A module's weight and bias (where it has one) under its original name."""
    for suffix in ("weight", "bias"):
        if f"{name}.{suffix}" in state:
            out[f"{original}.{suffix}"] = state[f"{name}.{suffix}"]


def _fuse(state: dict[str, torch.Tensor], names: list[str], suffix: str) -> torch.Tensor:
    return torch.cat([state[f"{name}.{suffix}"] for name in names], dim=0)


def flux_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `FluxTransformer2DModel` state dict in BFL's layout (`double_blocks.0.img_attn.qkv.weight`, ...)."""
    out: dict[str, torch.Tensor] = {}

    def move(original: str, name: str) -> None:
        _move(state, out, original, name)

    for original, name in (("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                           ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                           ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                           ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                           ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                           ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
                           ("txt_in", "context_embedder"), ("img_in", "x_embedder"),
                           ("final_layer.linear", "proj_out")):
        move(original, name)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        b, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for original, name in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                               ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                               ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                               ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")):
            move(f"{o}.{original}", f"{b}.{name}")
        for suffix in ("weight", "bias"):
            out[f"{o}.img_attn.qkv.{suffix}"] = _fuse(state, [f"{b}.attn.to_{x}" for x in "qkv"], suffix)
            out[f"{o}.txt_attn.qkv.{suffix}"] = _fuse(state, [f"{b}.attn.add_{x}_proj" for x in "qkv"], suffix)
        for original, name in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                               ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                               ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{o}.{original}.scale"] = state[f"{b}.{name}.weight"]
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{o}.modulation.lin", f"{b}.norm.linear")
        move(f"{o}.linear2", f"{b}.proj_out")
        for suffix in ("weight", "bias"):
            out[f"{o}.linear1.{suffix}"] = _fuse(state, [*(f"{b}.attn.to_{x}" for x in "qkv"), f"{b}.proj_mlp"], suffix)
        out[f"{o}.norm.query_norm.scale"] = state[f"{b}.attn.norm_q.weight"]
        out[f"{o}.norm.key_norm.scale"] = state[f"{b}.attn.norm_k.weight"]
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(state["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(state["norm_out.linear.bias"])
    return out


def sd3_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel` state dict in Stability's MMDiT layout (`joint_blocks.0.x_block.attn.qkv.weight`, ...)."""
    out: dict[str, torch.Tensor] = {"pos_embed": state["pos_embed.pos_embed"]}

    def move(original: str, name: str) -> None:
        _move(state, out, original, name)

    for original, name in (("x_embedder.proj", "pos_embed.proj"),
                           ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                           ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                           ("context_embedder", "context_embedder"),
                           ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                           ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                           ("final_layer.linear", "proj_out")):
        move(original, name)
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        b, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        last = i == blocks[-1]  # context_pre_only: no context output projection or MLP
        for suffix in ("weight", "bias"):
            out[f"{x}.attn.qkv.{suffix}"] = _fuse(state, [f"{b}.attn.to_{q}" for q in "qkv"], suffix)
            out[f"{c}.attn.qkv.{suffix}"] = _fuse(state, [f"{b}.attn.add_{q}_proj" for q in "qkv"], suffix)
            if f"{b}.attn2.to_q.{suffix}" in state:
                out[f"{x}.attn2.qkv.{suffix}"] = _fuse(state, [f"{b}.attn2.to_{q}" for q in "qkv"], suffix)
            context_norm = state[f"{b}.norm1_context.linear.{suffix}"]
            out[f"{c}.adaLN_modulation.1.{suffix}"] = _swap_halves(context_norm) if last else context_norm
        for original, name in (("ln_q", "norm_q"), ("ln_k", "norm_k")):
            move(f"{x}.attn.{original}", f"{b}.attn.{name}")
            move(f"{c}.attn.{original}", f"{b}.attn.norm_added_{name[-1]}")
            move(f"{x}.attn2.{original}", f"{b}.attn2.{name}")
        for original, name in (("attn.proj", "attn.to_out.0"), ("attn2.proj", "attn2.to_out.0"),
                               ("adaLN_modulation.1", "norm1.linear"), ("mlp.fc1", "ff.net.0.proj"),
                               ("mlp.fc2", "ff.net.2")):
            move(f"{x}.{original}", f"{b}.{name}")
        if not last:
            for original, name in (("attn.proj", "attn.to_add_out"), ("mlp.fc1", "ff_context.net.0.proj"),
                                   ("mlp.fc2", "ff_context.net.2")):
                move(f"{c}.{original}", f"{b}.{name}")
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(state["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(state["norm_out.linear.bias"])
    return out


def write_flow_single_file(transformer: torch.nn.Module, out_file: str | Path) -> Path:
    """A Flux or SD3 transformer as the single `.safetensors` file finetunes are shared as
    (keys under `model.diffusion_model.`, as ComfyUI saves them)."""
    from safetensors.torch import save_file

    state = transformer.state_dict()
    original = (flux_original_state_dict if isinstance(transformer, FluxTransformer2DModel)
                else sd3_original_state_dict)(state)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"model.diffusion_model.{k}": v.detach().contiguous() for k, v in original.items()}, str(out_file))
    return out_file
