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

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from trainer.config import SD3Config
from trainer.families.base import Conditioning
from trainer.families.flux import (
    FlowComponents, FlowFamily, kohya_fused_state_dict, model_dtype, save_flow_kohya_lora,
)

SD3_TARGET_MODULES = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]
TOKEN_KEYS = ("input_ids", "input_ids_2", "input_ids_3")
# diffusers' SD3 modules (the parts fused there, in order) -> Stability's MMDiT module, which
# sd-scripts' SD3 LoRAs name and ComfyUI maps; relative to transformer_blocks.{i} / joint_blocks.{i}.
_SD3_TO_MMDIT = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
    ("attn.to_out.0",): "x_block.attn.proj",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
    ("attn.to_add_out",): "context_block.attn.proj",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv",
    ("attn2.to_out.0",): "x_block.attn2.proj",
    ("ff.net.0.proj",): "x_block.mlp.fc1",
    ("ff.net.2",): "x_block.mlp.fc2",
    ("ff_context.net.0.proj",): "context_block.mlp.fc1",
    ("ff_context.net.2",): "context_block.mlp.fc2",
    ("norm1.linear",): "x_block.adaLN_modulation.1",
    ("norm1_context.linear",): "context_block.adaLN_modulation.1",
}


def kohya_sd3_state_dict(transformer: torch.nn.Module, lora_alpha: float) -> dict[str, torch.Tensor]:
    """sd-scripts' SD3 naming (`lora_unet_joint_blocks_0_x_block_attn_qkv`, ...), which ComfyUI
    maps onto Stability's checkpoint (its `lora_unet_` + module path map of every model). The last
    block's context modulation is ordered (shift, scale) there, (scale, shift) in diffusers."""
    count = len(transformer.transformer_blocks)
    modules = [(tuple(f"transformer_blocks.{i}.{part}" for part in parts), f"joint_blocks.{i}.{name}")
               for i in range(count) for parts, name in _SD3_TO_MMDIT.items()]
    return kohya_fused_state_dict(transformer, lora_alpha, modules,
                                  swapped=frozenset({f"joint_blocks.{count - 1}.context_block.adaLN_modulation.1"}))


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

    def save_kohya_lora(self, output_dir, lora_alpha: float, models: dict[str, torch.nn.Module]) -> Path:
        """The file ComfyUI loads under sd-scripts' SD3 names (see kohya_sd3_state_dict); it loads
        the diffusers file too."""
        return save_flow_kohya_lora(output_dir, lora_alpha, models, kohya_sd3_state_dict(models["unet"], lora_alpha),
                                    "networks.lora_sd3")

    def predict(self, transformer, noisy_latents, timesteps, conditioning: Conditioning) -> torch.Tensor:
        return transformer(hidden_states=noisy_latents, timestep=timesteps,
                           encoder_hidden_states=conditioning["prompt_embeds"],
                           pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False)[0]
