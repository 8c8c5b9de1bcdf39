"""Caption controls: trigger word, prefix/suffix, tag shuffle keeping keep_tokens, dropout; the
text-embedding cache is off exactly when captions vary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from trainer import captions
from trainer.captions import CaptionPolicy
from trainer.config import ConfigError, load_config
from trainer.events import Event
from trainer.loop import setup, train
from trainer.sample_data import write_sample_dataset


@pytest.fixture(scope="module")
def tagged_data(tmp_path_factory) -> Path:
    folder = write_sample_dataset(tmp_path_factory.mktemp("tagged") / "data", n_images=4, size=32)
    for index, path in enumerate(sorted(folder.glob("*.txt"))):
        path.write_text(f"{{trigger}} style, tag{index}a, tag{index}b, tag{index}c, tag{index}d")
    return folder


def config_for(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=2,
    )
    return load_config({**values, **options})


def test_tag_shuffle_keeps_the_first_keep_tokens_tags():
    policy = CaptionPolicy(shuffle_tags=True, keep_tokens=2)
    caption = "sks dog, photo, red, blue, green, yellow, big"
    random.seed(0)
    drawn = [policy.draw(caption).split(", ") for _ in range(200)]
    assert all(tags[:2] == ["sks dog", "photo"] for tags in drawn)
    assert all(sorted(tags) == sorted(caption.split(", ")) for tags in drawn)
    assert len({tuple(tags) for tags in drawn}) > 20  # the rest really is shuffled
    assert CaptionPolicy(shuffle_tags=True, keep_tokens=0).draw("a") == "a"


def test_dropout_empties_the_expected_share_over_a_seeded_run():
    policy = CaptionPolicy(dropout_rate=0.3)
    random.seed(1234)
    first = [policy.draw("a cat") for _ in range(4000)]
    random.seed(1234)
    again = [policy.draw("a cat") for _ in range(4000)]
    assert first == again
    share = first.count("") / len(first)
    assert abs(share - 0.3) < 0.03, share
    assert set(first) == {"", "a cat"}


def test_trigger_prefix_and_suffix():
    policy = CaptionPolicy(trigger_word="sks", prefix="photo of ", suffix=", 4k")
    assert policy.fixed("{trigger} dog on grass") == "photo of sks dog on grass, 4k"
    assert policy.fixed("a dog") == "photo of sks, a dog, 4k"
    assert CaptionPolicy(trigger_word="sks").fixed("") == "sks"
    # With shuffling the trigger and prefix still lead: they are added after the shuffle.
    random.seed(0)
    shuffled = CaptionPolicy(trigger_word="sks", shuffle_tags=True).draw("a, b, c, d")
    assert shuffled.startswith("sks, ") and sorted(shuffled.split(", ")[1:]) == ["a", "b", "c", "d"]


def test_text_cache_is_off_exactly_when_captions_vary(tiny_model, tagged_data, tmp_path):
    cases = {
        "plain": ({}, True),
        "fixed": ({"trigger_word": "sks", "caption_prefix": "a ", "caption_suffix": "!"}, True),
        "shuffle": ({"shuffle_tags": True, "keep_tokens": 1}, False),
        "dropout": ({"caption_dropout_rate": 0.2}, False),
    }
    for name, (options, text_cached) in cases.items():
        events: list[Event] = []
        config = config_for(tiny_model, tagged_data, tmp_path / name, cache_latents=True, **options)
        train(config, events.append)
        start = next(e for e in events if e.type == "start")
        assert start.data["cached"] is True, name  # latents stay cached either way
        assert start.data["text_cache"] is text_cached, name
        reason = start.data.get("text_cache_off_because")
        assert (reason is None) is text_cached, name
        if not text_cached:
            assert list(options)[0] in reason
    # The fixed controls are in the captions the run trains on (and caches).
    run = setup(config_for(tiny_model, tagged_data, tmp_path / "look", trigger_word="sks", cache_latents=True))
    assert all(e.caption.startswith("sks style, tag") for e in run.dataloader.dataset.examples)
    captions.activate(None)


def test_shuffled_run_is_reproducible_and_resumes_exactly(tiny_model, tagged_data, tmp_path):
    options = dict(shuffle_tags=True, keep_tokens=1, caption_dropout_rate=0.25, trigger_word="sks",
                   max_train_steps=4, checkpointing_steps=2)
    full = train(config_for(tiny_model, tagged_data, tmp_path / "full", **options))
    again = train(config_for(tiny_model, tagged_data, tmp_path / "again", **options))
    assert full.losses == again.losses
    plain = train(config_for(tiny_model, tagged_data, tmp_path / "plain", trigger_word="sks", max_train_steps=4))
    assert plain.losses != full.losses

    class Crash(RuntimeError):
        pass

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train(config_for(tiny_model, tagged_data, tmp_path / "cut", **options), crash)
    resumed = train(config_for(tiny_model, tagged_data, tmp_path / "cut", resume_from_checkpoint="latest", **options))
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6)


def test_keep_tokens_needs_shuffle_tags():
    with pytest.raises(ConfigError, match="keep_tokens: set shuffle_tags"):
        load_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "keep_tokens": 2})


@pytest.mark.parametrize("family, fixture", [("sdxl", "tiny_sdxl_model"), ("flux", "tiny_flux_model"),
                                             ("sd3", "tiny_sd3_model")])
def test_every_family_trains_with_varying_captions(family, fixture, tagged_data, tmp_path, request):
    extra = {} if family == "sdxl" else {"max_sequence_length": 16}
    events: list[Event] = []
    result = train(config_for(request.getfixturevalue(fixture), tagged_data, tmp_path, family=family,
                              shuffle_tags=True, caption_dropout_rate=0.5, trigger_word="sks", **extra), events.append)
    assert len(result.losses) == 2
    start = next(e for e in events if e.type == "start")
    assert start.data["text_cache"] is False
