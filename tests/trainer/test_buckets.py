"""Aspect-ratio buckets (enable_bucket, trainer/buckets.py): kohya's bucket set and image rule,
one bucket per batch, no upscaling with bucket_no_upscale, the plan in the start event, cache on =
off, SDXL's time ids from the bucket crop, and a resumed bucketed run equal to an uninterrupted
one, on the tiny models of every family."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from safetensors import safe_open

from support.resume import assert_resume_matches
from trainer import metadata
from trainer.buckets import BucketError, Buckets, make_bucket_resolutions
from trainer.config import ConfigError, load_config
from trainer.data import BucketBatchSampler, DatasetError, ResumePoint, collate, load_rgb
from trainer.events import Event
from trainer.families.sdxl import SDXLFamily
from trainer.loop import setup, train
from trainer.model import KOHYA_WEIGHTS_NAME
from trainer.sample_data import write_sample_dataset
from support.torchrun import train_two_processes

# (width, height) of the mixed dataset's images and, at resolution 64 with steps of 16 (buckets
# 32..128), the bucket each takes by nearest aspect ratio (worked out by hand from the bucket set
# {64x64, 48x80, 80x48, 32x96, 96x32, 32x112, 112x32, 32x128, 128x32}):
# 96x64 (1.5): 80x48 (1.67; 64x64 is 1.0); 64x96: 48x80; 72x72 and 40x40: 64x64 (the second
# upscaled); 100x50 (2.0): 80x48 (96x32 is 3.0); 50x120 (0.42): 32x96 (0.33; 48x80 is 0.6).
MIXED = [((96, 64), (80, 48)), ((64, 96), (48, 80)), ((72, 72), (64, 64)), ((100, 50), (80, 48)),
         ((40, 40), (64, 64)), ((50, 120), (32, 96))]
# Smaller than 64x64's area, so kept as they are and cropped to their size on the step of 16, but
# the last (6000 px): first scaled down to the area.
SMALL = [(40, 24), (56, 40), (48, 48), (24, 56), (100, 60)]


def write_images(folder: Path, sizes) -> Path:
    write_sample_dataset(folder, n_images=len(sizes), size=128)
    for path, size in zip(sorted(folder.glob("*.png")), sizes):
        Image.open(path).resize(size, Image.Resampling.BICUBIC).save(path)
    return folder


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("mixed") / "data", [size for size, _ in MIXED])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("small") / "data", SMALL)


MODELS = {"sd": "tiny_model", "sdxl": "tiny_sdxl", "flux": "tiny_flux_model", "sd3": "tiny_sd3_model"}


def bucket_config(family: str, model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=64, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=4,
        lr_warmup_steps=0, enable_bucket=True, bucket_reso_steps=16,
        **(dict(max_sequence_length=16, device="cpu") if family in ("flux", "sd3") else {}),
    )
    return load_config({**values, **options}, family)


# ------------------------------------------------------------------------------------------
# The bucket set and the image rule


def test_bucket_set_is_kohyas():
    buckets = make_bucket_resolutions(512, 256, 1024, 64)
    # kohya's rule by hand: for each width 256..1024 in steps of 64, the tallest height on the step
    # within 512x512's area (and 256..1024), both ways round
    tallest = {256: 1024, 320: 768, 384: 640, 448: 576, 512: 512, 576: 448, 640: 384, 704: 320, 768: 320,
               832: 256, 896: 256, 960: 256, 1024: 256}
    assert buckets == sorted({(w, h) for w, h in tallest.items()} | {(h, w) for w, h in tallest.items()})
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert Buckets.defaults(512).describe() == {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                                                "bucket_reso_steps": 64, "bucket_no_upscale": False}


@pytest.mark.parametrize("size, bucket", MIXED)
def test_nearest_ratio_bucket_and_a_resize_that_covers_it(size, bucket):
    buckets = Buckets(64, 32, 128, 16)
    fit = buckets.fit(size)
    assert fit.bucket == bucket
    ratio = size[0] / size[1]
    assert all(abs(w / h - ratio) >= abs(bucket[0] / bucket[1] - ratio) for w, h in buckets.predefined)
    # one side matches the bucket exactly, the other covers it; the aspect ratio is kept
    assert fit.resized[0] >= bucket[0] and fit.resized[1] >= bucket[1]
    assert fit.resized[0] == bucket[0] or fit.resized[1] == bucket[1]
    assert abs(fit.resized[0] / fit.resized[1] - ratio) < 0.05


def test_no_upscale_keeps_small_images_and_shrinks_large_ones():
    buckets = Buckets(64, 32, 128, 16, no_upscale=True)
    for size in SMALL:
        fit = buckets.fit(size)
        assert fit.resized[0] <= size[0] and fit.resized[1] <= size[1], size
        assert fit.bucket[0] <= fit.resized[0] and fit.bucket[1] <= fit.resized[1]
        assert fit.bucket[0] % 16 == 0 and fit.bucket[1] % 16 == 0
        if size[0] * size[1] <= 64 * 64:
            assert fit.resized == size and fit.bucket == (size[0] // 16 * 16, size[1] // 16 * 16)
        else:
            assert fit.resized[0] * fit.resized[1] <= 64 * 64 * 1.05
    with pytest.raises(BucketError, match="shorter than bucket_reso_steps"):
        buckets.fit((40, 10))


def test_an_image_no_bucket_takes_is_named(tiny_model, tmp_path):
    folder = write_images(tmp_path / "data", [(48, 48), (40, 10)])
    with pytest.raises(DatasetError, match=r"\d+\.png: an image of 40x10 has a side shorter than bucket_reso_steps"):
        train(bucket_config("sd", tiny_model, folder, tmp_path / "out", bucket_no_upscale=True))


def test_options_are_validated_with_clear_messages(tiny_model, mixed_data, tmp_path):
    def config(**options):
        return bucket_config("sd", tiny_model, mixed_data, tmp_path, **options)

    assert config().bucket_limits == (32, 128), "half and twice the resolution"
    assert load_config(dict(pretrained_model_name_or_path="m", train_data_dir="d", enable_bucket=True)).bucket_limits \
        == (256, 1024)
    refusals = {
        "bucket_reso_steps: 64 is larger than resolution 32": dict(resolution=32, bucket_reso_steps=64),
        "bucket_reso_steps: must be a multiple of 8": dict(bucket_reso_steps=12),
        "min_bucket_reso: must be a multiple of bucket_reso_steps 16": dict(min_bucket_reso=40),
        r"min_bucket_reso: need min_bucket_reso \(80\) <= resolution \(64\)": dict(min_bucket_reso=80),
        r"max_bucket_reso: need .* <= max_bucket_reso \(48\)": dict(max_bucket_reso=48),
        "bucket_no_upscale: set enable_bucket too": dict(enable_bucket=False, bucket_reso_steps=64,
                                                         bucket_no_upscale=True),
    }
    for message, options in refusals.items():
        with pytest.raises(ConfigError, match=message):
            config(**options)
    with pytest.raises(ConfigError, match="multiple of 16 for the flux family"):
        bucket_config("flux", tiny_model, mixed_data, tmp_path, bucket_reso_steps=8)


# ------------------------------------------------------------------------------------------
# The sampler


def test_sampler_batches_one_bucket_each_in_a_seeded_resumable_order():
    buckets = [(64, 64), (80, 48), (64, 64), (48, 80), (80, 48), (64, 64), (80, 48), (64, 64), (32, 96)]
    sampler = BucketBatchSampler(buckets, batch_size=2)
    epoch = list(sampler)
    seed = sampler.epoch_seed
    assert len(epoch) == len(sampler) == 2 + 2 + 1 + 1
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch)
    assert sorted(i for batch in epoch for i in batch) == list(range(len(buckets)))
    assert sampler.plan[0] == {"width": 64, "height": 64, "images": 4}
    # the epoch's order is a function of its seed alone: a resumed sampler replays the rest
    resumed = BucketBatchSampler(buckets, batch_size=2)
    torch.manual_seed(12345)  # another global state: the seed comes from the resume point
    resumed.resume_point = ResumePoint(seed, position=2, rng_before=None, rng_after=None)
    assert list(resumed) == epoch[2:]
    orders = set()
    for _ in range(5):
        orders.add(tuple(map(tuple, sampler)))
    assert len(orders) > 1, "each epoch draws a new order"


def test_two_processes_get_whole_single_bucket_batches():
    """accelerate shards whole batches (batch_size None) and pads with whole batches."""
    buckets = [(64, 64)] * 3 + [(80, 48)] * 3 + [(32, 96)]
    sampler = BucketBatchSampler(buckets, batch_size=2)  # 5 batches, 3 of them short
    shards = []
    for rank in range(2):
        torch.manual_seed(0)  # each rank draws the same epoch seed
        shards.append(list(BatchSamplerShard(sampler, num_processes=2, process_index=rank, split_batches=False,
                                             even_batches=True)))
    assert len(shards[0]) == len(shards[1]) == 3, "the odd batch count is padded with a whole batch"
    assert all(len({buckets[i] for i in batch}) == 1 for shard in shards for batch in shard)
    assert {i for shard in shards for batch in shard for i in batch} == set(range(len(buckets)))


# ------------------------------------------------------------------------------------------
# Training


def epoch_shapes(run) -> Counter:
    """(width, height) of each image served in one epoch of the run's loader."""
    shapes = Counter()
    for batch in run.dataloader:
        height, width = batch["pixel_values"].shape[-2:]  # stacked: every row the same shape
        shapes[(int(width), int(height))] += len(batch["pixel_values"])
    return shapes


