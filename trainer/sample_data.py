"""Small synthetic captioned image sets (coloured shapes) for tests and smoke runs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
CAPTION_STYLES = ("txt", "jsonl")


RGB = tuple[int, int, int]


def _draw(shape: str, fg: RGB, bg: RGB, size: int, rng: np.random.Generator) -> Image.Image:
    # A vertical brightness ramp, because real photos are never one flat colour.
    ramp = np.linspace(0.75, 1.15, size)[:, None, None]
    pixels = np.clip(np.asarray(bg, dtype=np.float64) * ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(pixels, (size, size, 3)).copy(), "RGB")
    half = int(rng.integers(size // 5, size // 3 + 1))
    cx, cy = (int(v) for v in rng.integers(half, size - half, size=2, endpoint=True))
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fg)
    return image


def write_sample_dataset(
    out_dir: str | Path, n_images: int = 8, size: int = 48, seed: int = 0, caption_style: str = "txt"
) -> Path:
    """Write ``n_images`` square RGB PNGs of coloured shapes with captions; return ``out_dir``.

    Captions read like "a red circle on a blue background" and go either in a sidecar
    ``<name>.txt`` per image (``caption_style="txt"``) or in one ``metadata.jsonl`` with
    ``{"file_name", "text"}`` rows (``"jsonl"``). Output depends only on the arguments.
    """
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = [(s, f, b) for s in SHAPES for f in COLORS for b in COLORS if f != b]
    # Shuffled so a small set still mixes shapes and colours; captions repeat only past 168 images.
    order = rng.permutation(len(combos))
    rows = []
    for i, k in zip(range(n_images), itertools.cycle(order)):
        shape, fg, bg = combos[k]
        name = f"{i:04d}.png"
        _draw(shape, COLORS[fg], COLORS[bg], size, rng).save(out_dir / name)
        article = "an" if fg[0] in "aeiou" else "a"
        caption = f"{article} {fg} {shape} on a {bg} background"
        if caption_style == "txt":
            (out_dir / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
        rows.append({"file_name": name, "text": caption})
    if caption_style == "jsonl":
        with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return out_dir
