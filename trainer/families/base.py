"""The model-family interface: what differs between SD, SDXL and the families to come.

The loop (trainer/loop.py) is one loop for every family: encode, noise, predict, loss, step,
accumulation, clipping, checkpoints and resume. It asks the family for everything else: which
components to load and in which dtype, the image transform (and what else each image records),
tokens and text conditioning, the UNet call, which modules get LoRA, the LoRA files, and the
pipeline that renders validation images. A family is one subclass of `Family` in its own module,
registered in `trainer.families.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from trainer import data
from trainer.config import CommonConfig, config_model
from trainer.detect import is_single_file_name
from trainer.model import (
    KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, ModelLoadError,
    lora_config, save_kohya_lora, save_lora,
)

__all__ = ["Components", "Conditioning", "Family", "KOHYA_WEIGHTS_NAME", "LORA_WEIGHTS_NAME"]


@dataclass
class Components:
    """What every family loads; families add their tokenizers and text encoders."""

    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL
    unet: torch.nn.Module


class Conditioning(dict):
    """The UNet's conditioning for a batch: batch-first tensors by name. Indexing with a slice or
    index tensor selects examples of every tensor (a batch split into micro-batches)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return Conditioning({name: value[key] for name, value in self.items()})

    def detach(self) -> Conditioning:
        return Conditioning({name: value.detach() for name, value in self.items()})


