"""What every family shares about models: the LoRA adapter, its files, and load errors.

A family (trainer/families/) loads its own components and names its trainable models ("unet",
"text_encoder", "text_encoder_2"); the functions here attach, save and load adapters by those
names, so the diffusers file, the kohya file and the checkpoints work the same for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load as load_bytes, load_file, save_file

from trainer import metadata as training_metadata
from trainer.checkpoints import atomic_file
from trainer.config import CommonConfig

UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The base model could not be loaded; the message names the option and the path."""


def lora_config(config: CommonConfig, target_modules: list[str]) -> LoraConfig:
    """The scripts' adapter: rank r, alpha = r unless given, gaussian init; DoRA on request."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.effective_lora_alpha,
        init_lora_weights="gaussian",
        target_modules=target_modules,
        use_dora=config.use_dora,
    )


def lora_state_dicts(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights in peft's naming, per model name (exact, for checkpoints)."""
    return {name: get_peft_model_state_dict(model) for name, model in models.items()}


def save_lora(output_dir: str | Path, pipeline_class, models: dict[str, torch.nn.Module],
              metadata: dict[str, str] | None = None, peft_names: bool = False) -> Path:
    """Write the diffusers-format `pytorch_lora_weights.safetensors` that `pipeline_class` loads.

    `models` maps the pipeline's component names ("unet", "text_encoder", "text_encoder_2") to
    models with an adapter. The file appears whole or not at all (a temporary name, then a
    rename): a checkpoint counts as complete once it has this file, and a half-written LoRA is
    never taken for a finished one. `metadata` (default: the recorded run's, trainer/metadata.py)
    joins diffusers' own keys in the file's header.
    """
    # `peft_names`: the adapters' keys as peft names them (lora_A/lora_B), as the Flux and SD3
    # scripts save them; SD3's loader does not read the UNet-era `lora.down` names for every module.
    layers = {f"{name}_lora_layers": state if peft_names else convert_state_dict_to_diffusers(state)
              for name, state in lora_state_dicts(models).items()}
    # The adapter's config (alpha above all) goes into the file's metadata, so a loader applies
    # lora_alpha / rank as trained rather than assuming alpha = rank.
    layers.update({f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()
                   for name, model in models.items()})
    path = Path(output_dir) / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        pipeline_class.save_lora_weights(
            save_directory=str(output_dir), weight_name=partial.name, safe_serialization=True, **layers,
        )
        extra = training_metadata.for_file(output_dir) if metadata is None else metadata
        if extra:  # diffusers writes only its own keys: add ours to the header (a small file, rewritten once)
            with safe_open(str(partial), framework="pt") as handle:
                header = handle.metadata() or {}
            save_file(load_bytes(partial.read_bytes()), str(partial), metadata={**extra, **header})
    return path


def save_kohya_lora(output_dir: str | Path, lora_alpha: float, models: dict[str, torch.nn.Module],
                    rename: dict[str, Callable[[str], str]] | None = None,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write the same LoRA in kohya's key format, which AUTOMATIC1111 and ComfyUI load: `lora_unet_`,
    `lora_te1_` (text_encoder) and `lora_te2_` (text_encoder_2) keys with an `.alpha` each.
    `rename` maps a model's adapter keys first (SDXL's UNet: to the original block names)."""
    return write_kohya_file(output_dir, kohya_state_dict(lora_alpha, models, rename), lora_alpha, metadata=metadata)


def write_kohya_file(output_dir: str | Path, tensors: dict[str, torch.Tensor], lora_alpha: float,
                     network_module: str = "networks.lora", metadata: dict[str, str] | None = None) -> Path:
    """`lora_kohya.safetensors` from kohya-named tensors, whole or not at all, with the run's
    metadata (default: the recorded run's) and sd-scripts' network module and alpha."""
    path = Path(output_dir) / KOHYA_WEIGHTS_NAME
    with atomic_file(path) as partial:
        save_file(tensors, str(partial),
                  metadata={**(training_metadata.for_file(output_dir) if metadata is None else metadata),
                            "ss_network_module": network_module, "ss_network_alpha": str(lora_alpha)})
    return path


def kohya_state_dict(lora_alpha: float, models: dict[str, torch.nn.Module],
                     rename: dict[str, Callable[[str], str]] | None = None) -> dict[str, torch.Tensor]:
    """The models' adapters under kohya's names (`lora_unet_`, `lora_te1_`, `lora_te2_`), each
    with its `.alpha`, on the CPU."""
    rename = rename or {}
    prefixed = {f"{name}.{rename.get(name, _text_model_key if name != 'unet' else str)(key)}": value
                for name, state in lora_state_dicts(models).items() for key, value in state.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    # diffusers writes alpha = rank; the adapter's real alpha keeps the file's scale right.
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(lora_alpha))
    return {k: v.detach().contiguous().cpu() for k, v in kohya.items()}


def _text_model_key(key: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); kohya's names, which
    AUTOMATIC1111 and ComfyUI look up, keep it: `lora_te1_text_model_encoder_layers_0_...`."""
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


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


# --------------------------------------------------------------------------------------------
# The original (CompVis / Stability) UNet naming

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key_to_original(key: str, layers_per_block: int, up_attentions: set[int]) -> str:
    """A diffusers UNet key (a parameter, or an adapter's) in the original UNet's naming
    (input/middle/output blocks), as single-file checkpoints and kohya's SDXL LoRAs use it.
    `up_attentions`: the indices of the up blocks with attention (their upsampler moves one on)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    plain = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in plain:
        return plain[key]
    parts = key.split(".")
    per_level = layers_per_block + 1

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{0 if index == 0 else 2}.{resnet(rest)}"
        return f"middle_block.1.{'.'.join(rest)}"
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # conv -> op
            return f"input_blocks.{(block + 1) * per_level}.0.op.{'.'.join(rest[1:])}"
        number = 1 + block * per_level + index
        return f"input_blocks.{number}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{number}.1.{'.'.join(rest)}"
    if kind == "upsamplers":
        position = 2 if block in up_attentions else 1
        return f"output_blocks.{block * per_level + layers_per_block}.{position}.{'.'.join(rest)}"
    number = block * per_level + index
    return f"output_blocks.{number}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{number}.1.{'.'.join(rest)}"
