"""Training data: the script's transforms, the datasets the loop reads, and batch order.

Random numbers are drawn exactly where the diffusers script's torchvision transforms draw them
(a crop offset only when there is slack, one flip draw per image), from torch's global generator,
so a run here follows the script's random stream. Finding and checking files is in `files`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer import captions
from trainer.files import (  # noqa: F401 - re-exported: the loop and tests use them from here
    DatasetError, Example, dataset_folder, extract_zip, inspect_folder, load_rgb, probe_image,
    scan_examples,
)

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}


def select_samples(examples: list[Example], max_train_samples: int | None, seed: int | None) -> list[Example]:
    """Keep `max_train_samples` examples chosen as the script's `dataset.shuffle(seed).select()`."""
    if max_train_samples is None or max_train_samples >= len(examples):
        return examples
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[:max_train_samples]]


# --------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, crop to a square, maybe flip, scale to [-1, 1] (the script's pipeline)."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) after resizing the short side to `resolution`, as torchvision does."""
        width, height = size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resolution * long / short)
        return (self.resolution, new_long) if width <= height else (new_long, self.resolution)

    def crop_is_fixed(self, size: tuple[int, int]) -> bool:
        """Whether this image's crop draws no random numbers, so its latents can be cached."""
        return self.center_crop or self.resized_size(size) == (self.resolution, self.resolution)

    def __call__(self, image: Image.Image, flip: bool | None = None) -> torch.Tensor:
        """Transform one RGB image to a [3, res, res] tensor; `flip=None` draws it like the script."""
        target = self.resized_size(image.size)
        if target != image.size:
            image = image.resize(target, RESAMPLING[self.interpolation])
        image = image.crop(self._crop_box(image.size))
        if flip is None:
            flip = self.random_flip and bool(torch.rand(1) < 0.5)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.array(image, dtype=np.uint8, copy=True)
        pixels = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        return (pixels - 0.5) / 0.5

    def _crop_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        width, height = size
        res = self.resolution
        if self.center_crop:
            top, left = int(round((height - res) / 2.0)), int(round((width - res) / 2.0))
        elif (width, height) == (res, res):
            top = left = 0
        else:  # torchvision's RandomCrop.get_params: rows first, then columns
            top = int(torch.randint(0, height - res + 1, size=(1,)).item())
            left = int(torch.randint(0, width - res + 1, size=(1,)).item())
        return left, top, left + res, top + res


def draw_caption(caption: str | tuple[str, ...]) -> str:
    """A caption, or one of several drawn with Python's `random` as the script does."""
    chosen = caption if isinstance(caption, str) else random.choice(caption)
    # Shuffled tags / caption dropout, when the run uses them (trainer/captions.py).
    return captions.transform(chosen)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's maximum length."""
    return tokenizer(
        list(captions), max_length=tokenizer.model_max_length, padding="max_length",
        truncation=True, return_tensors="pt",
    ).input_ids


