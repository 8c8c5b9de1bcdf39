"""Stable Diffusion 3 / 3.5: the family of diffusers' `train_dreambooth_lora_sd3.py`.

What differs from Flux (trainer/families/flux.py holds what they share):
- an `SD3Transformer2DModel` on unpacked 16-channel latents, called with the scheduler's
  timesteps as they are;
- two CLIP text encoders with projections and T5: the CLIPs' penultimate hidden states side by
  side, zero-padded to T5's width and joined with T5's states along the sequence; the pooled
  conditioning is both CLIPs' projected outputs side by side;
- `weighting_scheme` defaults to logit_normal and the outputs are preconditioned (EDM), as the
  script's defaults; T5's `max_sequence_length` defaults to 77;
- LoRA on the attention projections (`lora_layers` to choose), optionally only in the blocks
  of `lora_blocks`.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from trainer.config import SD3Config
from trainer.families.base import Conditioning
from trainer.families.flux import FlowComponents, FlowFamily, model_dtype

SD3_TARGET_MODULES = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]
TOKEN_KEYS = ("input_ids", "input_ids_2", "input_ids_3")


class SD3Family(FlowFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    tokenizer_classes = (("tokenizer", CLIPTokenizer), ("tokenizer_2", CLIPTokenizer),
                         ("tokenizer_3", T5TokenizerFast))
    text_encoder_classes = (("text_encoder", CLIPTextModelWithProjection),
                            ("text_encoder_2", CLIPTextModelWithProjection), ("text_encoder_3", T5EncoderModel))
    trained_text_encoders = ("text_encoder", "text_encoder_2")
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    target_modules = SD3_TARGET_MODULES

    def lora_targets(self, config: SD3Config) -> list[str]:
        modules = super().lora_targets(config)
        if config.lora_blocks is None:
            return modules
        return [f"transformer_blocks.{block}.{module}" for block in config.lora_blocks for module in modules]

    def tokenize(self, components: FlowComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizers = components.tokenizers
        return {TOKEN_KEYS[0]: self.tokenize_one(tokenizers["tokenizer"], captions, 77),
                TOKEN_KEYS[1]: self.tokenize_one(tokenizers["tokenizer_2"], captions, 77),
                TOKEN_KEYS[2]: self.tokenize_one(tokenizers["tokenizer_3"], captions, components.max_sequence_length)}

    def encode_text(self, components: FlowComponents, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The script's `encode_prompt`."""
        hidden, pooled = [], []
        for encoder, key in zip((components.text_encoder, components.text_encoder_2), TOKEN_KEYS):
            outputs = encoder(batch[key], output_hidden_states=True)
            pooled.append(outputs[0])
            hidden.append(outputs.hidden_states[-2].to(dtype=model_dtype(encoder)))
        t5 = components.text_encoder_3
        t5_embeds = t5(batch[TOKEN_KEYS[2]])[0].to(dtype=model_dtype(t5))
        clip_embeds = torch.cat(hidden, dim=-1)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return {"prompt_embeds": torch.cat([clip_embeds, t5_embeds], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def predict(self, transformer, noisy_latents, timesteps, conditioning: Conditioning) -> torch.Tensor:
        return transformer(hidden_states=noisy_latents, timestep=timesteps,
                           encoder_hidden_states=conditioning["prompt_embeds"],
                           pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False)[0]
