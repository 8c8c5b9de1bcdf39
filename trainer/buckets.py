"""Aspect-ratio buckets, as kohya's sd-scripts make them (library/train_util.py's BucketManager).

Training on a square crop throws away the sides of every wide or tall photo. With buckets an
image is instead resized to cover the bucket of the nearest aspect ratio and cropped to it, and a
batch only ever holds images of one bucket (trainer/data.py's BucketBatchSampler), so the
tensors stack.

The bucket set (`make_bucket_resolutions`): the square of about the resolution's area, and every
width from `min_reso` to `max_reso` in steps of `step` with the tallest height (a multiple of the
step, within the same limits) whose area stays within resolution²; each also transposed. With
`no_upscale` there is no predefined set: an image within the area keeps its size and its bucket
is that size rounded down to the step (it is only cropped, never enlarged); a larger one is first
scaled down to the area (kohya's rounding), then treated the same way.

Pure Python (no torch): the service builds the dataset report's bucket plan with it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height), as PIL


class BucketError(ValueError):
    """An image that no bucket can take (with `no_upscale`: a side shorter than one step)."""


def make_bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's `make_bucket_resolutions` for a square `resolution`: sorted (width, height)s."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // step) * step
    sizes = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // step) * step)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


@dataclass(frozen=True)
class Fit:
    """Where one image goes: resized to `resized` (covering the bucket), then cropped to `bucket`."""

    bucket: Size
    resized: Size


@dataclass(frozen=True)
class Buckets:
    """The bucket settings of a run and the image -> bucket rule they make."""

    resolution: int
    min_reso: int
    max_reso: int
    step: int
    no_upscale: bool = False

    @classmethod
    def from_config(cls, config) -> Buckets | None:
        """The run's buckets, or None when `enable_bucket` is off (the square crop)."""
        if not getattr(config, "enable_bucket", False):
            return None
        low, high = config.bucket_limits
        return cls(config.resolution, low, high, config.bucket_reso_steps, config.bucket_no_upscale)

    @classmethod
    def defaults(cls, resolution: int) -> Buckets:
        """The settings a run at `resolution` gets when it only turns buckets on."""
        low, high = default_limits(resolution, DEFAULT_STEP)
        return cls(resolution, low, high, DEFAULT_STEP)

    @property
    def predefined(self) -> list[Size]:
        if self.no_upscale:
            return []
        return make_bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.step)

    def describe(self) -> dict:
        return {"resolution": self.resolution, "min_bucket_reso": self.min_reso, "max_bucket_reso": self.max_reso,
                "bucket_reso_steps": self.step, "bucket_no_upscale": self.no_upscale}

    def fit(self, size: Size) -> Fit:
        """The bucket of an image of `size` (upright width, height) and the size it is resized to."""
        if self.no_upscale:
            return self._fit_no_upscale(size)
        return self._fit_predefined(size, self._predefined_table())

    def _predefined_table(self) -> tuple[tuple[Size, ...], tuple[float, ...]]:
        table = _TABLES.get(self)
        if table is None:
            sizes = tuple(self.predefined)
            table = _TABLES[self] = (sizes, tuple(w / h for w, h in sizes))
        return table

    def _fit_predefined(self, size: Size, table) -> Fit:
        sizes, ratios = table
        width, height = size
        aspect = width / height
        if size in sizes:  # already a bucket's size: that bucket, even if another has the same ratio
            bucket = size
        else:  # the nearest aspect ratio; on a tie the first in sorted order (numpy's argmin)
            bucket = sizes[min(range(len(sizes)), key=lambda i: abs(ratios[i] - aspect))]
        bucket_w, bucket_h = bucket
        # Scale by the side that fits exactly; the other then covers the bucket (rounding only
        # ever lands on the bucket's side or past it, the max() says so explicitly).
        scale = bucket_h / height if aspect > bucket_w / bucket_h else bucket_w / width
        resized = (max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5)))
        return Fit(bucket, resized)

    def _round(self, value: float) -> int:
        value = int(value + 0.5)
        return value - value % self.step

    def _fit_no_upscale(self, size: Size) -> Fit:
        width, height = size
        max_area = self.resolution * self.resolution
        aspect = width / height
        if width * height > max_area:
            # Scale down to the area keeping the aspect ratio; of "width on the step" and "height
            # on the step" take the one that keeps the ratio best (kohya's rule).
            resized_w = math.sqrt(max_area * aspect)
            resized_h = max_area / resized_w
            by_w = self._round(resized_w)
            by_w_h = self._round(by_w / aspect)
            by_h = self._round(resized_h)
            by_h_w = self._round(by_h * aspect)
            error_w = abs(by_w / by_w_h - aspect) if by_w_h else math.inf
            error_h = abs(by_h_w / by_h - aspect) if by_h else math.inf
            if error_w < error_h:
                resized = (by_w, int(by_w / aspect + 0.5))
            else:
                resized = (int(by_h * aspect + 0.5), by_h)
        else:
            resized = size  # no resize at all
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        if min(bucket) == 0:
            raise BucketError(f"an image of {width}x{height} has a side shorter than bucket_reso_steps "
                              f"({self.step}) after fitting the area, and bucket_no_upscale never enlarges it; "
                              "lower bucket_reso_steps, turn bucket_no_upscale off, or remove the image")
        return Fit(bucket, resized)

    def plan(self, sizes: Iterable[Size]) -> list[dict]:
        """The buckets the images fall into and how many each: [{width, height, images}], largest
        count first (then by size), for reports and the start event."""
        counts = Counter(self.fit(size).bucket for size in sizes)
        return [{"width": w, "height": h, "images": n}
                for (w, h), n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


# Bucket tables by settings (a run computes its table once, not once per image).
_TABLES: dict[Buckets, tuple[tuple[Size, ...], tuple[float, ...]]] = {}

DEFAULT_STEP = 64


def default_limits(resolution: int, step: int) -> tuple[int, int]:
    """min/max_bucket_reso when not given: half and twice the resolution on the step (kohya's
    256 and 1024 at 512), the minimum at least one step."""
    low = max(step, (resolution // 2) // step * step)
    high = max(low, (resolution * 2) // step * step)
    return low, high
