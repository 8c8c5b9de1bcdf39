"""Base-model files for registry tests that only read headers: a pipeline folder naming a class,
and a single-file .safetensors whose header has a family's key names (real, tiny tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# The key prefixes each family's original single-file layout has (see trainer.detect).
SINGLE_FILE_KEYS = {
    "sd": ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
           "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"],
    "sdxl": ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "conditioner.embedders.1.model.positional_embedding"],
}


def pipeline_folder(folder: Path, class_name: str) -> Path:
    """A folder whose model_index.json names `class_name` (enough for detection, not for loading)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder


def header_only_checkpoint(path: Path, keys: list[str]) -> Path:
    """A valid .safetensors file with these tensor names (one float each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.zeros(1, dtype=np.float32) for key in keys}, str(path))
    return path
