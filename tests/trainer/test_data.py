"""Training data: finding captioned images in folders and zips, decoding them, transforms, batch order."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from trainer.sample_data import write_sample_dataset
from trainer.data import (
    DatasetError,
    EpochBatchSampler,
    ImageTransform,
    ResumePoint,
    dataset_folder,
    load_rgb,
    probe_image,
    scan_examples,
    tokenize,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(image: Image.Image, path: Path, caption: str | None = "a caption", **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def write_metadata(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def captions_by_name(examples) -> dict[str, str]:
    return {e.path.name: e.caption for e in examples}


def scan_error(folder: Path, **options) -> str:
    with pytest.raises(DatasetError) as raised:
        scan_examples(folder, **options)
    return str(raised.value)


# --------------------------------------------------------------------------------------------
# Finding examples and their captions


def test_sidecar_txt_captions(sample_data):
    examples = scan_examples(sample_data)
    assert [e.path.name for e in examples] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for example in examples:
        assert example.caption == example.path.with_suffix(".txt").read_text()
        assert example.size == (40, 40)


def test_sidecar_caption_is_stripped_and_subfolders_are_scanned(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "sub" / "a.png", caption="  a cat\n")
    assert captions_by_name(scan_examples(tmp_path)) == {"a.png": "a cat"}


def test_metadata_jsonl_captions(tmp_path):
    for name in ("a.png", "b.png"):
        save(Image.new("RGB", (8, 8)), tmp_path / name, caption=None)
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "first"}, {"file_name": "./b.png", "text": "second"}])
    assert captions_by_name(scan_examples(tmp_path)) == {"a.png": "first", "b.png": "second"}


def test_metadata_jsonl_custom_caption_column_and_caption_lists(tmp_path):
    for name in ("a.png", "b.png"):
        save(Image.new("RGB", (8, 8)), tmp_path / name, caption=None)
    write_metadata(tmp_path, [
        {"file_name": "a.png", "text": "not this", "prompt": "a dog"},
        {"file_name": "b.png", "prompt": ["one", "two"]},
    ])
    assert captions_by_name(scan_examples(tmp_path, caption_column="prompt")) == {
        "a.png": "a dog", "b.png": ("one", "two")}
    assert "'text'" in scan_error(tmp_path)  # row 2 has no "text" column


def test_metadata_naming_a_missing_image_is_an_error(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "a.png", caption=None)
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"}])
    message = scan_error(tmp_path)
    assert "gone.png" in message and "a.png" not in message


@pytest.mark.parametrize("prefix", ["", "my-set/"], ids=["flat", "one-top-folder"])
@pytest.mark.parametrize("captions", ["txt", "jsonl"])
def test_zip_of_a_dataset(tmp_path, prefix, captions):
    folder = write_sample_dataset(tmp_path / "src", n_images=3, size=16, caption_style=captions)
    expected = captions_by_name(scan_examples(folder))
    archive = zip_folder(folder, tmp_path / "data.zip", prefix)
    with dataset_folder(str(archive)) as extracted:
        assert extracted != folder
        examples = scan_examples(extracted)
        assert captions_by_name(examples) == expected
        assert all(e.path.is_file() for e in examples)
    assert not extracted.exists(), "the extraction is removed afterwards"


def test_dataset_folder_passes_a_folder_through(sample_data):
    with dataset_folder(sample_data) as folder:
        assert folder == sample_data


@pytest.mark.parametrize("entry", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_zip_entry_outside_the_archive_is_refused(tmp_path, entry):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "fine")
        zf.writestr(zipfile.ZipInfo(entry), "evil")
    with pytest.raises(DatasetError, match="outside the archive"):
        with dataset_folder(archive):
            pass
    assert not (tmp_path / "evil.txt").exists()


def test_missing_or_non_zip_data_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        with dataset_folder(tmp_path / "nope"):
            pass
    (tmp_path / "data.tar").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="neither a folder nor a zip"):
        with dataset_folder(tmp_path / "data.tar"):
            pass


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("only text here")
    assert "no images" in scan_error(tmp_path)


def test_image_without_caption(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "captioned.png")
    save(Image.new("RGB", (8, 8)), tmp_path / "bare.png", caption=None)
    message = scan_error(tmp_path)
    assert "bare.png" in message and "captioned.png" not in message
    examples = scan_examples(tmp_path, missing_captions="empty")
    assert captions_by_name(examples) == {"bare.png": "", "captioned.png": "a caption"}


def test_corrupt_and_non_image_files_are_named(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "good.png")
    (tmp_path / "random.png").write_bytes(b"definitely not a png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.png", format="GIF")  # a GIF named .png
    message = scan_error(tmp_path)
    for name in ("random.png", "truncated.png", "notes.pdf", "anim.png"):
        assert name in message
    assert "good.png" not in message
    assert message.startswith("4 problem(s)")


def test_hidden_files_and_folders_are_skipped(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._a.png").write_bytes(b"resource fork")
    assert [e.path.name for e in scan_examples(tmp_path)] == ["a.png"]


# --------------------------------------------------------------------------------------------
# Decoding images of every kind


def test_rgba_transparency_becomes_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    rgb = load_rgb(save(image, tmp_path / "a.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == BLUE
    assert rgb.getpixel((5, 5)) == (255, 255, 255)


def test_greyscale_palette_and_palette_transparency(tmp_path):
    grey = load_rgb(save(Image.new("L", (8, 8), 100), tmp_path / "l.png"))
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (100, 100, 100)

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    rgb = load_rgb(save(palette, tmp_path / "p.png"))
    assert rgb.getpixel((3, 3)) == (10, 20, 30) and rgb.getpixel((0, 0)) == (0, 0, 0)
    rgb = load_rgb(save(palette, tmp_path / "pt.png", transparency=0))
    assert rgb.getpixel((3, 3)) == (10, 20, 30) and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 1000, dtype=np.uint16)
    array[0, 0] = 4000
    path = save(Image.fromarray(array), tmp_path / "deep.png")
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    assert probe_image(path) == (8, 8)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    dark = rgb.getpixel((4, 4))
    assert dark[0] == dark[1] == dark[2] and 50 < dark[0] < 80  # 1000/4000 of full scale


def test_webp(tmp_path):
    path = save(Image.new("RGB", (20, 10), (0, 128, 255)), tmp_path / "a.webp", lossless=True)
    assert probe_image(path) == (20, 10)
    assert load_rgb(path).getpixel((3, 3)) == (0, 128, 255)
    assert [e.size for e in scan_examples(tmp_path)] == [(20, 10)]


def test_jpeg_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    path = save(image, tmp_path / "photo.jpg", exif=exif, quality=95)
    assert probe_image(path) == (20, 40)
    assert [e.size for e in scan_examples(tmp_path)] == [(20, 40)]
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[2] > 200 and top[0] < 50, "the left (blue) half is on top once turned clockwise"
    assert bottom[0] > 200 and bottom[2] < 50


# --------------------------------------------------------------------------------------------
# Transforms


def test_transform_output_shape_and_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 48, 3), dtype=np.uint8))
    for transform in (ImageTransform(16), ImageTransform(16, center_crop=True, random_flip=True)):
        pixels = transform(image)
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        assert pixels.min() < -0.5 and pixels.max() > 0.5


def test_resized_size_scales_the_short_side_as_torchvision():
    transform = ImageTransform(32)
    assert transform.resized_size((64, 32)) == (64, 32)
    assert transform.resized_size((32, 64)) == (32, 64)
    assert transform.resized_size((100, 40)) == (80, 32)  # int(32 * 100 / 40)
    assert transform.resized_size((10, 10)) == (32, 32)
    assert transform.crop_is_fixed((64, 64)) and not transform.crop_is_fixed((64, 32))
    assert ImageTransform(32, center_crop=True).crop_is_fixed((64, 32))


def _draws_random_numbers(transform: ImageTransform, image: Image.Image) -> bool:
    before = torch.get_rng_state()
    transform(image)
    return not torch.equal(before, torch.get_rng_state())


def test_random_numbers_are_drawn_only_for_slack_and_flips():
    square, wide = Image.new("RGB", (32, 32)), Image.new("RGB", (64, 32))
    assert not _draws_random_numbers(ImageTransform(32), square)
    assert _draws_random_numbers(ImageTransform(32), wide)
    assert not _draws_random_numbers(ImageTransform(32, center_crop=True), wide)
    assert _draws_random_numbers(ImageTransform(32, random_flip=True), square)
    # An explicit flip decision draws nothing.
    before = torch.get_rng_state()
    ImageTransform(32, random_flip=True)(square, flip=True)
    assert torch.equal(before, torch.get_rng_state())


def test_random_crop_follows_torchvision_draws():
    # RandomCrop.get_params draws the row offset, then the column offset.
    image = Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint32).reshape(40, 48, 3).astype(np.uint8))
    transform = ImageTransform(40)
    torch.manual_seed(5)
    pixels = transform(image)
    torch.manual_seed(5)
    top = int(torch.randint(0, 1, size=(1,)).item())
    left = int(torch.randint(0, 48 - 40 + 1, size=(1,)).item())
    expected = np.asarray(image)[top:top + 40, left:left + 40]
    assert torch.equal(pixels, (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)


def test_flip_mirrors_the_image():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    transform = ImageTransform(32, center_crop=True, random_flip=True)
    plain, flipped = transform(image, flip=False), transform(image, flip=True)
    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain.flip(-1))


def test_center_crop_takes_the_middle():
    array = np.zeros((32, 48, 3), dtype=np.uint8)
    array[:, 8:40] = 255
    pixels = ImageTransform(32, center_crop=True)(Image.fromarray(array))
    assert torch.equal(pixels, torch.ones(3, 32, 32))


def test_pure_colour_maps_to_normalised_value():
    colour = (255, 0, 128)
    pixels = ImageTransform(16)(Image.new("RGB", (16, 16), colour))
    for channel, value in enumerate(colour):
        expected = (value / 255 - 0.5) / 0.5
        assert torch.allclose(pixels[channel], torch.full((16, 16), expected), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Batch order and tokens


def test_same_seed_same_batches_and_every_index_once_per_epoch():
    def epochs(seed, count=2):
        torch.manual_seed(seed)
        sampler = EpochBatchSampler(10, 3)
        return [list(sampler) for _ in range(count)]

    first = epochs(0)
    assert first == epochs(0)
    assert first != epochs(1)
    assert first[0] != first[1], "each epoch has its own order"
    for batches in first:
        assert len(batches) == 4 and [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(i for batch in batches for i in batch) == list(range(10))


def test_order_matches_a_shuffling_dataloader():
    torch.manual_seed(3)
    ours = [i for batch in EpochBatchSampler(10, 4) for i in batch]
    torch.manual_seed(3)
    theirs = list(torch.utils.data.RandomSampler(range(10)))
    assert ours == theirs


def test_resume_point_yields_the_rest_of_the_epoch():
    torch.manual_seed(0)
    sampler = EpochBatchSampler(11, 2)
    full = list(sampler)
    seed = sampler.epoch_seed

    torch.manual_seed(123)
    resumed = EpochBatchSampler(11, 2)
    resumed.resume_point = ResumePoint(seed, position=2, rng_before=None, rng_after=None)
    rng = torch.get_rng_state()
    assert list(resumed) == full[2:]
    assert torch.equal(rng, torch.get_rng_state()), "resuming draws no new epoch seed"
    assert resumed.resume_point is None
    # The next epoch starts afresh, with a new seed.
    assert sorted(i for batch in resumed for i in batch) == list(range(11))
    assert resumed.epoch_seed != seed


def test_tokenize_pads_to_77(tiny_model):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer", local_files_only=True)
    ids = tokenize(tokenizer, ["a red circle", "", "word " * 200])
    assert ids.shape == (3, 77)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert (ids == tokenizer.eos_token_id).any(dim=1).all()
    assert not torch.equal(ids[0], ids[1])


# --------------------------------------------------------------------------------------------
# The caching dataset and mixed batches


def test_caching_dataset_draws_the_flip_where_the_transform_does(tiny_model, sample_data):
    from trainer.data import CachingDataset, collate
    from trainer.latent_cache import LATENT, TEXT, LatentCache, image_keys, latent_key, text_key

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer", local_files_only=True)
    examples = scan_examples(sample_data)
    transform = ImageTransform(32, center_crop=True, random_flip=True)
    cache = LatentCache(ram_bytes=1 << 20)
    keys = image_keys(sample_data, [e.path for e in examples])
    texts = [text_key(e.caption) for e in examples]
    dataset = CachingDataset(examples, transform, lambda captions: {"input_ids": tokenize(tokenizer, captions)},
                             cache, keys, texts)

    torch.manual_seed(7)
    expected = transform(load_rgb(examples[0].path))  # draws the flip
    after_transform = torch.get_rng_state()
    torch.manual_seed(7)
    item = dataset[0]
    assert torch.equal(torch.get_rng_state(), after_transform), "the same draws as the uncached transform"
    assert torch.equal(item["pixel_values"], expected) and "latent_params" not in item
    assert torch.equal(item["input_ids"], tokenize(tokenizer, [examples[0].caption])[0])

    # Cached: the same draw chooses the orientation, and no pixels or tokens are made.
    flip = bool(item["flip"])
    cache.put(LATENT, latent_key(keys[0], flip), {"params": torch.full((8, 4, 4), 3.0)})
    cache.put(TEXT, texts[0], {"encoder_hidden_states": torch.ones(77, 32)})
    torch.manual_seed(7)
    cached = dataset[0]
    assert torch.equal(torch.get_rng_state(), after_transform)
    assert set(cached) == {"index", "flip", "latent_params", "encoder_hidden_states"}
    assert bool(cached["flip"]) == flip and cached["latent_params"][0, 0, 0] == 3.0

    # A batch of cached and uncached items: each key stacked over the items that have it.
    batch = collate([cached, dataset[1], dataset[2]])
    assert batch["latent_params"].shape == (1, 8, 4, 4) and batch["latent_params_rows"].tolist() == [0]
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values_rows"].tolist() == [1, 2]
    assert batch["index"].tolist() == [0, 1, 2] and "index_rows" not in batch
