"""The one validated configuration of a training run.

Field names and defaults follow diffusers' `train_text_to_image_lora.py`, so its users can bring
their flags as they are. This module imports only pydantic: the service validates submissions
with it without importing torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
Interpolation = Literal["bilinear", "bicubic", "box", "hamming", "lanczos", "nearest", "nearest_exact"]


class TrainConfig(BaseModel):
    """Options of one LoRA training run (the diffusers script's names and defaults)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # Model
    pretrained_model_name_or_path: str = Field(min_length=1)
    revision: str | None = None
    variant: str | None = None
    prediction_type: Literal["epsilon", "v_prediction"] | None = None

    # Data
    train_data_dir: str = Field(min_length=1)
    image_column: str = "image"
    caption_column: str = "text"
    missing_captions: Literal["error", "empty"] = "error"
    max_train_samples: int | None = Field(default=None, ge=1)
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    image_interpolation_mode: Interpolation = "lanczos"
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

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value: int) -> int:
        if value <= 0 or value % 8:
            raise ValueError(f"must be a positive multiple of 8 (got {value})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("mixed_precision: fp16 needs a CUDA device; use bf16 or no on cpu")
        return self

    @property
    def effective_lora_alpha(self) -> float:
        """The script sets lora_alpha = rank; a separate alpha is an opt-in."""
        return float(self.rank) if self.lora_alpha is None else self.lora_alpha


class ConfigError(ValueError):
    """A training option is invalid; the message names each bad field."""


def format_validation_error(error: ValidationError) -> str:
    """One line per problem, each starting with the option's name."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        elif item["type"] == "missing":
            message = "is required"
        if not item["loc"] and ":" in message:
            lines.append(message)
        else:
            lines.append(f"{field}: {message}")
    return "; ".join(lines)


def load_config(values: dict[str, Any]) -> TrainConfig:
    """Validate raw option values, raising ConfigError with a message naming the bad fields."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