class Family:
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    # The keys `encode_text` returns: per-example text conditioning, cacheable when the text
    # encoders are frozen. The loop takes them from the batch when a cache put them there.
    text_keys: ClassVar[tuple[str, ...]]
    # Component names of the text encoders, in the order the scripts attach LoRA to them.
    text_encoder_names: ClassVar[tuple[str, ...]]
    unet_target_modules: ClassVar[list[str]] = UNET_TARGET_MODULES
    text_encoder_target_modules: ClassVar[list[str]] = TEXT_ENCODER_TARGET_MODULES
    # DDP must tolerate adapters that get no gradient (SDXL's first text encoder's last layer).
    ddp_find_unused_parameters: ClassVar[bool] = False

    @property
    def config_model(self) -> type[CommonConfig]:
        return config_model(self.name)

    # ---- loading -----------------------------------------------------------------------------

    def load(self, config: CommonConfig) -> Components:
        """Load the components from a pipeline folder, a hub id (local cache) or a single file."""
        raise NotImplementedError

    def text_encoders(self, components: Components) -> dict[str, torch.nn.Module]:
        return {name: getattr(components, name) for name in self.text_encoder_names}

    def models(self, components: Components) -> dict[str, torch.nn.Module]:
        """Every neural network of the family by component name."""
        return {"unet": components.unet, **self.text_encoders(components), "vae": components.vae}

    def place(self, components: Components, config: CommonConfig, device, weight_dtype: torch.dtype) -> None:
        """Freeze every model and move it to the device in the dtype its family trains it in."""
        for name, model in self.models(components).items():
            model.requires_grad_(False)
            model.to(device, dtype=self.frozen_dtype(name, config, weight_dtype))

    def frozen_dtype(self, name: str, config: CommonConfig, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of a frozen model: the weight dtype, as the scripts do."""
        return weight_dtype

    def add_adapters(self, components: Components, config: CommonConfig) -> dict[str, torch.nn.Module]:
        """Attach LoRA (drawing its gaussian init) in the scripts' order; returns the trainable
        models by name, the UNet first."""
        components.unet.add_adapter(lora_config(config, self.unet_target_modules))
        trainable = {"unet": components.unet}
        if config.train_text_encoder:
            for name, encoder in self.text_encoders(components).items():
                encoder.add_adapter(lora_config(config, self.text_encoder_target_modules))
                trainable[name] = encoder
        return trainable

    def parameter_groups(self, config: CommonConfig, trainable: dict[str, torch.nn.Module],
                         learning_rate: float) -> list:
        """What the optimizer steps: every LoRA weight at one learning rate (the SD and SDXL
        scripts), or param groups with their own rates (Flux/SD3 text encoders)."""
        return [p for model in trainable.values() for p in model.parameters() if p.requires_grad]

    def prepared(self, components: Components, models: dict[str, torch.nn.Module]) -> Components:
        """The components as training calls them: the trainable ones replaced by the models
        accelerate prepared (DDP must see their forward passes to sync gradients)."""
        return dataclasses.replace(components, **models)

    def enable_gradient_checkpointing(self, trainable: dict[str, torch.nn.Module]) -> None:
        for name, model in trainable.items():
            if name == "unet":
                model.enable_gradient_checkpointing()
            else:
                model.gradient_checkpointing_enable()

    def objective(self, components: Components, config: CommonConfig):
        """The training objective (draw noise and timesteps, noisy input, target, loss): the
        DDPM one of the SD/SDXL scripts here (trainer/losses.py); flow matching for Flux/SD3."""
        from trainer.losses import DDPMObjective

        return DDPMObjective(components.noise_scheduler, config.noise_offset, config.snr_gamma)

    def captions(self, config: CommonConfig, examples: list[data.Example]) -> list[data.Example]:
        """The examples as trained on (Flux/SD3: an instance prompt for caption-less images)."""
        return examples

    def release_text_encoders(self, components: Components, dry_run: bool = False) -> bool:
        """Free the frozen text encoders once every caption's conditioning is cached; returns
        whether it does (SD/SDXL keep them, as their scripts do)."""
        return False

    def noise_scheduler(self, source: str, config: CommonConfig) -> DDPMScheduler:
        """The training scheduler: a DDPMScheduler from the pipeline's scheduler config, with the
        prediction type overridden on request (both scripts do this)."""
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        if config.prediction_type is not None:
            scheduler.register_to_config(prediction_type=config.prediction_type)
        return scheduler

    # ---- data --------------------------------------------------------------------------------

    def image_transform(self, config: CommonConfig):
        """A callable `(image, flip=None)` giving pixel values (a tensor, or a dict holding
        `pixel_values` and whatever else the family records per image), with `crop_is_fixed(size)`."""
        raise NotImplementedError

    def dataset(self, config: CommonConfig, examples: list[data.Example], components: Components):
        """The uncached dataset: decodes, transforms and tokenizes on every access."""
        raise NotImplementedError

    def tokenize(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- the two hooks the latent cache calls -----------------------------------------------

    def encode_image_params(self, components: Components, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and logvar) for a batch of pixels, no sampling."""
        vae = components.vae
        return vae.encode(pixel_values.to(dtype=vae.dtype)).latent_dist.parameters

    def encode_text(self, components: Components, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-example text conditioning (`text_keys`) from the batch's token ids."""
        raise NotImplementedError

    # ---- a training step ---------------------------------------------------------------------

    def sample_latents(self, components: Components, params: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
        """Sample the posterior (the scripts' `latent_dist.sample()`: the same draw, the same
        layout) and scale it; latents go to the UNet in the weight dtype."""
        latents = DiagonalGaussianDistribution(params).sample() * components.vae.config.scaling_factor
        return latents.to(weight_dtype)

    def text_conditioning(self, components: Components, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cached text conditioning when the batch carries it, else encoded now."""
        if all(key in batch for key in self.text_keys):
            return {key: batch[key] for key in self.text_keys}
        return self.encode_text(components, batch)

    def conditioning(self, components: Components, batch: dict[str, torch.Tensor], config: CommonConfig,
                     weight_dtype: torch.dtype) -> Conditioning:
        """Everything the UNet is conditioned on for this batch."""
        return Conditioning(self.text_conditioning(components, batch))

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    # ---- files and validation ----------------------------------------------------------------

    def save_lora(self, output_dir: str | Path, models: dict[str, torch.nn.Module]) -> Path:
        """The diffusers-format LoRA that this family's pipeline loads with `load_lora_weights`."""
        return save_lora(output_dir, self.pipeline_class, models)

    def save_kohya_lora(self, output_dir: str | Path, lora_alpha: float, models: dict[str, torch.nn.Module]) -> Path:
        return save_kohya_lora(output_dir, lora_alpha, models)

    def pipeline(self, config: CommonConfig, dtype: torch.dtype, device, **models: Any):
        """The base model's pipeline around in-memory models (as the scripts build it for
        validation); what is not given, such as the inference scheduler, is read from the source."""
        with torch.random.fork_rng(devices=[]):
            pipeline = self.load_pipeline(config, dtype, **models)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

    def load_pipeline(self, config: CommonConfig, dtype: torch.dtype, **models: Any):
        """The pipeline from a folder or hub id, or from a single file with its config folder."""
        source = config.pretrained_model_name_or_path
        if is_single_file_name(source):
            return self.pipeline_class.from_single_file(
                source, config=single_file_config_dir(config), local_files_only=True, dtype=dtype,
                **self.pipeline_kwargs(), **models,
            )
        return self.pipeline_class.from_pretrained(
            source, revision=config.revision, variant=config.variant, dtype=dtype, **self.pipeline_kwargs(), **models,
        )

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}


def single_file_config_dir(config: CommonConfig) -> str:
    if not config.pretrained_config_dir:
        raise ModelLoadError(
            f"pretrained_config_dir: {config.pretrained_model_name_or_path} is a single-file checkpoint; "
            "give a local diffusers folder of the same family for its component configs and tokenizers"
        )
    return config.pretrained_config_dir


def load_error(config: CommonConfig, error: Exception) -> ModelLoadError:
    return ModelLoadError(f"pretrained_model_name_or_path: cannot load {config.pretrained_model_name_or_path!r}: {error}")


def single_file_pipeline(family: Family, config: CommonConfig):
    """A single-file checkpoint loaded as the family's pipeline (fp32, on the CPU), its configs
    and tokenizers from `pretrained_config_dir`; nothing is downloaded."""
    return family.pipeline(config, torch.float32, "cpu")
