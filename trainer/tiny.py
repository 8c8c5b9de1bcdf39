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
                     family: str = "sd") -> Path:
    """Write a tiny random pipeline of `family` ("sd" or "sdxl") to ``out_dir`` (safetensors) and
    return its path.

    Weights depend only on ``seed``; the caller's global torch RNG state is left untouched.
    The default image size is 32 px (``unet.sample_size`` 4 times the VAE factor of 8).
    """
    if family == "sdxl":
        return write_tiny_sdxl(out_dir, prediction_type, seed)
    if family != "sd":
        raise ValueError(f"family: no tiny model for {family!r} (sd, sdxl)")
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


def _tiny_text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
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
            cross_attention_dim=64,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        )
        vae = _tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, projection_dim=pooled_dim))
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
