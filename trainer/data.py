"""Training data: a folder or zip of captioned images, the script's transforms, and batch order.

Random numbers are drawn exactly where the diffusers script's torchvision transforms draw them
(a crop offset only when there is slack, one flip draw per image), from torch's global generator,
so a run here follows the script's random stream.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "MPO"}  # MPO: what some cameras' JPEGs decode as
# Files that may sit beside images without being training data.
IGNORED_EXTENSIONS = {".txt", ".jsonl", ".json", ".csv", ".md", ".yaml", ".yml", ".toml"}
METADATA_FILE = "metadata.jsonl"
RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """The training data cannot be used; the message names the files at fault."""


@dataclass(frozen=True)
class Example:
    """One training image, its caption (or captions, one drawn per use) and its upright size."""

    path: Path
    caption: str | tuple[str, ...]
    size: tuple[int, int]


# --------------------------------------------------------------------------------------------
# Finding the examples


@contextlib.contextmanager
def dataset_folder(train_data_dir: str | Path) -> Iterator[Path]:
    """Yield a folder of the data: the folder itself, or a zip extracted to a temporary one."""
    source = Path(train_data_dir)
    if source.is_dir():
        yield source
        return
    if not source.exists():
        raise DatasetError(f"train_data_dir: {source} does not exist")
    if not zipfile.is_zipfile(source):
        raise DatasetError(f"train_data_dir: {source} is neither a folder nor a zip file")
    with tempfile.TemporaryDirectory(prefix="loraq-data-") as tmp:
        extract_zip(source, Path(tmp))
        yield _single_root(Path(tmp))


def extract_zip(archive: Path, dest: Path) -> None:
    """Extract a zip, refusing entries that would land outside `dest` or are links."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise DatasetError(f"{archive.name}: entry {info.filename!r} points outside the archive")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{archive.name}: entry {info.filename!r} is a symbolic link")
        zf.extractall(dest)


def _single_root(folder: Path) -> Path:
    """Descend into the archive's one top-level folder when the images live there."""
    entries = [p for p in folder.iterdir() if not _hidden(p.name)]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def scan_examples(
    folder: Path,
    caption_column: str = "text",
    missing_captions: str = "error",
) -> list[Example]:
    """Find the images under `folder` with their captions, and check that each one decodes.

    Captions come from `metadata.jsonl` (the imagefolder convention: `file_name` plus the caption
    column) or from a `.txt` file beside each image. Every problem is collected and reported in
    one DatasetError that names the files.
    """
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(_hidden(part) for part in p.relative_to(folder).parts)
    )
    metadata = _read_metadata(folder, caption_column)
    problems: list[str] = []
    examples: list[Example] = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        if suffix in IGNORED_EXTENSIONS:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            problems.append(f"{rel}: not an image (PNG, JPEG or WebP expected)")
            continue
        try:
            size = probe_image(path)
        except DatasetError as error:
            problems.append(f"{rel}: {error}")
            continue
        caption = metadata.pop(rel, None)
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        if caption is None:
            if missing_captions == "error":
                problems.append(f"{rel}: no caption (set missing_captions=empty to train it uncaptioned)")
                continue
            caption = ""
        examples.append(Example(path=path, caption=caption, size=size))
    problems.extend(f"{METADATA_FILE}: {name}: no such image" for name in sorted(metadata))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DatasetError(f"{len(problems)} problem(s) in the training data: {shown}")
    if not examples:
        raise DatasetError(f"train_data_dir: no images found in {folder}")
    return examples


def _read_metadata(folder: Path, caption_column: str) -> dict[str, str | tuple[str, ...]]:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    captions: dict[str, str | tuple[str, ...]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = PurePosixPath(row["file_name"]).as_posix()
            caption = row[caption_column]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetError(
                f"{METADATA_FILE} line {number}: expected an object with 'file_name' and "
                f"'{caption_column}' ({error.__class__.__name__}: {error})"
            ) from None
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            captions[name] = tuple(caption)
        elif isinstance(caption, str):
            captions[name] = caption
        else:
            raise DatasetError(f"{METADATA_FILE} line {number}: '{caption_column}' must be a string")
    return captions


def probe_image(path: Path) -> tuple[int, int]:
    """Decode an image fully once, returning its upright (width, height); DatasetError if it can't."""
    try:
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                raise DatasetError(f"unsupported image format {image.format}")
            image.load()
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            return width, height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, DatasetError):
            raise
        reason = "not a readable image" if isinstance(error, UnidentifiedImageError) else str(error)
        raise DatasetError(reason) from None


def load_rgb(path: Path) -> Image.Image:
    """Open an image upright in RGB; transparent pixels become white rather than arbitrary colour."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode.startswith("I"):  # 16/32-bit greyscale: scale into 8 bits first
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return image.convert("RGB")


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
    return caption if isinstance(caption, str) else random.choice(caption)


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


class CachedLatentDataset(torch.utils.data.Dataset):
    """Serves cached VAE posterior parameters (and text embeddings) instead of pixels.

    The trainer samples the cached distribution on every step, so the random stream and the
    training signal stay those of the uncached run. A flip draws its random number here exactly
    where the transform would.
    """

    def __init__(
        self,
        latent_params: torch.Tensor,
        flipped_params: torch.Tensor | None,
        text: torch.Tensor,
        text_is_embedding: bool,
    ):
        self.latent_params = latent_params
        self.flipped_params = flipped_params
        self.text = text
        self.text_key = "encoder_hidden_states" if text_is_embedding else "input_ids"
        self.memory_format = torch.contiguous_format  # the VAE output's layout, set by the trainer

    def __len__(self) -> int:
        return len(self.latent_params)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        params = self.latent_params[index]
        if self.flipped_params is not None and bool(torch.rand(1) < 0.5):
            params = self.flipped_params[index]
        return {"latent_params": params, self.text_key: self.text[index]}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of items into a batch (contiguous float pixels, as the script's collate_fn)."""
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format).float()
    return batch


# --------------------------------------------------------------------------------------------
# Batch order


@dataclass
class ResumePoint:
    """Where an interrupted epoch stopped, so it continues with the same order and random stream."""

    seed: int
    position: int  # index of the first batch still to train
    rng_before: torch.Tensor | None  # CPU RNG state before that batch was first loaded
    rng_after: torch.Tensor | None  # CPU RNG state at the checkpoint


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
        self.rng_at_position: torch.Tensor | None = None

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
                torch.set_rng_state(resume.rng_before)
            self.position = position
            self.rng_at_position = torch.get_rng_state()
            yield order[position * self.batch_size:(position + 1) * self.batch_size]
            # The loader asks for the next batch only after loading this one.
            if replay and position == start + self.num_processes - 1:
                torch.set_rng_state(resume.rng_after)
