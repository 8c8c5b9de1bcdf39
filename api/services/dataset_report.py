"""The pre-flight report of a dataset: sizes, captions, CLIP length estimates, duplicates."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from api.schemas import BucketPlan, CaptionPreview, DatasetReport, LongCaptions, RefusedFile
from trainer.buckets import Buckets
from trainer.files import Example

CLIP_MAX_TOKENS = 77  # CLIP's context, including the start and end tokens
SMALL_SIDES = (512, 768, 1024)
PREVIEW_CAPTIONS = 8
PREVIEW_CHARS = 200
LISTED = 20
# The families' default resolutions (SD, Flux, SD3: 512; SDXL: 1024): the report cannot know a
# job's, so it plans buckets at both with the default bucket options.
BUCKET_RESOLUTIONS = (512, 1024)
# CLIP's pre-tokenizer (`[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+` and the contractions) in Python's
# `re`: every piece becomes at least one BPE token, so the count is a lower bound.
_CLIP_PIECES = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
    re.IGNORECASE,
)


def clip_tokens_at_least(text: str) -> int:
    """A lower bound on CLIP's token count for `text`, start and end tokens included."""
    cleaned = " ".join(text.split()).lower()
    return len(_CLIP_PIECES.findall(cleaned)) + 2


def captions_of(example: Example) -> tuple[str, ...]:
    return example.caption if isinstance(example.caption, tuple) else (example.caption,)


def is_captioned(example: Example) -> bool:
    return any(caption.strip() for caption in captions_of(example))


def build_report(
    root: Path,
    examples: list[Example],
    hashes: dict[str, str],
    refused: list[RefusedFile],
    warnings: list[str],
) -> DatasetReport:
    """Summarise accepted `examples` (under `root`; `hashes` keyed by relative path)."""
    names = [example.path.relative_to(root).as_posix() for example in examples]
    sizes = [example.size for example in examples]
    by_area = sorted(sizes, key=lambda size: (size[0] * size[1], min(size)))
    long_files = [name for name, example in zip(names, examples)
                  if any(clip_tokens_at_least(c) > CLIP_MAX_TOKENS for c in captions_of(example))]
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[hashes[name]].append(name)
    captioned = sum(is_captioned(example) for example in examples)
    return DatasetReport(
        image_count=len(examples),
        captioned_count=captioned,
        uncaptioned_count=len(examples) - captioned,
        min_size=by_area[0] if by_area else None,
        max_size=by_area[-1] if by_area else None,
        smaller_than={str(side): sum(min(size) < side for size in sizes) for side in SMALL_SIDES},
        long_captions=LongCaptions(
            limit=CLIP_MAX_TOKENS, count=len(long_files), files=long_files[:LISTED],
            note="estimate: counts CLIP pre-tokenizer pieces (a lower bound on BPE tokens); "
                 "text past 77 tokens is cut off in training",
        ),
        duplicates=[group for group in groups.values() if len(group) > 1],
        refused=refused,
        warnings=warnings,
        bucket_plans=[bucket_plan(Buckets.defaults(resolution), sizes) for resolution in BUCKET_RESOLUTIONS],
    )


def bucket_plan(buckets: Buckets, sizes: list[tuple[int, int]]) -> BucketPlan:
    settings = buckets.describe()
    return BucketPlan(resolution=buckets.resolution, min_bucket_reso=settings["min_bucket_reso"],
                      max_bucket_reso=settings["max_bucket_reso"], bucket_reso_steps=buckets.step,
                      buckets=buckets.plan(sizes))


def caption_preview(root: Path, examples: list[Example]) -> list[CaptionPreview]:
    preview = []
    for example in examples[:PREVIEW_CAPTIONS]:
        caption = captions_of(example)[0]
        if len(caption) > PREVIEW_CHARS:
            caption = caption[:PREVIEW_CHARS - 1] + "…"
        preview.append(CaptionPreview(file=example.path.relative_to(root).as_posix(), caption=caption))
    return preview
