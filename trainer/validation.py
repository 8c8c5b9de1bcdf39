"""Validation images: the pipeline with the LoRA being trained renders the validation prompt.

The family builds the pipeline (`Family.pipeline`); this renders and saves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import DiffusionPipeline


def render(pipeline: DiffusionPipeline, prompt: str, count: int, seed: int | None, size: tuple[int, int],
           steps: int, autocast_dtype: torch.dtype | None) -> list:
    """Render `count` images of `size` (height, width); the training RNG is left untouched (a
    seeded generator is used)."""
    device = pipeline.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    images = []
    with autocast, torch.no_grad():
        for _ in range(count):
            images.append(pipeline(prompt, num_inference_steps=steps, generator=generator,
                                   height=size[0], width=size[1]).images[0])
    return images


def save_images(images: list, directory: Path, prefix: str) -> list[str]:
    """Write images as PNG files named `{prefix}-{i}.png`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = directory / f"{prefix}-{index}.png"
        image.save(path)
        paths.append(str(path))
    return paths
