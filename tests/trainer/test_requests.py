"""Save now / sample now: requests served at the next step boundary, without changing the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import control
from trainer.config import load_config
from trainer.events import Event
from trainer.loop import train
from trainer.sample_data import write_sample_dataset


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


def config_for(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=4,
        validation_prompt="a photo", num_validation_images=1, validation_inference_steps=2,
        validation_epochs=1000,
    )
    return load_config({**values, **options})


def test_requests_are_served_at_the_next_step_and_change_nothing(tiny_model, square_data, tmp_path):
    plain = train(config_for(tiny_model, square_data, tmp_path / "plain"))

    out = tmp_path / "asked"
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if event.type == "step" and event.step == 2:  # asked during step 2's event: served at its boundary
            control.request(out, "checkpoint")
            control.request(out, "sample")

    asked = train(config_for(tiny_model, square_data, out), on_event)

    checkpoints = [e for e in events if e.type == "checkpoint"]
    samples = [e for e in events if e.type == "validation" and "now-" in Path(e.paths[0]).name]
    assert [(e.step, e.data) for e in checkpoints] == [(2, {"requested": True})]
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert [e.step for e in samples] == [2] and all(Path(p).is_file() for p in samples[0].paths)
    assert "now-step-000002" in Path(samples[0].paths[0]).name
    assert not list(out.glob(".request-*"))  # taken
    # Serving them draws no training random numbers: the losses are the plain run's.
    assert asked.losses == plain.losses


def test_unknown_request_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown request"):
        control.request(tmp_path, "stop")
