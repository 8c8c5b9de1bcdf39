"""Stable Diffusion 1.x / 2.x: the family of diffusers' `train_text_to_image_lora.py`.

One CLIP text encoder whose last hidden state conditions the UNet; images resized, cropped, then
maybe flipped (torchvision's order and random draws, see trainer/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from trainer import data
from trainer.buckets import Buckets
from trainer.config import TrainConfig
from trainer.detect import is_single_file_name
from trainer.families.base import Components, Conditioning, Family, load_error, single_file_pipeline
from trainer.model import ModelLoadError


@dataclass
class SDComponents(Components):
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel


class SDFamily(Family):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    text_keys = ("encoder_hidden_states",)
    text_encoder_names = ("text_encoder",)

    def load(self, config: TrainConfig) -> SDComponents:
        source = config.pretrained_model_name_or_path
        try:
            if is_single_file_name(source):
                pipe = single_file_pipeline(self, config)
                return SDComponents(
                    noise_scheduler=self.noise_scheduler(config.pretrained_config_dir, config),
                    vae=pipe.vae, unet=pipe.unet, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                )
            common = {"revision": config.revision}
            noise_scheduler = self.noise_scheduler(source, config)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=config.variant, **common)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=config.variant, **common)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=config.variant, **common)
        except ModelLoadError:
            raise
        except (OSError, ValueError, EnvironmentError) as error:
            raise load_error(config, error) from None
        return SDComponents(noise_scheduler=noise_scheduler, vae=vae, unet=unet, tokenizer=tokenizer,
                            text_encoder=text_encoder)

    def image_transform(self, config: TrainConfig) -> data.ImageTransform:
        return data.ImageTransform(config.resolution, config.center_crop, config.random_flip,
                                   config.image_interpolation_mode, Buckets.from_config(config))

    def dataset(self, config: TrainConfig, examples: list[data.Example], components: SDComponents):
        return data.ImageCaptionDataset(examples, self.image_transform(config), components.tokenizer)

    def tokenize(self, components: SDComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": data.tokenize(components.tokenizer, captions)}

    def encode_text(self, components: SDComponents, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The ids are on the training device already (a prepared loader, or the cache's own).
        return {"encoder_hidden_states": components.text_encoder(batch["input_ids"], return_dict=False)[0]}

    def predict(self, unet, noisy_latents, timesteps, conditioning: Conditioning) -> torch.Tensor:
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]

    def pipeline_kwargs(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}
