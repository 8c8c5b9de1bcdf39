"""Dataset files without torch: folders and zips of captioned images, checked image by image.

The service imports this module to validate uploads with the trainer's own rules.
"""

from __future__ import annotations

import contextlib
import json
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "MPO"}  # MPO: what some cameras' JPEGs decode as
# Files that may sit beside images without being training data.
IGNORED_EXTENSIONS = {".txt", ".jsonl", ".json", ".csv", ".md", ".yaml", ".yml", ".toml"}
METADATA_FILE = "metadata.jsonl"
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
    """Extract a zip, refusing entries that would land outside `dest`, links and other entries that
    are neither files nor folders (devices, FIFOs, sockets)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise DatasetError(f"{archive.name}: entry {info.filename!r} points outside the archive")
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix mode
            if kind == stat.S_IFLNK:
                raise DatasetError(f"{archive.name}: entry {info.filename!r} is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DatasetError(f"{archive.name}: entry {info.filename!r} is a {_SPECIAL.get(kind, 'special file')}, "
                                   "not a regular file")
        zf.extractall(dest)


_SPECIAL = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO",
            stat.S_IFSOCK: "socket"}


def _single_root(folder: Path) -> Path:
    """Descend into the archive's one top-level folder when the images live there."""
    entries = [p for p in folder.iterdir() if not _hidden(p.name)]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def inspect_folder(
    folder: Path,
    caption_column: str = "text",
    missing_captions: str = "error",
) -> tuple[list[Example], list[str]]:
    """Find the images under `folder` with their captions, decoding each once to check it.

    Captions come from `metadata.jsonl` (the imagefolder convention: `file_name` plus the caption
    column) or from a `.txt` file beside each image. Returns the usable examples and one
    problem line per refused file, each starting with the file's path.
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
    return examples, problems


def scan_examples(
    folder: Path,
    caption_column: str = "text",
    missing_captions: str = "error",
) -> list[Example]:
    """The folder's examples; any problem raises one DatasetError that names every file at fault."""
    examples, problems = inspect_folder(folder, caption_column, missing_captions)
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
