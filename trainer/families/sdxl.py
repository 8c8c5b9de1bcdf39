"""Stable Diffusion XL: the family of diffusers' `train_text_to_image_lora_sdxl.py`.

What differs from SD, as the script does it:
- two CLIP text encoders; the UNet is conditioned on both encoders' penultimate hidden states
  concatenated, on the second encoder's pooled (projected) output, and on `add_time_ids`:
  [original height, original width, crop top, crop left, resolution, resolution], the original
  size being the image's before resizing;
- the image is resized, then flipped (drawn with Python's `random`, and torchvision's
  `RandomHorizontalFlip(p=1.0)` then draws once more from torch), then cropped; the crop's
  top-left is recorded in the flipped image; with aspect-ratio buckets the crop is the bucket's
  and so is the target size in `add_time_ids` (as kohya's sd-scripts condition it);
- the pipeline's VAE runs in fp32 (SDXL's VAE overflows in fp16) and its latents are cast to the
  weight dtype; a separate VAE (`pretrained_vae_model_name_or_path`, e.g. the fp16-fix one) runs
  in the weight dtype;
- `train_text_encoder` puts LoRA on both text encoders;
- the kohya-format file names UNet modules as the original SDXL UNet does (kohya's sd-scripts);
- the training scheduler is a DDPMScheduler built from the pipeline's scheduler config.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer import data
from trainer.buckets import Buckets
from trainer.config import SDXLConfig
from trainer.detect import is_single_file_name
from trainer.families.base import Components, Conditioning, Family, load_error, single_file_pipeline
from trainer.model import ModelLoadError, save_kohya_lora, unet_key_to_original

TOKEN_KEYS = ("input_ids_one", "input_ids_two")  # the script's batch keys


@dataclass
class SDXLComponents(Components):
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


@dataclass(frozen=True)
class SDXLImageTransform(data.ImageTransform):
    """Resize the short side, maybe flip, crop; records the original size and the crop's top-left."""

    def draw_flip(self) -> bool:
        """The script's flip draw: `random.random() < 0.5`, then `RandomHorizontalFlip(p=1.0)`,
        which still draws `torch.rand(1)` before flipping."""
        if not (self.random_flip and random.random() < 0.5):
            return False
        torch.rand(1)
        return True

    def __call__(self, image: Image.Image, flip: bool | None = None) -> dict[str, torch.Tensor]:
        original_size = (image.height, image.width)
        crop = self.crop_size(image.size)
        target = self.resized_size(image.size)
        if target != image.size:
            image = image.resize(target, data.RESAMPLING[self.interpolation])
        if flip is None:
            flip = self.draw_flip()
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left, top, right, bottom = self._crop_box(image.size, crop)
        image = image.crop((left, top, right, bottom))
        array = np.array(image, dtype=np.uint8, copy=True)
        pixels = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        item = {
            "pixel_values": (pixels - 0.5) / 0.5,
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((top, left)),
        }
        if self.buckets is not None:  # the target size is the bucket's (kohya), not the square
            item["target_size"] = torch.tensor((crop[1], crop[0]))
        return item


class SDXLDataset(torch.utils.data.Dataset):
    """Decodes and transforms images on every access, a batch at a time as the script's
    `with_transform` does: every image of the batch first (flip and crop draws), then every
    caption (a multi-caption draw from Python's `random`, the same generator as the flips)."""

    def __init__(self, examples: list[data.Example], transform: SDXLImageTransform, tokenize):
        self.examples = examples
        self.transform = transform
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        items = [self.transform(data.load_rgb(self.examples[i].path)) for i in indices]
        tokens = self.tokenize([data.draw_caption(self.examples[i].caption) for i in indices])
        for position, item in enumerate(items):
            item.update((key, ids[position]) for key, ids in tokens.items())
        return items


