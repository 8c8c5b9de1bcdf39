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
from trainer.buckets import BucketError, Buckets
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
    """Resize the short side, crop to a square, maybe flip, scale to [-1, 1] (the script's pipeline).

    With `buckets` (enable_bucket) an image is instead resized to cover its aspect-ratio bucket
    and cropped to the bucket's size (trainer/buckets.py); the crop is centred or random as
    `center_crop` says, drawn from torch's generator as the square one is.
    """

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"
    buckets: Buckets | None = None

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) after resizing the short side to `resolution`, as torchvision does
        (with buckets: the size that covers the image's bucket)."""
        if self.buckets is not None:
            return self.buckets.fit(size).resized
        width, height = size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resolution * long / short)
        return (self.resolution, new_long) if width <= height else (new_long, self.resolution)

    def crop_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) an image of `size` is cropped to: its bucket, else the square."""
        if self.buckets is not None:
            return self.buckets.fit(size).bucket
        return self.resolution, self.resolution

    def crop_is_fixed(self, size: tuple[int, int]) -> bool:
        """Whether this image's crop draws no random numbers, so its latents can be cached."""
        return self.center_crop or self.resized_size(size) == self.crop_size(size)

    def __call__(self, image: Image.Image, flip: bool | None = None) -> torch.Tensor:
        """Transform one RGB image to a [3, res, res] tensor; `flip=None` draws it like the script."""
        crop = self.crop_size(image.size)
        target = self.resized_size(image.size)
        if target != image.size:
            image = image.resize(target, RESAMPLING[self.interpolation])
        image = image.crop(self._crop_box(image.size, crop))
        if flip is None:
            flip = self.random_flip and bool(torch.rand(1) < 0.5)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.array(image, dtype=np.uint8, copy=True)
        pixels = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        return (pixels - 0.5) / 0.5

    def _crop_box(self, size: tuple[int, int], crop: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        width, height = size
        crop_w, crop_h = crop or (self.resolution, self.resolution)
        if self.center_crop:
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        elif (width, height) == (crop_w, crop_h):
            top = left = 0
        else:  # torchvision's RandomCrop.get_params: rows first, then columns
            top = int(torch.randint(0, height - crop_h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,)).item())
        return left, top, left + crop_w, top + crop_h


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
                 image_keys: list[str], text_keys: list[str] | None, latent_kinds: list[str] | None = None):
        self.examples = examples
        self.transform = transform
        self.tokenize_captions = tokenize_captions  # captions -> {token key: ids}, the family's
        self.token_keys = tuple(tokenize_captions([""]))
        self.cache = cache
        self.image_keys = image_keys
        self.text_keys = text_keys  # None: text is not cached (the text encoder trains)
        self.latent_kinds = latent_kinds  # per image with buckets (a kind per bucket size), else None
        # The family's flip draw (SD: torch's, as torchvision's RandomHorizontalFlip).
        self.draw_flip = getattr(transform, "draw_flip", None) or (lambda: bool(torch.rand(1) < 0.5))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from trainer.latent_cache import LATENT, TEXT, latent_key

        example = self.examples[index]
        flip = bool(getattr(self.transform, "random_flip", False)) and self.draw_flip()
        item = {"index": torch.tensor(index), "flip": torch.tensor(flip)}
        kind = self.latent_kinds[index] if self.latent_kinds is not None else LATENT
        cached = self.cache.get(kind, latent_key(self.image_keys[index], flip))
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
        batches = self.epoch_batches(generator)
        start = resume.position if resume else 0
        replay = resume is not None and resume.rng_before is not None
        for position in range(start, len(self)):
            if replay and position == start:
                restore_rng(resume.rng_before)
            self.position = position
            self.rng_at_position = capture_rng()
            yield batches[position]
            # The loader asks for the next batch only after loading this one.
            if replay and position == start + self.num_processes - 1:
                restore_rng(resume.rng_after)

    def epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        """The epoch's batches in order, from the epoch's seeded generator (and nothing else)."""
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        return [order[start:start + self.batch_size] for start in range(0, self.num_samples, self.batch_size)]


class BucketBatchSampler(EpochBatchSampler):
    """Shuffled batches of one aspect-ratio bucket each (enable_bucket).

    Per epoch, from the epoch's seeded generator only: each bucket's images are shuffled and cut
    into batches (a bucket's last batch may be short), then the order of all batches is shuffled.
    The order is a function of the epoch's seed, so a resumed epoch replays it exactly, as the
    plain sampler's does (same seed, same position, same random-state replay).

    `batch_size` is None for accelerate: batches have their own lengths, so a process's share of
    an epoch is whole batches, and where it pads the last round it repeats whole batches (never
    mixing buckets in one batch, which a fixed batch size would make it do).
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, num_processes: int = 1):
        super().__init__(len(buckets), batch_size, num_processes)
        self.bucket_batch_size = batch_size
        self.batch_size = None
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(tuple(bucket), []).append(index)
        self.groups = dict(sorted(self.groups.items()))

    def __len__(self) -> int:
        return sum(math.ceil(len(members) / self.bucket_batch_size) for members in self.groups.values())

    @property
    def plan(self) -> list[dict]:
        """[{width, height, images}] per bucket, most images first."""
        return [{"width": w, "height": h, "images": len(members)}
                for (w, h), members in sorted(self.groups.items(), key=lambda item: (-len(item[1]), item[0]))]

    def epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        size = self.bucket_batch_size
        batches = []
        for members in self.groups.values():
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            batches += [shuffled[start:start + size] for start in range(0, len(shuffled), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def make_batch_sampler(dataset, batch_size: int, num_processes: int = 1) -> EpochBatchSampler:
    """The run's batch sampler: by bucket when the dataset's transform has buckets."""
    transform = getattr(dataset, "transform", None)
    if getattr(transform, "buckets", None) is None:
        return EpochBatchSampler(len(dataset), batch_size, num_processes)
    return BucketBatchSampler(bucket_sizes(dataset.examples, transform), batch_size, num_processes)


def bucket_sizes(examples: Sequence[Example], transform: ImageTransform) -> list[tuple[int, int]]:
    """Each example's bucket (the crop's width, height); an image no bucket takes is named."""
    sizes = []
    for example in examples:
        try:
            sizes.append(transform.crop_size(example.size))
        except BucketError as error:
            raise DatasetError(f"{example.path.name}: {error}") from None
    return sizes
