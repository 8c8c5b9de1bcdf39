"""The validated configuration of a training run, one model per model family.

Field names and defaults follow diffusers' `train_text_to_image_lora.py` (SD) and
`train_text_to_image_lora_sdxl.py` (SDXL), so their users can bring their flags as they are. The
options every family shares live in `CommonConfig`; each family's model adds its own and records
its name in `family`. An option of another family is refused naming the option and the family.
This module imports only pydantic: the service validates submissions with it without importing
torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
Interpolation = Literal["bilinear", "bicubic", "box", "hamming", "lanczos", "nearest", "nearest_exact"]


class CommonConfig(BaseModel):
    """Options every family shares (the diffusers scripts' names and defaults)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # Which family's model this is; each family's config narrows it to its own name.
    family: str = "sd"

    # Model
    pretrained_model_name_or_path: str = Field(min_length=1)
    # A single-file .safetensors base model takes its component configs and tokenizers from this
    # local diffusers folder of the same family (never downloaded).
    pretrained_config_dir: str | None = None
    revision: str | None = None
    variant: str | None = None
    prediction_type: Literal["epsilon", "v_prediction"] | None = None

    # Data
    train_data_dir: str = Field(min_length=1)
    image_column: str = "image"
    caption_column: str = "text"
    missing_captions: Literal["error", "empty"] = "error"
    # Caption controls (trainer/captions.py): a trigger word ({trigger} in a caption, else it
    # leads), a prefix and suffix added as given, kohya-style tag shuffling after the first
    # keep_tokens comma-separated tags, and the share of reads whose caption is emptied.
    trigger_word: str | None = None
    caption_prefix: str = ""
    caption_suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = Field(default=0, ge=0)
    caption_dropout_rate: float = Field(default=0.0, ge=0, le=1)
    max_train_samples: int | None = Field(default=None, ge=1)
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    image_interpolation_mode: Interpolation = "lanczos"
    # Aspect-ratio buckets (trainer/buckets.py, kohya's): each image is resized to cover the bucket
    # of nearest aspect ratio and cropped to it, each batch from one bucket. Off: the square crop.
    # min/max_bucket_reso default to half and twice the resolution (256 and 1024 at 512).
    enable_bucket: bool = False
    min_bucket_reso: int | None = Field(default=None, ge=8)
    max_bucket_reso: int | None = Field(default=None, ge=8)
    bucket_reso_steps: int = Field(default=64, ge=8)
    bucket_no_upscale: bool = False
    dataloader_num_workers: int = Field(default=0, ge=0)

    # Optimisation
    train_batch_size: int = Field(default=16, ge=1)
    num_train_epochs: int = Field(default=100, ge=1)
    max_train_steps: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    learning_rate: float = Field(default=1e-4, gt=0)
    scale_lr: bool = False
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = Field(default=500, ge=0)
    snr_gamma: float | None = Field(default=None, gt=0)
    noise_offset: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(default=1e-2, ge=0)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    # The optimizer (trainer/optimizers.py) and its own options, prefixed by its name: adam_*
    # serve adamw, adamw8bit and prodigy (as in the diffusers scripts); prodigy_* and adafactor_*
    # only their optimizer. An option of another optimizer is refused naming it.
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    prodigy_beta3: float | None = Field(default=None, ge=0, lt=1)
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    prodigy_d_coef: float = Field(default=1.0, gt=0)
    adafactor_clip_threshold: float = Field(default=1.0, gt=0)
    adafactor_decay_rate: float = Field(default=-0.8, lt=0)
    adafactor_beta1: float | None = Field(default=None, ge=0, lt=1)
    adafactor_weight_decay: float = Field(default=0.0, ge=0)
    adafactor_scale_parameter: bool = False
    # The schedulers' own shapes (the scripts' --lr_num_cycles, --lr_power).
    lr_num_cycles: int = Field(default=1, ge=1)
    lr_power: float = Field(default=1.0, gt=0)
    # An exponential moving average of the LoRA weights (trainer/ema.py), saved beside them as
    # pytorch_lora_weights_ema.safetensors.
    use_ema: bool = False
    ema_decay: float = Field(default=0.999, gt=0, lt=1)

    # LoRA
    rank: int = Field(default=4, ge=1)
    lora_alpha: float | None = Field(default=None, gt=0)
    use_dora: bool = False
    train_text_encoder: bool = False

    # Hardware and reproducibility
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_tf32: bool = False
    seed: int | None = Field(default=None, ge=0)
    cache_latents: bool | None = None
    # The latent cache (trainer/latent_cache.py): RAM it may hold before spilling to disk; a
    # folder shared by runs (None: private, removed at the end); the shared folder's size limit
    # (least recently used segments go first); encode everything before the first step (None:
    # when the numbers say it pays).
    cache_ram_mb: int = Field(default=2048, ge=0)
    cache_dir: str | None = None
    cache_max_bytes: int | None = Field(default=None, ge=0)
    cache_upfront: bool | None = None

    # Output, checkpoints, validation
    output_dir: str = "sd-model-finetuned-lora"
    checkpointing_steps: int = Field(default=500, ge=1)
    checkpoints_total_limit: int | None = Field(default=None, ge=1)
    resume_from_checkpoint: str | None = None
    validation_prompt: str | None = None
    num_validation_images: int = Field(default=4, ge=1)
    validation_epochs: int = Field(default=1, ge=1)
    validation_steps: int | None = Field(default=None, ge=1)
    validation_inference_steps: int = Field(default=30, ge=1)
    # Validation loss (trainer/validation_loss.py) on a held-out share of the images or a separate
    # folder, with fixed noise and timesteps; measured every validation_loss_steps (default: at
    # each checkpoint) and at the end.
    validation_split: float | None = Field(default=None, gt=0, lt=1)
    validation_data_dir: str | None = None
    validation_loss_steps: int | None = Field(default=None, ge=1)

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value: int) -> int:
        if value <= 0 or value % 8:
            raise ValueError(f"must be a positive multiple of 8 (got {value})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CommonConfig:
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("mixed_precision: fp16 needs a CUDA device; use bf16 or no on cpu")
        if self.validation_split and self.validation_data_dir:
            raise ValueError("validation_split: give either validation_split or validation_data_dir, not both")
        if self.validation_loss_steps and not (self.validation_split or self.validation_data_dir):
            raise ValueError("validation_loss_steps: set validation_split or validation_data_dir too")
        if self.keep_tokens and not self.shuffle_tags:
            raise ValueError("keep_tokens: set shuffle_tags too (it says how many leading tags stay in place)")
        if self.ema_decay != 0.999 and not self.use_ema:
            raise ValueError("ema_decay: set use_ema too (without it no average is kept)")
        if self.optimizer == "adamw8bit" and self.device == "cpu":
            raise ValueError("optimizer: adamw8bit needs a CUDA device (bitsandbytes); use adamw on cpu")
        self._check_buckets()
        return self

    # The latent side a bucket must be a multiple of, in pixels (the VAE's factor of 8; the
    # flow-matching transformers pack latents in 2x2 patches: 16).
    _bucket_step_multiple: ClassVar[int] = 8

    def _check_buckets(self) -> None:
        if not self.enable_bucket:
            for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"{name}: set enable_bucket too (without it every image is cropped square)")
            return
        step, multiple = self.bucket_reso_steps, self._bucket_step_multiple
        if step % multiple:
            raise ValueError(f"bucket_reso_steps: must be a multiple of {multiple} for the {self.family} family "
                             f"(got {step})")
        if step > self.resolution:
            raise ValueError(f"bucket_reso_steps: {step} is larger than resolution {self.resolution}; "
                             "set a smaller step")
        for name in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, name)
            if value is not None and value % step:
                raise ValueError(f"{name}: must be a multiple of bucket_reso_steps {step} (got {value})")
        low, high = self.bucket_limits
        if not low <= self.resolution <= high:
            name = "min_bucket_reso" if low > self.resolution else "max_bucket_reso"
            raise ValueError(f"{name}: need min_bucket_reso ({low}) <= resolution ({self.resolution}) "
                             f"<= max_bucket_reso ({high})")

    @property
    def bucket_limits(self) -> tuple[int, int]:
        """(min_bucket_reso, max_bucket_reso) as given, else half and twice the resolution."""
        from trainer.buckets import default_limits

        low, high = default_limits(self.resolution, self.bucket_reso_steps)
        return (self.min_bucket_reso or low, self.max_bucket_reso or max(high, self.min_bucket_reso or 0))

    @model_validator(mode="before")
    @classmethod
    def _refuse_other_optimizers_options(cls, values: Any) -> Any:
        """An option of an optimizer (or scheduler) that is not the chosen one changes nothing:
        refuse it by name rather than ignore it. Default values pass (a dumped config holds all)."""
        if not isinstance(values, dict):
            return values
        optimizer = values.get("optimizer", "adamw")
        scheduler = values.get("lr_scheduler", "constant")
        owners = {"prodigy_": ("prodigy",), "adafactor_": ("adafactor",),
                  "adam_": ("adamw", "adamw8bit", "prodigy")}
        for name, value in values.items():
            field = cls.model_fields.get(name)
            if field is None or value == field.default:
                continue
            for prefix, optimizers in owners.items():
                if name.startswith(prefix) and optimizer not in optimizers:
                    raise ValueError(f"{name}: an option of the {' / '.join(optimizers)} optimizer, "
                                     f"not of {optimizer}")
            if name == "lr_num_cycles" and scheduler != "cosine_with_restarts":
                raise ValueError(f"lr_num_cycles: an option of lr_scheduler cosine_with_restarts, not of {scheduler}")
            if name == "lr_power" and scheduler != "polynomial":
                raise ValueError(f"lr_power: an option of lr_scheduler polynomial, not of {scheduler}")
        return values

    def text_encoder_rate(self, learning_rate: float) -> float:
        """The text encoders' learning rate with train_text_encoder, given the UNet's (scaled by
        scale_lr or not): the same (the SD and SDXL scripts train both at one rate)."""
        return learning_rate

    @property
    def effective_lora_alpha(self) -> float:
        """The script sets lora_alpha = rank; a separate alpha is an opt-in."""
        return float(self.rank) if self.lora_alpha is None else self.lora_alpha