def test_every_batch_comes_from_one_bucket_and_the_start_event_lists_the_plan(tiny_model, mixed_data, tmp_path):
    config = bucket_config("sd", tiny_model, mixed_data, tmp_path / "run", random_flip=True, cache_latents=False)
    run = setup(config)
    expected = Counter(bucket for _, bucket in MIXED)
    assert epoch_shapes(run) == expected
    events: list[Event] = []
    with metadata.recording(config) as recorder:
        train(config, lambda event: (recorder(event), events.append(event)))
    start = next(e for e in events if e.type == "start")
    with safe_open(str(tmp_path / "run" / KOHYA_WEIGHTS_NAME), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_enable_bucket"], meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("True", "32", "128")
    assert start.data["buckets"] == [{"width": w, "height": h, "images": n}
                                     for (w, h), n in sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))]
    # without buckets the start event says nothing of them and every image is the square
    square = bucket_config("sd", tiny_model, mixed_data, tmp_path / "square", enable_bucket=False,
                           bucket_reso_steps=64, cache_latents=False)
    assert epoch_shapes(setup(square)) == Counter({(64, 64): len(MIXED)})


def test_no_image_is_upscaled_with_bucket_no_upscale(tiny_model, small_data, mixed_data, tmp_path, monkeypatch):
    resizes = []
    original = Image.Image.resize

    def recording(image, size, *args, **kwargs):
        resizes.append((image.size, tuple(size)))
        return original(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    config = bucket_config("sd", tiny_model, small_data, tmp_path / "small", bucket_no_upscale=True,
                           cache_latents=False, max_train_steps=3)
    expected = Counter(Buckets(64, 32, 128, 16, no_upscale=True).fit(size).bucket for size in SMALL)
    assert epoch_shapes(setup(config)) == expected
    train(config)
    assert resizes, "the large image was scaled down"
    assert all(to[0] <= before[0] and to[1] <= before[1] for before, to in resizes), resizes
    # the same check fails where upscaling happens (40x40 into 64x64)
    resizes.clear()
    epoch_shapes(setup(bucket_config("sd", tiny_model, mixed_data, tmp_path / "mixed", cache_latents=False)))
    assert any(to[0] > before[0] for before, to in resizes)


@pytest.mark.parametrize("family", list(MODELS))
def test_cache_on_and_off_give_equal_losses_with_buckets(family, mixed_data, tmp_path, request):
    model = request.getfixturevalue(MODELS[family])
    options = dict(center_crop=True, random_flip=True, max_train_steps=5)
    cached_events: list[Event] = []
    cached = train(bucket_config(family, model, mixed_data, tmp_path / "cached", cache_latents=True, **options),
                   cached_events.append)
    plain = train(bucket_config(family, model, mixed_data, tmp_path / "plain", cache_latents=False, **options))
    assert next(e for e in cached_events if e.type == "start").data["cached"] is True
    assert len(cached.losses) == 5 and all(math.isfinite(loss) for loss in cached.losses)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)


