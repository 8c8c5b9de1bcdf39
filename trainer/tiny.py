"""Tiny, randomly initialised SD- and SDXL-shaped pipelines for tests and smoke runs.

Each has the same component layout, module names (``to_q``/``to_k``/``to_v``/``to_out.0``),
latent shape conventions (VAE downsampling by 8, 4 latent channels) and tokenizer behaviour
(77 CLIP ids) as a real SD 1.x / SDXL checkpoint, but is a few MB and builds offline in well
under a second, so the trainer can be exercised end to end without the model hub.
`write_single_file` writes either as an original-format single ``.safetensors`` checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges (their results must be in the vocab too) so the BPE merge path is exercised;
# everything else falls back to one token per byte, which still covers any caption.
_MERGES = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for raw bytes used by GPT-2/CLIP byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    # Unprintable bytes are shifted past 255 so every token stays visible in vocab.json.
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer from a locally written vocab.json/merges.txt.

    `pad_token`: SDXL's second tokenizer pads with "!" where the first pads with the end token.
    """
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _MERGES), BOS, EOS]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES), encoding="utf-8")
        # transformers 5 names these `vocab`/`merges`; the old `vocab_file=`/`merges_file=`
        # keywords are silently ignored and leave a 3-token vocab that maps everything to unk.
        extra = {"pad_token": pad_token} if pad_token else {}
        return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=MAX_LENGTH, **extra)


def write_tiny_model(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0,
                     family: str = "sd", flux_variant: str = "dev") -> Path:
    """Write a tiny random pipeline of `family` ("sd", "sdxl", "flux" or "sd3") to ``out_dir``
    (safetensors) and return its path.

    Weights depend only on ``seed``; the caller's global torch RNG state is left untouched.
    The default image size is 32 px (``unet.sample_size`` 4 times the VAE factor of 8).
    `prediction_type` is for the DDPM families; `flux_variant` ("dev", "schnell") for Flux.
    """
    if family == "sdxl":
        return write_tiny_sdxl(out_dir, prediction_type, seed)
    if family in ("flux", "sd3"):
        from trainer.tiny_flow import write_tiny_flux, write_tiny_sd3

        return write_tiny_flux(out_dir, flux_variant, seed) if family == "flux" else write_tiny_sd3(out_dir, seed)
    if family != "sd":
        raise ValueError(f"family: no tiny model for {family!r} (sd, sdxl, flux, sd3)")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    # Everything is built on CPU, so only the CPU generator needs forking.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=4,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        # What SD 1.x ships; with 0 the pipeline warns and rewrites it on construction.
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=4, latent_channels=4, sample_size=32, scaling_factor=scaling_factor,
    )


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def write_tiny_sdxl(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny random SDXL pipeline: two text encoders (the second with a projection, as OpenCLIP
    bigG) and tokenizers, a UNet with SDXL's text-time conditioning, SDXL's VAE scaling factor
    and Euler scheduler config."""
    out_dir = Path(out_dir)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    time_embed_dim, pooled_dim = 8, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=4, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=72,  # both encoders' hidden states (32 + 40), concatenated
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        )
        vae = _tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        # A different width from the first encoder's, as in real SDXL (768 vs 1280): a single-file
        # loader tells the two apart by it.
        text_encoder_2 = CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer_2, projection_dim=pooled_dim, hidden_size=40))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Single-file checkpoints (the original CompVis / Stability layout), for the single-file tests

_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER_TO_LDM = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                          "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _vae_key_to_ldm(key: str, value: torch.Tensor, up_blocks: int) -> tuple[str, torch.Tensor]:
    """A diffusers VAE key (and value: attention projections become 1x1 convolutions)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    if key in DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return DIFFUSERS_TO_LDM_MAPPING["vae"][key], value
    parts = key.split(".")
    coder = parts[0]
    if parts[1] == "mid_block":
        kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "attentions":
            for old, new in _VAE_ATTENTION_TO_LDM.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
            if value.ndim == 2:
                value = value[:, :, None, None]
            return f"{coder}.mid.attn_1.{rest}", value
        return f"{coder}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", value
    block, kind, index, rest = int(parts[2]), parts[3], int(parts[4]), ".".join(parts[5:])
    level = block if coder == "encoder" else up_blocks - 1 - block
    name = "down" if coder == "encoder" else "up"
    if kind in ("downsamplers", "upsamplers"):
        return f"{coder}.{name}.{level}.{kind[:-2]}.{rest}", value  # downsample.conv / upsample.conv
    return f"{coder}.{name}.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}", value


def _clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under `prefix`, in its own (text_model.*) naming."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key  # transformers >= 5.6 flattened CLIPTextModel
        out[prefix + key] = value
    return out


def _openclip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's naming (SDXL's second encoder, bigG)."""
    out = {}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, name in fixed.items():
        out[prefix + name] = state.pop(key)
    out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        source, target = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{source}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
        for key in [k for k in state if k.startswith(source)]:
            rest = key[len(source):]
            for old, new in _OPENCLIP_LAYER_TO_LDM.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
            out[target + rest] = state.pop(key)
    if state:
        raise ValueError(f"unmapped text encoder keys: {sorted(state)[:3]}")
    return out


def write_single_file(pipeline_dir: str | Path, out_file: str | Path) -> Path:
    """Write an SD or SDXL pipeline folder as one original-format `.safetensors` checkpoint (the
    layout finetunes are shared in), which diffusers' `from_single_file` reads back given the
    folder as `config`. Every tensor is kept exactly (renamed, reshaped or concatenated only)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from trainer.model import unet_key_to_original

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    unet_config = pipe.unet.config
    up_attentions = {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}
    checkpoint = {
        "model.diffusion_model." + unet_key_to_original(k, unet_config.layers_per_block, up_attentions): v
        for k, v in pipe.unet.state_dict().items()
    }
    for key, value in pipe.vae.state_dict().items():
        name, value = _vae_key_to_ldm(key, value, len(pipe.vae.config.up_block_types))
        checkpoint["first_stage_model." + name] = value
    if isinstance(pipe, StableDiffusionXLPipeline):
        checkpoint.update(_clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        checkpoint.update(_openclip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        checkpoint.update(_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in checkpoint.items()}, str(out_file))
    return out_file
