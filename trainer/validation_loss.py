"""Validation loss on held-out images (`validation_split` or `validation_data_dir`).

The training loss of one step is one draw of noise and timesteps over one batch: too noisy to see
a LoRA start to overfit. The validation loss fixes every random draw: example i is encoded,
noised and timed under the seed `VALIDATION_SEED + i` (its crop and flip, the VAE sample, noise
and timesteps), so the same weights always give the same value and values at different steps
differ only by the weights. It runs on the family's own objective (DDPM or flow matching), under
`torch.no_grad`, with the training random state saved and restored around it: a run with a
validation split draws the same training numbers as one trained on the same remaining images.

The held-out images are never trained on. `validation_split` takes a seeded share of the folder
(random.Random(seed), not the global generators, so the training draws are untouched);
`validation_data_dir` is a separate folder laid out like train_data_dir.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from trainer import data

VALIDATION_SEED = 20_240_601


def split(config, examples: list[data.Example]) -> tuple[list[data.Example], list[data.Example]]:
    """(trained on, held out). Without `validation_split` every example trains."""
    share = getattr(config, "validation_split", None)
    if not share:
        return examples, []
    held = max(1, math.floor(len(examples) * share))
    if held >= len(examples):
        raise ValueError(f"validation_split: {share} of {len(examples)} images leaves none to train on")
    order = list(range(len(examples)))
    random.Random(config.seed or 0).shuffle(order)
    chosen = set(order[:held])
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def held_out_examples(config, family, folder: Path) -> list[data.Example]:
    """The examples validation loss is measured on (empty when it is off)."""
    if config.validation_data_dir:
        with data.dataset_folder(config.validation_data_dir) as held_folder:
            examples = data.scan_examples(held_folder, config.caption_column, config.missing_captions)
        return family.captions(config, examples)
    if not config.validation_split:
        return []
    examples = data.scan_examples(folder, config.caption_column, config.missing_captions)
    examples = data.select_samples(examples, config.max_train_samples, config.seed)
    return split(config, family.captions(config, examples))[1]


class ValidationLoss:
    """The held-out examples and how to measure the mean loss over them."""

    def __init__(self, config, family, components, examples: list[data.Example]):
        self.examples = examples
        # Decoded on every measurement (a few images): the transform's random crop and flip are
        # drawn under each example's seed, so they are fixed too.
        self.dataset = family.dataset(config, examples, components)

    @torch.no_grad()
    def measure(self, run) -> float:
        """The mean loss over the held-out examples with the LoRA as it stands."""
        family, components, objective = run.family, run.components, run.objective
        device = run.accelerator.device
        before = data.capture_rng()
        devices = [device] if device.type == "cuda" else []
        training = [model.training for model in run.trainable]
        for model in run.trainable:
            model.eval()
        total = 0.0
        try:
            with torch.random.fork_rng(devices=devices):
                for index in range(len(self.examples)):
                    torch.manual_seed(VALIDATION_SEED + index)
                    random.seed(VALIDATION_SEED + index)
                    batch = data.collate([self.dataset[index]])
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    params = family.encode_image_params(components, batch["pixel_values"])
                    latents = family.sample_latents(components, params, run.weight_dtype)
                    noise, timesteps = objective.draw(latents)
                    conditioning = family.conditioning(components, batch, run.config, run.weight_dtype)
                    noisy = objective.noisy_input(latents, noise, timesteps)
                    target = objective.target(latents, noise, timesteps)
                    prediction = objective.prediction(family.predict(run.unet, noisy, timesteps, conditioning),
                                                      noisy, timesteps)
                    total += float(objective.loss(prediction, target, timesteps))
        finally:
            data.restore_rng(before)
            for model, was_training in zip(run.trainable, training):
                model.train(was_training)
        return total / len(self.examples)


def best_checkpoint(values: dict[int, float], checkpoint_steps: list[int]) -> int | None:
    """The checkpoint step with the lowest validation loss (the earliest on a tie)."""
    measured = [(values[step], step) for step in checkpoint_steps if step in values]
    return min(measured)[1] if measured else None