def test_a_shared_cache_keeps_each_bucket_apart_and_serves_the_next_run(tiny_sdxl, mixed_data, tmp_path):
    # one epoch (4 single-bucket batches) reads every image
    options = dict(center_crop=True, cache_latents=True, cache_dir=str(tmp_path / "cache"), max_train_steps=4)
    first = train(bucket_config("sdxl", tiny_sdxl, mixed_data, tmp_path / "first", **options))
    events: list[Event] = []
    second = train(bucket_config("sdxl", tiny_sdxl, mixed_data, tmp_path / "second", **options), events.append)
    assert second.losses == pytest.approx(first.losses, rel=1e-6)
    prepare = next(e for e in events if e.type == "prepare")
    assert prepare.data["done"] == prepare.data["total"], "every entry came from the first run"
    segments = list((tmp_path / "cache").rglob("latent-*.bin"))
    assert {p.name for p in segments} >= {f"latent-{w}x{h}.bin" for _, (w, h) in MIXED}


def test_sdxl_time_ids_come_from_the_bucket_crop(tiny_sdxl, mixed_data, tmp_path):
    run = setup(bucket_config("sdxl", tiny_sdxl, mixed_data, tmp_path, random_flip=False, cache_latents=False))
    dataset = run.dataloader.dataset
    transform = dataset.transform
    items = []
    for index, example in enumerate(dataset.examples):
        image = load_rgb(example.path)
        fit = Buckets(64, 32, 128, 16).fit(image.size)
        state = torch.get_rng_state()
        item = transform(image)
        # independently: resize to cover the bucket, then RandomCrop's draws (rows, then columns)
        torch.set_rng_state(state)
        resized = image.resize(fit.resized, Image.Resampling.LANCZOS)
        (bucket_w, bucket_h), (width, height) = fit.bucket, fit.resized
        top = int(torch.randint(0, height - bucket_h + 1, size=(1,)))
        left = int(torch.randint(0, width - bucket_w + 1, size=(1,)))
        crop = resized.crop((left, top, left + bucket_w, top + bucket_h))
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255) * 2 - 1
        torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=1e-6)
        assert item["original_size"].tolist() == [image.height, image.width]
        assert item["crop_top_left"].tolist() == [top, left]
        assert item["target_size"].tolist() == [bucket_h, bucket_w]
        items.append(item)
    assert any(item["crop_top_left"].tolist() != [0, 0] for item in items), "some crop had slack"
    one = [item for item in items if item["target_size"].tolist() == [48, 80]]
    time_ids = SDXLFamily.time_ids(collate(one), 64, torch.float32)
    assert time_ids.tolist() == [[*i["original_size"].tolist(), *i["crop_top_left"].tolist(), 48, 80] for i in one]


