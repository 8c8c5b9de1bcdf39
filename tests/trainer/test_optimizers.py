"""Optimizers and schedules: each optimizer trains and resumes exactly; their options are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import ConfigError, load_config
from trainer.events import Event
from trainer.loop import setup, train
from trainer.sample_data import write_sample_dataset

OPTIMIZER_OPTIONS = {
    "adamw": {"learning_rate": 1e-3},
    "prodigy": {"learning_rate": 1.0, "prodigy_d_coef": 0.5},
    "adafactor": {"learning_rate": 1e-3, "adafactor_beta1": 0.9},
}


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


def config_for(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=1000, max_train_steps=4,
        lr_warmup_steps=0,
    )
    return load_config({**values, **options})


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_OPTIONS))
def test_optimizer_trains_and_resumes_exactly(optimizer, tiny_model, square_data, tmp_path):
    options = dict(optimizer=optimizer, max_train_steps=4, checkpointing_steps=2,
                   lr_scheduler="cosine_with_restarts", lr_num_cycles=2, **OPTIMIZER_OPTIONS[optimizer])
    full = train(config_for(tiny_model, square_data, tmp_path / "full", **options))
    assert len(full.losses) == 4

    class Crash(RuntimeError):
        pass

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train(config_for(tiny_model, square_data, tmp_path / "cut", **options), crash)
    resumed = train(config_for(tiny_model, square_data, tmp_path / "cut", resume_from_checkpoint="latest", **options))

    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
    # The weights moved away from LoRA's zero-initialised up matrices: the optimizer stepped.
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


def test_optimizers_differ_and_the_optimizer_is_the_one_named(tiny_model, square_data, tmp_path):
    runs = {name: setup(config_for(tiny_model, square_data, tmp_path / name, optimizer=name, **opts))
            for name, opts in OPTIMIZER_OPTIONS.items()}
    kinds = {name: type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__ for name, run in runs.items()}
    assert kinds == {"adamw": "AdamW", "prodigy": "Prodigy", "adafactor": "Adafactor"}
    assert runs["prodigy"].optimizer.param_groups[0]["d_coef"] == 0.5


def test_flow_family_trains_with_prodigy(tiny_flux_model, square_data, tmp_path):
    result = train(load_config(dict(
        family="flux", pretrained_model_name_or_path=str(tiny_flux_model), train_data_dir=str(square_data),
        output_dir=str(tmp_path), resolution=32, train_batch_size=2, seed=0, max_train_steps=2,
        max_sequence_length=16, optimizer="prodigy", learning_rate=1.0)))
    assert len(result.losses) == 2 and result.lora_path.is_file()


@pytest.mark.parametrize("options, named", [
    ({"optimizer": "adamw", "prodigy_beta3": 0.9}, "prodigy_beta3: an option of the prodigy optimizer"),
    ({"optimizer": "prodigy", "adafactor_beta1": 0.9}, "adafactor_beta1: an option of the adafactor optimizer"),
    ({"optimizer": "adafactor", "adam_beta2": 0.99}, "adam_beta2: an option of the adamw / adamw8bit / prodigy"),
    ({"lr_scheduler": "cosine", "lr_num_cycles": 3}, "lr_num_cycles: an option of lr_scheduler cosine_with_restarts"),
    ({"lr_scheduler": "linear", "lr_power": 2.0}, "lr_power: an option of lr_scheduler polynomial"),
    ({"optimizer": "adamw8bit", "device": "cpu"}, "optimizer: adamw8bit needs a CUDA device"),
    ({"optimizer": "lion"}, "optimizer:"),
])
def test_options_of_another_optimizer_or_schedule_are_refused_by_name(options, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        load_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d", **options})


def test_a_dumped_config_round_trips(tmp_path):
    config = load_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "optimizer": "adafactor"})
    assert load_config(config.model_dump(mode="json")).optimizer == "adafactor"


def test_adamw8bit_refused_off_cuda_naming_the_option(tiny_model, square_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="optimizer: adamw8bit needs a CUDA device"):
        setup(config_for(tiny_model, square_data, tmp_path, optimizer="adamw8bit"))


def test_polynomial_power_shapes_the_schedule(tiny_model, square_data, tmp_path):
    def lrs(power):
        run = setup(config_for(tiny_model, square_data, tmp_path / str(power), lr_scheduler="polynomial",
                               lr_power=power, max_train_steps=4))
        values = []
        for _ in range(3):
            run.optimizer.step()
            run.lr_scheduler.step()
            values.append(run.lr_scheduler.get_last_lr()[0])
        return values

    linear, squared = lrs(1.0), lrs(2.0)
    assert linear != squared and squared[0] < linear[0]