class TrainConfig(CommonConfig):
    """Stable Diffusion 1.x/2.x: the options of `train_text_to_image_lora.py`."""

    family: Literal["sd"] = "sd"


class SDXLConfig(CommonConfig):
    """Stable Diffusion XL: the options of `train_text_to_image_lora_sdxl.py`."""

    family: Literal["sdxl"] = "sdxl"
    resolution: int = 1024
    # A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix), a folder or hub id holding the VAE alone.
    # The script keeps the pipeline's own VAE in fp32 (SDXL's VAE overflows in fp16) and runs a
    # separate one in the weight dtype; so does the trainer.
    pretrained_vae_model_name_or_path: str | None = None


WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]
# DDPM options with no meaning for a flow-matching model, and why (the refusal says it).
_NOT_FLOW_MATCHING = {
    "snr_gamma": "Min-SNR weighting is for DDPM noise schedules; use weighting_scheme",
    "noise_offset": "offset noise is for DDPM noise schedules",
    "prediction_type": "the target is always noise - latents",
}


class FlowMatchingConfig(CommonConfig):
    """What Flux and SD3 share: the flow-matching options of `train_dreambooth_lora_flux.py` and
    `train_dreambooth_lora_sd3.py`, their defaults, and an instance prompt for caption-less images."""

    resolution: int = 512
    train_batch_size: int = Field(default=4, ge=1)
    adam_weight_decay: float = Field(default=1e-4, ge=0)
    # torchvision's Resize in the scripts: bilinear.
    image_interpolation_mode: Interpolation = "bilinear"
    # Timestep sampling and loss weighting (diffusers.training_utils): logit_normal draws
    # sigmoid(N(logit_mean, logit_std)), mode uses mode_scale, sigma_sqrt and cosmap sample
    # uniformly and weight the loss, none is uniform and unweighted.
    weighting_scheme: WeightingScheme = "none"
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    mode_scale: float = 1.29
    # T5's token length (padded to it).
    max_sequence_length: int = Field(default=512, ge=1, le=512)
    _bucket_step_multiple: ClassVar[int] = 16
    # The transformer modules given LoRA (the scripts' --lora_layers); None: the scripts' default list.
    lora_layers: list[str] | None = None
    # The caption of images that have none (DreamBooth style); captioned images keep their own.
    instance_prompt: str | None = None
    # With train_text_encoder (LoRA on the CLIP encoders; T5 stays frozen, as in the scripts): the
    # CLIP adapters' own learning rate and AdamW/Prodigy weight decay, the scripts' defaults.
    # Prodigy runs them at learning_rate, as the scripts do (it estimates its own step size).
    text_encoder_lr: float = Field(default=5e-6, gt=0)
    adam_weight_decay_text_encoder: float = Field(default=1e-3, ge=0)
    # Not options here; hidden from the form and refused by name when given.
    snr_gamma: SkipJsonSchema[None] = Field(default=None, exclude=True)
    noise_offset: SkipJsonSchema[float] = Field(default=0.0, exclude=True)
    prediction_type: SkipJsonSchema[None] = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_ddpm_options(cls, values: Any) -> Any:
        if isinstance(values, dict):
            family = cls.model_fields["family"].default
            for name, why in _NOT_FLOW_MATCHING.items():
                if name in values and values[name] not in (None, 0, 0.0):
                    raise ValueError(f"{name} is not an option of the {family} family: {why}")
            if not values.get("train_text_encoder"):
                for name in ("text_encoder_lr", "adam_weight_decay_text_encoder"):
                    if name in values and values[name] != cls.model_fields[name].default:
                        raise ValueError(f"{name}: an option of train_text_encoder, which is off")
            if values.get("instance_prompt") and "missing_captions" not in values:
                values = {**values, "missing_captions": "empty"}
        return values

    def text_encoder_rate(self, learning_rate: float) -> float:
        return learning_rate if self.optimizer == "prodigy" else self.text_encoder_lr

    @field_validator("weighting_scheme", mode="before")
    @classmethod
    def _none_scheme(cls, value: Any) -> Any:
        # The command line reads `--weighting_scheme none` as a null; the scheme is the string.
        return "none" if value is None else value

    @field_validator("lora_layers", mode="before")
    @classmethod
    def _split_layers(cls, value: Any) -> Any:
        if isinstance(value, str):  # the scripts' comma-separated form
            value = [layer.strip() for layer in value.split(",") if layer.strip()]
        if value is not None and not value:
            raise ValueError("name at least one module, or leave it unset for the default list")
        return value


