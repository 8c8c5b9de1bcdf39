"""The latent cache: as-you-go, up-front, spilled to disk and shared runs all train to the uncached
run's losses; a sweep encodes its dataset once; incomplete segments are never read; LRU eviction."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from trainer import latent_cache
from trainer.config import load_config
from trainer.events import Event
from trainer.latent_cache import LATENT, TEXT, LatentCache, Layout, evict
from trainer.loop import train
from trainer.sample_data import write_sample_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Six 40x40 images: at resolution 32 with center_crop every crop is fixed (cacheable)."""
    return write_sample_dataset(tmp_path_factory.mktemp("cache-data") / "data", n_images=6, size=40)


@pytest.fixture(scope="module")
def uncached(tiny_model, data_dir, tmp_path_factory):
    """The reference: the same runs without the cache, by step count."""
    out = tmp_path_factory.mktemp("uncached")
    return {steps: train(config(tiny_model, data_dir, out / str(steps), max_train_steps=steps, cache_latents=False)).losses
            for steps in (9,)}


def config(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
                  resolution=32, center_crop=True, random_flip=True, train_batch_size=2, seed=0,
                  checkpointing_steps=1000, max_train_steps=9)
    return load_config({**values, **options})


def run(model, data_dir, output_dir, **options) -> tuple[list[float], list[Event]]:
    events: list[Event] = []
    result = train(config(model, data_dir, output_dir, **options), events.append)
    return result.losses, events


def prepares(events: list[Event]) -> list[dict]:
    return [e.data for e in events if e.type == "prepare"]


def published(root: Path) -> list[dict]:
    """Each published segment's entry counts by kind."""
    return [{kind: len(entries) for kind, entries in json.loads((seg / "index.json").read_text())["entries"].items()}
            for seg in sorted(root.glob("v1/*/seg-*"))]


