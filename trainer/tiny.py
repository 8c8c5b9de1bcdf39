"""A tiny, randomly initialised Stable-Diffusion-shaped pipeline for tests and smoke runs.

It has the same component layout, module names (``to_q``/``to_k``/``to_v``/``to_out.0``),
latent shape conventions (VAE downsampling by 8, 4 latent channels) and tokenizer behaviour
(77 CLIP ids) as a real SD 1.x checkpoint, but is a few MB and builds offline in well under
a second, so the trainer can be exercised end to end without the model hub.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def build_tokenizer() -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer from a locally written vocab.json/merges.txt."""
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _MERGES), BOS, EOS]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES), encoding="utf-8")
        # transformers 5 names these `vocab`/`merges`; the old `vocab_file=`/`merges_file=`
        # keywords are silently ignored and leave a 3-token vocab that maps everything to unk.
        return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=MAX_LENGTH)


def write_tiny_model(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny random SD pipeline to ``out_dir`` (safetensors) and return its path.

    Weights depend only on ``seed``; the caller's global torch RNG state is left untouched.
    The default image size is 32 px (``unet.sample_size`` 4 times the VAE factor of 8).
    """
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