class FluxConfig(FlowMatchingConfig):
    """FLUX.1 (dev, with its guidance embedding, or schnell): the options of
    `train_dreambooth_lora_flux.py`."""

    family: Literal["flux"] = "flux"
    output_dir: str = "flux-dreambooth-lora"
    # The Flux script's alpha is 4 whatever the rank (the other scripts: alpha = rank).
    lora_alpha: float | None = Field(default=4.0, gt=0)
    # The guidance the dev model is conditioned on, constant every step (ignored by schnell,
    # which has no guidance embedding).
    guidance_scale: float = Field(default=3.5, ge=0)


class SD3Config(FlowMatchingConfig):
    """Stable Diffusion 3 / 3.5: the options of `train_dreambooth_lora_sd3.py`."""

    family: Literal["sd3"] = "sd3"
    output_dir: str = "sd3-dreambooth-lora"
    weighting_scheme: WeightingScheme = "logit_normal"
    max_sequence_length: int = Field(default=77, ge=1, le=512)
    # EDM preconditioning (section 5): the prediction is read as noisy - sigma * output and
    # compared with the clean latents; the script's default.
    precondition_outputs: bool = True
    # Only these transformer blocks get LoRA (the script's --lora_blocks); None: all of them.
    lora_blocks: list[int] | None = None

    @field_validator("lora_blocks", mode="before")
    @classmethod
    def _split_blocks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [block.strip() for block in value.split(",") if block.strip()]
        return value