class SDXLFamily(Family):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # The first encoder's last layer feeds nothing (its penultimate state is used): with its
    # LoRA trained, DDP must allow parameters without gradients, as the script sets.
    ddp_find_unused_parameters = True

    def load(self, config: SDXLConfig) -> SDXLComponents:
        source = config.pretrained_model_name_or_path
        try:
            if is_single_file_name(source):
                pipe = single_file_pipeline(self, config)
                components = SDXLComponents(
                    noise_scheduler=self.noise_scheduler(config.pretrained_config_dir, config),
                    vae=pipe.vae, unet=pipe.unet, tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                    text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                )
            else:
                common = {"revision": config.revision}
                weights = {"variant": config.variant, **common}
                components = SDXLComponents(
                    noise_scheduler=self.noise_scheduler(source, config),
                    tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
                    tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
                    text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
                    text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                        source, subfolder="text_encoder_2", **weights),
                    vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
                    unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
                )
        except ModelLoadError:
            raise
        except (OSError, ValueError, EnvironmentError) as error:
            raise load_error(config, error) from None
        if config.pretrained_vae_model_name_or_path:
            vae_source = config.pretrained_vae_model_name_or_path
            try:
                components.vae = AutoencoderKL.from_pretrained(vae_source, revision=config.revision,
                                                               variant=config.variant)
            except (OSError, ValueError, EnvironmentError) as error:
                raise ModelLoadError(f"pretrained_vae_model_name_or_path: cannot load {vae_source!r}: {error}") from None
        return components

    def frozen_dtype(self, name: str, config: SDXLConfig, weight_dtype: torch.dtype) -> torch.dtype:
        if name == "vae" and not config.pretrained_vae_model_name_or_path:
            return torch.float32  # the script's "VAE in float32 to avoid NaN losses"
        return weight_dtype

    def image_transform(self, config: SDXLConfig) -> SDXLImageTransform:
        return SDXLImageTransform(config.resolution, config.center_crop, config.random_flip,
                                  config.image_interpolation_mode, Buckets.from_config(config))

    def dataset(self, config: SDXLConfig, examples: list[data.Example], components: SDXLComponents):
        return SDXLDataset(examples, self.image_transform(config), lambda captions: self.tokenize(components, captions))

    def tokenize(self, components: SDXLComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        return {TOKEN_KEYS[0]: data.tokenize(components.tokenizer, captions),
                TOKEN_KEYS[1]: data.tokenize(components.tokenizer_2, captions)}

    def encode_text(self, components: SDXLComponents, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The script's `encode_prompt`: each encoder's penultimate hidden states, concatenated;
        the pooled output of the last (second) encoder."""
        hidden, pooled = [], None
        for encoder, key in zip((components.text_encoder, components.text_encoder_2), TOKEN_KEYS):
            outputs = encoder(batch[key], output_hidden_states=True, return_dict=False)
            pooled = outputs[0]  # CLIPTextModelWithProjection: the projected pooled output
            hidden.append(outputs[-1][-2])
        prompt_embeds = torch.cat(hidden, dim=-1)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled.view(prompt_embeds.shape[0], -1)}

    def conditioning(self, components: SDXLComponents, batch: dict[str, torch.Tensor], config: SDXLConfig,
                     weight_dtype: torch.dtype) -> Conditioning:
        text = self.text_conditioning(components, batch)
        return Conditioning(**text, time_ids=self.time_ids(batch, config.resolution, weight_dtype))

    @staticmethod
    def time_ids(batch: dict[str, torch.Tensor], resolution: int, dtype: torch.dtype) -> torch.Tensor:
        """[original h, original w, crop top, crop left, target h, target w] per image: the
        target is the square resolution, or with buckets each image's bucket (recorded by the
        transform, so cached items carry it too)."""
        original, crop = batch["original_size"], batch["crop_top_left"]
        target = batch.get("target_size")
        if target is None:
            target = torch.tensor([resolution, resolution], device=original.device).expand(len(original), 2)
        return torch.cat([original, crop, target.to(original.device)], dim=1).to(dtype=dtype)

    def save_kohya_lora(self, output_dir, lora_alpha: float, models: dict[str, torch.nn.Module]):
        """kohya's SDXL LoRAs name UNet modules as the original UNet does (sd-scripts trains that
        UNet): `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, not diffusers'
        `lora_unet_down_blocks_1_attentions_0_...`; the text encoders keep transformers' names
        (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`), as sd-scripts' do."""
        config = models["unet"].config
        up_attentions = {i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
        return save_kohya_lora(output_dir, lora_alpha, models, rename={
            "unet": lambda key: unet_key_to_original(key, config.layers_per_block, up_attentions)})

    def predict(self, unet, noisy_latents, timesteps, conditioning: Conditioning) -> torch.Tensor:
        added = {"time_ids": conditioning["time_ids"], "text_embeds": conditioning["pooled_prompt_embeds"]}
        return unet(noisy_latents, timesteps, conditioning["prompt_embeds"], added_cond_kwargs=added,
                    return_dict=False)[0]
