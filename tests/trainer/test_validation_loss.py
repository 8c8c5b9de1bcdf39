"""Validation loss on held-out images: fixed draws (same weights, same value), the held-out share
never trains, the best checkpoint is the one with the lowest value; every family."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.events import Event
from trainer.loop import setup, train
from trainer.sample_data import write_sample_dataset
from trainer import validation_loss


@pytest.fixture(scope="module")
def six_images(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("six") / "data", n_images=6, size=32)


def config_for(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=2, max_train_steps=6,
        learning_rate=5e-3, lr_warmup_steps=0, validation_split=0.34, random_flip=True,
    )
    return load_config({**values, **options})


def test_same_weights_same_value_and_the_held_out_images_never_train(tiny_model, six_images, tmp_path):
    run = setup(config_for(tiny_model, six_images, tmp_path))
    assert run.num_examples == 4 and len(run.validator.examples) == 2
    trained = {e.path.name for e in run.dataloader.dataset.examples}
    assert not trained & {e.path.name for e in run.validator.examples}
    first, second = run.validator.measure(run), run.validator.measure(run)
    assert first == second and first > 0
    # Measuring leaves the training random state as it was.
    import torch

    state = torch.get_rng_state()
    run.validator.measure(run)
    assert torch.equal(state, torch.get_rng_state())


def test_values_stream_and_the_best_checkpoint_has_the_lowest(tiny_model, six_images, tmp_path):
    events: list[Event] = []
    result = train(config_for(tiny_model, six_images, tmp_path), events.append)
    measured = {e.step: e.validation_loss for e in events if e.type == "validation_loss"}
    assert sorted(measured) == [2, 4, 6] and measured == result.validation_losses
    assert len(set(measured.values())) == 3  # the weights changed, so did the value
    lowest = min(measured, key=measured.get)
    assert result.best_checkpoint == tmp_path / f"checkpoint-{lowest}"
    done = [e for e in events if e.type == "done"][0]
    assert done.data == {"best_checkpoint": f"checkpoint-{lowest}", "best_validation_loss": measured[lowest]}


def test_a_separate_folder_and_a_resumed_run_measure_the_same(tiny_model, six_images, tmp_path):
    held = write_sample_dataset(tmp_path / "held", n_images=2, size=32)
    options = dict(validation_split=None, validation_data_dir=str(held), random_flip=False)
    full = train(config_for(tiny_model, six_images, tmp_path / "full", **options))

    class Crash(RuntimeError):
        pass

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train(config_for(tiny_model, six_images, tmp_path / "cut", **options), crash)
    resumed = train(config_for(tiny_model, six_images, tmp_path / "cut", resume_from_checkpoint="latest", **options))
    assert resumed.validation_losses == pytest.approx({k: v for k, v in full.validation_losses.items() if k > 2},
                                                      rel=1e-6)


def test_split_is_seeded_and_refusals():
    examples = list(range(10))

    class Config:
        validation_split, seed = 0.2, 3

    train_part, held = validation_loss.split(Config, examples)
    assert len(held) == 2 and validation_loss.split(Config, examples) == (train_part, held)
    assert validation_loss.best_checkpoint({2: 0.5, 4: 0.3, 6: 0.3}, [2, 4, 6]) == 4
    assert validation_loss.best_checkpoint({2: 0.5, 4: 0.3}, [2]) == 2  # only kept checkpoints count
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
    with pytest.raises(ConfigError, match="validation_split: give either"):
        load_config({**base, "validation_split": 0.1, "validation_data_dir": "v"})
    with pytest.raises(ConfigError, match="validation_loss_steps: set validation_split"):
        load_config({**base, "validation_loss_steps": 5})


@pytest.mark.parametrize("family, fixture", [("sdxl", "tiny_sdxl_model"), ("flux", "tiny_flux_model"),
                                             ("sd3", "tiny_sd3_model")])
def test_every_family_measures_a_repeatable_value(family, fixture, six_images, tmp_path, request):
    extra = {} if family == "sdxl" else {"max_sequence_length": 16}
    run = setup(config_for(request.getfixturevalue(fixture), six_images, tmp_path, family=family, **extra))
    value = run.validator.measure(run)
    assert value > 0 and value == run.validator.measure(run)
