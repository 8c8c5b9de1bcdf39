"""Loading the Stable Diffusion components and attaching, saving and loading LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.checkpoints import atomic_file
from trainer.config import TrainConfig

UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The base model could not be loaded; the message names the option and the path."""


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline the training loop uses."""

    noise_scheduler: DDPMScheduler
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel


def load_components(config: TrainConfig) -> Components:
    """Load scheduler, tokenizer, text encoder, VAE and UNet from a hub id or a local folder."""
    source = config.pretrained_model_name_or_path
    common = {"revision": config.revision}
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=config.variant, **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=config.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=config.variant, **common)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError(f"pretrained_model_name_or_path: cannot load {source!r}: {error}") from None
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    return Components(noise_scheduler, tokenizer, text_encoder, vae, unet)


def lora_config(config: TrainConfig, target_modules: list[str]) -> LoraConfig:
    """The script's adapter: rank r, alpha = r unless given, gaussian init; DoRA on request."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.effective_lora_alpha,
        init_lora_weights="gaussian",
        target_modules=target_modules,
        use_dora=config.use_dora,
    )


def lora_state_dicts(unet, text_encoder=None) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights in peft's naming, per model (exact, for checkpoints)."""
    states = {"unet": get_peft_model_state_dict(unet)}
    if text_encoder is not None:
        states["text_encoder"] = get_peft_model_state_dict(text_encoder)
    return states


def save_lora(output_dir: str | Path, unet, text_encoder=None) -> Path:
    """Write the diffusers-format `pytorch_lora_weights.safetensors` that pipelines load.

    The file appears whole or not at all (a temporary name, then a rename): a checkpoint counts
    as complete once it has this file, and a half-written LoRA is never taken for a finished one.
    """
    states = lora_state_dicts(unet, text_encoder)
    path = Path(output_dir) / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(output_dir),
            unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
            text_encoder_lora_layers=(
                convert_state_dict_to_diffusers(states["text_encoder"]) if "text_encoder" in states else None
            ),
            weight_name=partial.name,
            safe_serialization=True,
        )
    return path


def save_kohya_lora(output_dir: str | Path, lora_alpha: float, unet, text_encoder=None) -> Path:
    """Write the same LoRA in kohya's key format, which AUTOMATIC1111 and ComfyUI load."""
    states = lora_state_dicts(unet, text_encoder)
    prefixed = {f"{model}.{key}": value for model, state in states.items() for key, value in state.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    # diffusers writes alpha = rank; the adapter's real alpha keeps the file's scale right.
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(lora_alpha))
    path = Path(output_dir) / KOHYA_WEIGHTS_NAME
    with atomic_file(path) as partial:
        save_file({k: v.detach().contiguous().cpu() for k, v in kohya.items()}, str(partial),
                  metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(lora_alpha)})
    return path


def save_adapter_state(directory: Path, name: str, model) -> None:
    """Save one model's adapter weights exactly as peft holds them (used by checkpoints)."""
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    with atomic_file(directory / f"{name}_lora.safetensors") as partial:
        save_file(state, str(partial))


def load_adapter_state(directory: Path, name: str, model) -> None:
    """Load adapter weights saved by `save_adapter_state` into a model that has the adapter."""
    state = load_file(str(directory / f"{name}_lora.safetensors"))
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {directory}: unexpected adapter keys {unexpected[:3]}")