def same(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Training: the same losses whatever the cache holds


def test_as_you_go_cache_follows_the_uncached_run(tiny_model, data_dir, uncached, tmp_path):
    # 9 steps of 2 over 6 images: 3 epochs, so later epochs mix cached and fresh rows (the flip
    # chooses a new orientation for some images).
    losses, events = run(tiny_model, data_dir, tmp_path, cache_upfront=False)
    same(losses, uncached[9])
    assert [p["mode"] for p in prepares(events)] == ["as_you_go"]
    assert prepares(events)[0]["done"] == 0 and prepares(events)[0]["total"] == 6 * 2 + 6
    assert [e.type for e in events][:2] == ["start", "prepare"]


def test_up_front_pass_reports_progress_and_follows_the_uncached_run(tiny_model, data_dir, uncached, tmp_path):
    losses, events = run(tiny_model, data_dir, tmp_path, cache_upfront=True)
    same(losses, uncached[9])
    progress = prepares(events)
    assert all(p["mode"] == "upfront" for p in progress)
    assert progress[0]["done"] == 0 and progress[-1]["done"] == progress[-1]["total"] == 18
    assert [e.type for e in events].index("step") > [e.type for e in events].index("prepare")


def test_disk_spilled_cache_follows_the_uncached_run(tiny_model, data_dir, uncached, tmp_path):
    losses, _ = run(tiny_model, data_dir, tmp_path, cache_ram_mb=0, cache_upfront=False)  # nothing fits in RAM
    same(losses, uncached[9])
    assert not list(tmp_path.glob(".loraq-latents-*")), "the private spill file goes with the run"


def test_the_rule_chooses_up_front_only_for_many_uses_of_a_small_dataset():
    # 64 images, flips, 10 epochs: the pass is 128 of 640 images read.
    assert latent_cache.choose_upfront(64, 2, 640, missing=128)
    # 2,000 images, 20 steps of 4: the run reads 80, up front would encode 4,000.
    assert not latent_cache.choose_upfront(2000, 2, 80, missing=4000)
    # Many epochs, but a pass too long to wait for before the first step.
    assert not latent_cache.choose_upfront(10_000, 2, 10**6, missing=20_000)
    assert not latent_cache.choose_upfront(64, 2, 640, missing=0)  # all cached already


def test_a_sweep_sharing_a_cache_encodes_the_dataset_once(tiny_model, data_dir, tmp_path):
    """A 2x2 sweep (learning rate x rank) over one dataset: the first run encodes every image and
    caption as it goes; the other three find them all and encode nothing."""
    root = tmp_path / "cache"
    common = dict(random_flip=False, max_train_steps=6, cache_dir=str(root))  # 2 epochs
    plans = []
    for i, (lr, rank) in enumerate([(1e-4, 4), (1e-4, 8), (5e-4, 4), (5e-4, 8)]):
        losses, events = run(tiny_model, data_dir, tmp_path / f"job{i}", learning_rate=lr, rank=rank, **common)
        plans.append(prepares(events)[0])
        if i == 3:
            plain, _ = run(tiny_model, data_dir, tmp_path / "plain", learning_rate=lr, rank=rank,
                           **{**common, "cache_latents": False})
            same(losses, plain)
    assert published(root) == [{LATENT: 6, TEXT: 6}], "encoded once: one segment, each entry once"
    assert plans[0]["done"] == 0 and all(p["done"] == p["total"] == 12 for p in plans[1:])


def test_resume_with_a_partially_filled_shared_cache(tiny_model, data_dir, uncached, tmp_path):
    """A run crashes after its step-2 checkpoint having encoded 4 of 6 images; the resumed run
    reads those, encodes the rest, and ends where the uninterrupted uncached run does."""
    root = tmp_path / "cache"
    options = dict(cache_dir=str(root), checkpointing_steps=2, cache_upfront=False)

    class Crash(RuntimeError):
        pass

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == 3:
            raise Crash

    with pytest.raises(Crash):
        train(config(tiny_model, data_dir, tmp_path / "out", **options), crash)
    assert [counts[LATENT] for counts in published(root)] == [4], "published at the checkpoint, not after"
    assert not list(root.glob("v1/*/.tmp-*")), "the crashed run's later entries were dropped"

    losses, events = run(tiny_model, data_dir, tmp_path / "out", resume_from_checkpoint="latest", **options)
    same(losses, uncached[9][2:])
    assert prepares(events)[0]["done"] == 4 + 4  # 4 images and their 4 captions came from the cache


def test_an_edited_image_is_a_new_entry(tiny_model, data_dir, tmp_path):
    folder = write_sample_dataset(tmp_path / "data", n_images=2, size=32)
    root = tmp_path / "cache"
    common = dict(random_flip=False, max_train_steps=1, cache_dir=str(root), cache_upfront=True)
    _, first = run(tiny_model, folder, tmp_path / "a", **common)
    image = sorted(folder.glob("*.png"))[0]
    other = write_sample_dataset(tmp_path / "other", n_images=1, size=32, seed=1)
    image.write_bytes((other / "0000.png").read_bytes())  # an image neither run has seen
    _, second = run(tiny_model, folder, tmp_path / "b", **common)
    assert prepares(first)[-1]["total"] == 4 and prepares(second)[-1]["total"] == 1  # only that image again


def _stored_copy(source: Path, target: Path, change=None) -> Path:
    """`source`'s images saved as uncompressed PNGs (the byte length then depends only on the
    image's size), optionally changed by `change`, with the same captions."""
    target.mkdir(parents=True)
    for image in sorted(source.glob("*.png")):
        with Image.open(image) as opened:
            pixels = opened.convert("RGB")
        (change(pixels) if change else pixels).save(target / image.name, compress_level=0)
        (target / image.name).with_suffix(".txt").write_bytes(image.with_suffix(".txt").read_bytes())
    return target


def test_same_names_sizes_and_times_but_other_pixels_share_nothing(tiny_model, data_dir, tmp_path):
    """Two datasets whose files agree in name, byte length and modification time but not in
    pixels (as a `cp -a` copy edited in place, or an archive extracted with its timestamps): the
    second run encodes its own images, and trains to its own uncached losses."""
    first = _stored_copy(data_dir, tmp_path / "first")
    second = _stored_copy(data_dir, tmp_path / "second", ImageOps.invert)
    for a in sorted(first.iterdir()):
        b = second / a.name
        if a.suffix == ".png":
            assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
        os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
        assert b.stat().st_mtime_ns == a.stat().st_mtime_ns
    root = tmp_path / "cache"
    common = dict(random_flip=False, max_train_steps=3, cache_dir=str(root), cache_upfront=True)
    first_losses, _ = run(tiny_model, first, tmp_path / "a", **common)
    losses, events = run(tiny_model, second, tmp_path / "b", **common)
    uncached, _ = run(tiny_model, second, tmp_path / "plain", **{**common, "cache_latents": False})
    same(losses, uncached)
    assert losses != pytest.approx(first_losses, rel=1e-5, abs=1e-6), "the datasets train differently"
    assert prepares(events)[-1]["total"] == 6, "its six images were missing; the (same) captions were not"
    assert published(root) == [{LATENT: 6, TEXT: 6}, {LATENT: 6}]


def test_a_copy_with_new_times_elsewhere_reuses_the_entries(tiny_model, data_dir, tmp_path):
    """The same images uploaded again (another folder, new modification times): nothing is
    encoded, every entry comes from the first run's segment."""
    root = tmp_path / "cache"
    common = dict(random_flip=True, max_train_steps=6, cache_dir=str(root), cache_upfront=True)
    run(tiny_model, data_dir, tmp_path / "a", **common)
    copy = tmp_path / "upload" / "data"
    copy.mkdir(parents=True)
    later = time.time_ns() + 10**9
    for file in sorted(data_dir.iterdir()):
        (copy / file.name).write_bytes(file.read_bytes())
        os.utime(copy / file.name, ns=(later, later))
        assert (copy / file.name).stat().st_mtime_ns != file.stat().st_mtime_ns
    losses, events = run(tiny_model, copy, tmp_path / "b", **common)
    plain, _ = run(tiny_model, copy, tmp_path / "plain", **{**common, "cache_latents": False})
    same(losses, plain)
    assert prepares(events) == [{"done": 6 * 2 + 6, "total": 6 * 2 + 6, "mode": "as_you_go"}], "all found"
    assert published(root) == [{LATENT: 12, TEXT: 6}], "nothing new was encoded or published"


def test_image_keys_follow_content_and_read_each_file_once_per_run(tmp_path, monkeypatch):
    a, b, c = (tmp_path / name for name in ("a.png", "b.png", "c.png"))
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other byte")
    os.utime(c, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    reads = []
    digest = latent_cache.file_digest
    monkeypatch.setattr(latent_cache, "file_digest", lambda path: reads.append(path) or digest(path))
    memo: dict = {}
    keys = latent_cache.image_keys(tmp_path, [a, b, c, a], memo=memo)
    assert keys[0] == keys[1] == keys[3] != keys[2]
    assert latent_cache.image_keys(tmp_path, [a], memo=memo) == keys[:1]
    assert len(reads) == 3, "a path read once in a run, however often it is listed or asked for"


# --------------------------------------------------------------------------------------------
# The store: completeness, concurrent writers, eviction


def entry(value: float) -> dict[str, torch.Tensor]:
    return {"params": torch.full((8, 4, 4), value), "size": torch.tensor([value, value], dtype=torch.int64)}


def test_unpublished_or_incomplete_segments_are_never_read(tmp_path):
    writer = LatentCache(ram_bytes=0, root=tmp_path, key="k")
    writer.put(LATENT, "a", entry(1.0))
    assert LatentCache(ram_bytes=0, root=tmp_path, key="k").get(LATENT, "a") is None, "not published yet"
    writer.close(publish=False)
    assert not list(tmp_path.glob("v1/k/*")), "a dropped run leaves nothing"

    writer = LatentCache(ram_bytes=0, root=tmp_path, key="k")
    writer.put(LATENT, "a", entry(1.0))
    writer.close(publish=True)
    (segment,) = tmp_path.glob("v1/k/seg-*")
    got = LatentCache(ram_bytes=0, root=tmp_path, key="k").get(LATENT, "a")
    assert torch.equal(got["params"], entry(1.0)["params"]) and torch.equal(got["size"], entry(1.0)["size"])
    (segment / "COMPLETE").unlink()  # as if the writer died before finishing it
    assert LatentCache(ram_bytes=0, root=tmp_path, key="k").get(LATENT, "a") is None


def test_two_writers_of_one_key_do_not_corrupt_it_and_the_first_published_wins(tmp_path):
    first, second = (LatentCache(ram_bytes=1 << 20, root=tmp_path, key="k") for _ in range(2))
    first.put(LATENT, "shared", entry(1.0))
    second.put(LATENT, "shared", entry(2.0))
    second.put(LATENT, "only-second", entry(3.0))
    first.close(publish=True)
    second.close(publish=True)
    reader = LatentCache(ram_bytes=0, root=tmp_path, key="k")
    assert reader.get(LATENT, "shared")["params"][0, 0, 0] == 1.0
    assert reader.get(LATENT, "only-second")["params"][0, 0, 0] == 3.0


def test_ram_budget_spills_to_disk_and_reads_back(tmp_path):
    size = 8 * 4 * 4 * 4 + 2 * 8
    cache = LatentCache(ram_bytes=3 * size)
    for i in range(10):
        cache.put(LATENT, str(i), entry(float(i)))
    assert cache.ram_used == 3 * size
    assert all(cache.get(LATENT, str(i))["params"][0, 0, 0] == i for i in range(10))
    assert cache.stats.disk_hits == 7 and cache.ram_used == 3 * size, "reads do not grow RAM past the budget"
    cache.close(publish=False)


def test_layout_round_trips_every_dtype():
    tensors = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.arange(4), "c": torch.randn(5).half()}
    layout = Layout.of(tensors)
    back = layout.unpack(layout.pack(tensors))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout


def _segment(root: Path, key: str, name: str, nbytes: int, used: float) -> Path:
    path = root / "v1" / key / name
    path.mkdir(parents=True)
    (path / "latent.bin").write_bytes(b"\0" * nbytes)
    (path / "index.json").write_text(json.dumps({"layouts": {}, "entries": {}}))
    (path / "COMPLETE").write_text("")
    os.utime(path, (used, used))
    return path


def test_eviction_removes_least_recently_used_segments_and_dead_writers(tmp_path):
    now = time.time()
    old = _segment(tmp_path, "a", "seg-1", 1000, now - 300)
    middle = _segment(tmp_path, "b", "seg-2", 1000, now - 200)
    new = _segment(tmp_path, "a", "seg-3", 1000, now - 100)
    dead = tmp_path / "v1" / "a" / f".tmp-{os.uname().nodename}-999999999-abc"
    dead.mkdir()
    alive = tmp_path / "v1" / "a" / f".tmp-{os.uname().nodename}-{os.getpid()}-abc"
    alive.mkdir()
    removed = evict(tmp_path, max_bytes=2100)
    assert set(removed) == {old, dead}
    assert middle.exists() and new.exists() and alive.exists()
    # Loading a segment counts as using it: `middle` is now the newest, so `new` goes next.
    LatentCache(ram_bytes=0, root=tmp_path, key="b")
    assert evict(tmp_path, max_bytes=1500) == [new]