@pytest.mark.parametrize("family", list(MODELS))
def test_resumed_bucketed_run_equals_an_uninterrupted_one(family, mixed_data, tmp_path, request):
    """Random crops and flips, 4 single-bucket batches an epoch: the checkpoint at step 3 is mid-epoch,
    the crash at step 4 and the end (step 6) in the next."""
    model = request.getfixturevalue(MODELS[family])
    common = dict(max_train_steps=6, checkpointing_steps=3, random_flip=True, cache_latents=False)
    assert_resume_matches(lambda out, **extra: bucket_config(family, model, mixed_data, out, **common, **extra),
                          tmp_path, crash_step=4, checkpoint_step=3)


def test_two_processes_train_bucketed_batches(tiny_model, mixed_data, tmp_path):
    """Each rank gets whole single-bucket batches (4 an epoch, 2 per rank): every step once, to the end."""
    out = tmp_path / "out"
    events = train_two_processes(tiny_model, mixed_data, out, "--random_flip", "--enable_bucket",
                                 "--bucket_reso_steps", "16", resolution=64)
    assert events[0]["type"] == "start" and sum(b["images"] for b in events[0]["data"]["buckets"]) == len(MIXED)
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["type"] == "done" and (out / "checkpoint-2").is_dir()


def test_validation_loss_is_measured_on_bucketed_held_out_images(tiny_sdxl, mixed_data, tmp_path):
    """Held-out images are transformed into their own buckets too (one at a time); the same
    weights give the same value."""
    config = bucket_config("sdxl", tiny_sdxl, mixed_data, tmp_path, validation_split=0.34, max_train_steps=2,
                           checkpointing_steps=1, cache_latents=False)
    result = train(config)
    assert sorted(result.validation_losses) == [1, 2]
    assert all(math.isfinite(value) for value in result.validation_losses.values())
    run = setup(config)
    assert run.validator.measure(run) == run.validator.measure(run)
    for index, example in enumerate(run.validator.examples):
        width, height = Buckets(64, 32, 128, 16).fit(example.size).bucket
        assert run.validator.dataset[index]["target_size"].tolist() == [height, width]


def test_resumed_cached_bucketed_run_equals_an_uninterrupted_one(tiny_sdxl, mixed_data, tmp_path):
    """The same with the latent cache on (fixed crops, flips drawn): the resumed run encodes what
    it needs again and still follows the uninterrupted run."""
    common = dict(max_train_steps=6, checkpointing_steps=3, random_flip=True, center_crop=True, cache_latents=True)
    assert_resume_matches(lambda out, **extra: bucket_config("sdxl", tiny_sdxl, mixed_data, out, **common, **extra),
                          tmp_path, crash_step=4, checkpoint_step=3)


def test_validation_images_take_the_shape_most_images_train_in(tiny_model, tmp_path):
    data = write_images(tmp_path / "wide", [(96, 64), (100, 50), (96, 60), (72, 72)])  # three 80x48, one 64x64
    config = bucket_config("sd", tiny_model, data, tmp_path / "run", max_train_steps=2, validation_prompt="a red circle",
                           num_validation_images=1, validation_steps=2, validation_inference_steps=1)
    result = train(config)
    assert len(result.validation_images) == 2  # at step 2 (in memory) and the final one (from the file)
    assert [Image.open(path).size for path in result.validation_images] == [(80, 48), (80, 48)]