FAMILY_CONFIGS: dict[str, type[CommonConfig]] = {
    "sd": TrainConfig, "sdxl": SDXLConfig, "flux": FluxConfig, "sd3": SD3Config,
}
AnyConfig = TrainConfig | SDXLConfig | FluxConfig | SD3Config


def config_model(family: str) -> type[CommonConfig]:
    """The config model of a family ("sd", "sdxl"); its JSON schema is the family's option form."""
    try:
        return FAMILY_CONFIGS[family]
    except KeyError:
        raise ConfigError(f"family: {family!r} is not a supported family "
                          f"(supported: {', '.join(FAMILY_CONFIGS)})") from None


class ConfigError(ValueError):
    """A training option is invalid; the message names each bad field."""


def format_validation_error(error: ValidationError, family: str | None = None) -> str:
    """One line per problem, each starting with the option's name."""
    other_options = {name for f, model in FAMILY_CONFIGS.items() if f != family for name in model.model_fields}
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            # An option of another family is no typo: say which family lacks it.
            if family and field in other_options:
                lines.append(f"{field} is not an option of the {family} family")
                continue
            message = "unknown option"
        elif item["type"] == "missing":
            message = "is required"
        if not item["loc"] and ":" in message:
            lines.append(message)
        else:
            lines.append(f"{field}: {message}")
    return "; ".join(lines)


def load_config(values: dict[str, Any], family: str | None = None) -> AnyConfig:
    """Validate raw option values for a family, raising ConfigError with a message naming the bad
    fields. The family is `family`, else the values' own `family` option, else "sd"."""
    given = values.get("family")
    if family is None:
        family = given if isinstance(given, str) else "sd"
    elif given is not None and given != family:
        raise ConfigError(f"family: these options are for {given!r}, not {family!r}")
    model = config_model(family)
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, family)) from None
