"""Which model family a base model belongs to, read from its files without loading it.

A base model comes in one of three forms:

- a diffusers pipeline folder: its ``model_index.json`` names the pipeline class;
- a hub id: the same file, looked up in the local Hugging Face cache only (never downloaded);
- a single-file ``.safetensors`` checkpoint in the original (CompVis/Stability/BFL) layout, as
  finetunes are shared: only its header is read (8 bytes of length, then JSON), and the family
  follows from its key names (the text encoders' for sd/sdxl, the transformer's blocks for flux
  and sd3).

Detection recognises more families than the trainer may train (`KNOWN_FAMILIES`); only those in
`FAMILY_NAMES` (the families registered in trainer/families, which tests/trainer/test_families.py
holds equal) are reported; a recognised but unsupported one is refused by name.

Pure Python (json, struct): the API and the admin command detect families without importing torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# The families the trainer trains: exactly trainer.families.FAMILIES (that module imports torch,
# which detection must not, so the names live here and a test keeps the two equal).
FAMILY_NAMES = ("sd", "sdxl", "flux", "sd3")
# Every family detection recognises, supported or not.
KNOWN_FAMILIES = ("sd", "sdxl", "flux", "sd3")
MODEL_INDEX = "model_index.json"
SINGLE_FILE_SUFFIX = ".safetensors"

# model_index.json `_class_name` -> family
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}

# Single-file key prefixes (the original repos' layout, as diffusers' single_file_utils reads it).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."      # CLIP ViT-L (SD 1.x)
SD2_TEXT_PREFIX = "cond_stage_model.model."            # OpenCLIP ViT-H (SD 2.x)
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."        # OpenCLIP ViT-bigG
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # the refiner has bigG alone

# Transformer single files (BFL's Flux layout, Stability's SD3 MMDiT), bare or under
# model.diffusion_model. (ComfyUI's), as diffusers' single_file_utils recognises them. A Flux
# file is usually the transformer alone; an SD3 file may carry its VAE and text encoders too.
FLOW_SINGLE_FILE_BLOCKS = (("double_blocks.", "flux"), ("joint_blocks.", "sd3"))
# The families whose loaders take a single file (with a config folder): all of them (Flux and
# SD3 take the file's transformer and the rest from the config folder, trainer/families/flux.py).
SINGLE_FILE_FAMILIES = ("sd", "sdxl", "flux", "sd3")
# How a refusal names a recognised family the trainer does not train.
FAMILY_TITLES = {"flux": "FLUX", "sd3": "Stable Diffusion 3"}
# Checkpoints of families we do not train, recognised by a key fragment so the refusal names them.
_OTHER_FAMILIES = (
    ("double_layers.", "AuraFlow"),
)
# A header larger than this is no safetensors header (real ones are a few MB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class UnsupportedModel(ValueError):
    """The source is no base model of a supported family; the message names it and what was found."""


class ModelNotFound(UnsupportedModel):
    """The source is not on this machine (no such folder or file, or a hub id not in the local cache)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a base model source is: its family, its form and the local file or folder holding it."""

    family: str
    kind: str  # "folder" | "hub" | "single_file"
    path: str  # the local folder (for a hub id, its cached snapshot) or the .safetensors file

    @property
    def single_file(self) -> bool:
        return self.kind == "single_file"


def detect_family(source: str | Path) -> str:
    """A supported family (FAMILY_NAMES) for a pipeline folder, a cached hub id or a single-file checkpoint.

    Raises:
        UnsupportedModel: naming the source and what it holds instead (ModelNotFound if absent).
    """
    return inspect_model(source).family


def inspect_model(source: str | Path) -> ModelInfo:
    """The family, form and local path of a base model source (see the module docstring)."""
    text = str(source)
    path = local_path(text)
    kind = _kind(path)
    if kind == "dir":
        return ModelInfo(_family_of_index(path / MODEL_INDEX, text), "folder", str(path))
    if kind == "file":
        return ModelInfo(single_file_family(path), "single_file", str(path))
    if is_single_file_name(text) or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise ModelNotFound(f"{text}: no such folder or file")
    index = _cached_hub_file(text, MODEL_INDEX)
    if index is None:
        raise ModelNotFound(f"{text}: not a local folder, and not in the local Hugging Face cache "
                            "(models are never downloaded here)")
    return ModelInfo(_family_of_index(index, text), "hub", str(index.parent))


def local_path(source: str | Path) -> Path:
    """`source` as a local path, `~` expanded where it can be."""
    try:
        return Path(source).expanduser()
    except RuntimeError:  # "~someone" with no such user: a name, not a home folder
        return Path(source)


def _kind(path: Path) -> str | None:
    """"dir", "file", or None when nothing is there (or the name cannot be a path here at all)."""
    try:
        return "dir" if path.is_dir() else "file" if path.is_file() else None
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: no such path
        return None


def is_single_file_name(source: str | Path) -> bool:
    return str(source).lower().endswith(SINGLE_FILE_SUFFIX)


def pipeline_family(class_name: str | None, source: str | Path) -> str:
    """The family of a diffusers pipeline class name, or UnsupportedModel naming it."""
    if PIPELINE_FAMILIES.get(class_name) in FAMILY_NAMES:
        return PIPELINE_FAMILIES[class_name]
    raise UnsupportedModel(f"{source}: {class_name or 'an unnamed pipeline'} is not a supported family "
                           f"(supported: {', '.join(FAMILY_NAMES)})")


def _family_of_index(index: Path, source: str) -> str:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModel(f"{source}: not a diffusers pipeline folder (no {MODEL_INDEX})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsupportedModel(f"{source}: {MODEL_INDEX} is unreadable ({error})") from None
    class_name = data.get("_class_name") if isinstance(data, dict) else None
    return pipeline_family(class_name if isinstance(class_name, str) else None, source)


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repo from the local cache only, or None (huggingface_hub imported lazily)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - not a valid repo id, or no usable cache: not cached
        return None
    return Path(found) if isinstance(found, str) else None


# --------------------------------------------------------------------------------------------
# Single-file checkpoints


def read_safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a .safetensors file, from its header alone (no tensor is read).

    Raises:
        UnsupportedModel: the file is not a safetensors file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise UnsupportedModel(f"{path}: not a safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
                raise UnsupportedModel(f"{path}: not a safetensors file (its first 8 bytes give a "
                                       f"header of {length} bytes in a file of {size})")
            header = json.loads(file.read(length))
    except OSError as error:
        raise UnsupportedModel(f"{path}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UnsupportedModel(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UnsupportedModel(f"{path}: not a safetensors file (its header is not a JSON object)")
    return [key for key in header if key != "__metadata__"]


def single_file_family(path: str | Path) -> str:
    """The family of a single-file checkpoint from its key names; refuses anything else by name."""
    path = Path(path)
    if not is_single_file_name(path):
        raise UnsupportedModel(f"{path}: only single-file .safetensors checkpoints are accepted "
                               f"(a {path.suffix or 'suffix-less'} file is not; .ckpt files are "
                               "pickles, which can run code when loaded)")
    return family_from_keys(read_safetensors_keys(path), path)


def family_from_keys(keys: list[str], source: str | Path) -> str:
    """The family of an original-layout checkpoint's tensor names: sd/sdxl for a full checkpoint
    (UNet, VAE, text encoders), flux/sd3 for one whose transformer blocks are there."""
    if not keys:
        raise UnsupportedModel(f"{source}: not a diffusion checkpoint: it holds no tensors")
    if any(key.startswith(("lora_unet_", "lora_te")) or ".lora_A." in key or ".lora_down." in key
           for key in keys):
        raise UnsupportedModel(f"{source}: a LoRA adapter, not a base model checkpoint")
    flow = _flow_family(keys)
    if flow is not None:
        if flow not in FAMILY_NAMES:
            raise UnsupportedModel(f"{source}: a {FAMILY_TITLES[flow]} checkpoint, not a supported family "
                                   f"(supported: {', '.join(FAMILY_NAMES)})")
        if flow not in SINGLE_FILE_FAMILIES:
            # Recognised, so the refusal can say what to use instead; the family's loader takes
            # pipeline folders only (trainer/families/flux.py), so listing it would be a lie.
            raise UnsupportedModel(f"{source}: a {FAMILY_TITLES[flow]} single-file checkpoint; the {flow} family "
                                   "trains from a diffusers pipeline folder, not a single file")
        return flow
    for fragment, name in _OTHER_FAMILIES:
        if any(fragment in key for key in keys):
            raise UnsupportedModel(f"{source}: a {name} checkpoint, not a supported family "
                                   f"(supported: {', '.join(FAMILY_NAMES)})")
    if not _has(keys, UNET_PREFIX):
        raise UnsupportedModel(f"{source}: not a diffusion checkpoint: no UNet keys ({UNET_PREFIX}*)")
    if _has(keys, SDXL_TEXT2_PREFIX) and _has(keys, SDXL_TEXT1_PREFIX):
        family = "sdxl"
    elif _has(keys, SDXL_REFINER_TEXT_PREFIX):
        raise UnsupportedModel(f"{source}: an SDXL refiner checkpoint (one text encoder); "
                               "train on an SDXL base model")
    elif _has(keys, SD1_TEXT_PREFIX) or _has(keys, SD2_TEXT_PREFIX):
        family = "sd"
    else:
        raise UnsupportedModel(f"{source}: not a full checkpoint: no text encoder keys "
                               f"({SD1_TEXT_PREFIX}*, {SD2_TEXT_PREFIX}* or conditioner.embedders.*)")
    if not _has(keys, VAE_PREFIX):
        raise UnsupportedModel(f"{source}: not a full checkpoint: no VAE keys ({VAE_PREFIX}*)")
    return family


def _flow_family(keys: list[str]) -> str | None:
    """"flux" or "sd3" when the transformer's blocks are at the top or under model.diffusion_model."""
    for block, family in FLOW_SINGLE_FILE_BLOCKS:
        if any(key.startswith((block, UNET_PREFIX + block)) for key in keys):
            return family
    return None


def _has(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)