# --------------------------------------------------------------------------------------------
# Datasets


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes and transforms images on every access (the script's way)."""

    def __init__(self, examples: list[Example], transform: ImageTransform, tokenizer):
        self.examples = examples
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        pixel_values = self.transform(load_rgb(example.path))
        input_ids = tokenize(self.tokenizer, [draw_caption(example.caption)])[0]
        return {"pixel_values": pixel_values, "input_ids": input_ids}


class CachingDataset(torch.utils.data.Dataset):
    """The images, served from the latent cache where it has them and as pixels where not.

    An item carries its index and flip decision (the loop keys what it encodes by them), then
    either `latent_params` and the family's per-image records (cached) or the transform's output
    (`pixel_values` and those records, to encode now), and either the cached text conditioning
    (under the family's text keys) or the caption's token ids. The flip is drawn exactly where
    the transform draws it (crops are fixed, so that is the item's only draw): the random stream,
    and so every loss, is the uncached run's, whatever the cache holds.
    """

    def __init__(self, examples: list[Example], transform, tokenize_captions, cache,
                 image_keys: list[str], text_keys: list[str] | None):
        self.examples = examples
        self.transform = transform
        self.tokenize_captions = tokenize_captions  # captions -> {token key: ids}, the family's
        self.token_keys = tuple(tokenize_captions([""]))
        self.cache = cache
        self.image_keys = image_keys
        self.text_keys = text_keys  # None: text is not cached (the text encoder trains)
        # The family's flip draw (SD: torch's, as torchvision's RandomHorizontalFlip).
        self.draw_flip = getattr(transform, "draw_flip", None) or (lambda: bool(torch.rand(1) < 0.5))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from trainer.latent_cache import LATENT, TEXT, latent_key

        example = self.examples[index]
        flip = bool(getattr(self.transform, "random_flip", False)) and self.draw_flip()
        item = {"index": torch.tensor(index), "flip": torch.tensor(flip)}
        cached = self.cache.get(LATENT, latent_key(self.image_keys[index], flip))
        if cached is None:
            pixels = self.transform(load_rgb(example.path), flip=flip)
            item.update(pixels if isinstance(pixels, dict) else {"pixel_values": pixels})
        else:
            item["latent_params"] = cached["params"]
            item.update((key, value) for key, value in cached.items() if key != "params")
        text = self.cache.get(TEXT, self.text_keys[index]) if self.text_keys is not None else None
        if text is None:
            item.update((key, ids[0]) for key, ids in self.tokenize_captions([draw_caption(example.caption)]).items())
        else:
            item.update(text)
        return item


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of items into a batch (contiguous float pixels, as the script's collate_fn).

    Items may differ in keys (some cached, some not): a key that only some items have is stacked
    over those, and `<key>_rows` says which rows of the batch they are.
    """
    batch = {}
    for key in dict.fromkeys(key for e in examples for key in e):
        rows = [i for i, e in enumerate(examples) if key in e]
        batch[key] = torch.stack([examples[i][key] for i in rows])
        if len(rows) < len(examples):
            batch[f"{key}_rows"] = torch.tensor(rows)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format).float()
    return batch


# --------------------------------------------------------------------------------------------
# Batch order


# The random state the data pipeline draws from: torch's CPU generator and Python's `random`
# (SDXL's flips, multi-caption choices), saved and restored together.
RandomState = tuple[torch.Tensor, tuple]


def capture_rng() -> RandomState:
    return torch.get_rng_state(), random.getstate()


def restore_rng(state: RandomState | torch.Tensor) -> None:
    if isinstance(state, torch.Tensor):  # torch's alone (a checkpoint from before SDXL)
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state[0])
    if state[1] is not None:
        random.setstate(state[1])


@dataclass
class ResumePoint:
    """Where an interrupted epoch stopped, so it continues with the same order and random stream."""

    seed: int
    position: int  # index of the first batch still to train
    rng_before: RandomState | None  # CPU random state before that batch was first loaded
    rng_after: RandomState | None  # CPU random state at the checkpoint


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches: one permutation per epoch, seeded by one draw from torch's global RNG.

    This is what `RandomSampler` does inside a `DataLoader(shuffle=True)`, at the same moment
    (the first batch of the epoch), so the order matches the script's. Unlike `RandomSampler` it
    remembers the epoch's seed and can restart mid-epoch: the data loader reads one batch ahead,
    so the random state a checkpoint sees already includes the next batch's augmentation draws;
    on resume that batch is loaded again from its own earlier state, then the checkpoint's state
    is put back.
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.resume_point: ResumePoint | None = None
        self.epoch_seed: int | None = None
        self.position = -1
        self.rng_at_position: RandomState | None = None

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        resume, self.resume_point = self.resume_point, None
        if resume is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        else:
            seed = resume.seed
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        start = resume.position if resume else 0
        replay = resume is not None and resume.rng_before is not None
        for position in range(start, len(self)):
            if replay and position == start:
                restore_rng(resume.rng_before)
            self.position = position
            self.rng_at_position = capture_rng()
            yield order[position * self.batch_size:(position + 1) * self.batch_size]
            # The loader asks for the next batch only after loading this one.
            if replay and position == start + self.num_processes - 1:
                restore_rng(resume.rng_after)
