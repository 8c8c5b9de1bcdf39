"""EMA of the LoRA weights: its own file beside the plain one, different from it, loadable, and
continued exactly on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from trainer.config import ConfigError, load_config
from trainer.ema import EMA_STATE_FILE, EMA_WEIGHTS_NAME, LoraEMA
from trainer.events import Event
from trainer.loop import train
from trainer.sample_data import write_sample_dataset


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("square") / "data", n_images=4, size=32)


def config_for(model: Path, data_dir: Path, output_dir: Path, **options):
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir), output_dir=str(output_dir),
        resolution=32, train_batch_size=2, seed=0, checkpointing_steps=2, max_train_steps=4,
        learning_rate=1e-2, lr_warmup_steps=0, use_ema=True, ema_decay=0.5,
    )
    return load_config({**values, **options})


def test_the_average_follows_the_formula():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA([weight], decay=0.75)
    with torch.no_grad():
        weight.fill_(4.0)
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1.0))  # 0.75 * 0 + 0.25 * 4
    with ema.applied():
        assert weight.tolist() == [1.0, 1.0, 1.0]
    assert weight.tolist() == [4.0, 4.0, 4.0]


def test_ema_weights_differ_from_the_plain_ones_and_load(tiny_model, square_data, tmp_path):
    events: list[Event] = []
    result = train(config_for(tiny_model, square_data, tmp_path), events.append)
    plain, averaged = load_file(str(result.lora_path)), load_file(str(tmp_path / EMA_WEIGHTS_NAME))
    assert plain.keys() == averaged.keys()
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)
    # The worker records the done event's files as the job's LoRA artifacts.
    assert str(tmp_path / EMA_WEIGHTS_NAME) in [e for e in events if e.type == "done"][0].paths
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert (tmp_path / checkpoint / EMA_WEIGHTS_NAME).is_file()
        assert (tmp_path / checkpoint / EMA_STATE_FILE).is_file()
    assert not list(tmp_path.glob(".ema-*"))  # the scratch folders are gone

    def image(weight_name: str | None):
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        if weight_name:
            pipeline.load_lora_weights(str(tmp_path), weight_name=weight_name)
        return pipeline("a photo", num_inference_steps=2, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images[0]

    base, with_plain, with_ema = image(None), image(result.lora_path.name), image(EMA_WEIGHTS_NAME)
    assert abs(with_ema - base).max() > 0 and abs(with_ema - with_plain).max() > 0


def test_resume_continues_the_average_exactly(tiny_model, square_data, tmp_path):
    full = train(config_for(tiny_model, square_data, tmp_path / "full"))

    class Crash(RuntimeError):
        pass

    def crash(event: Event) -> None:
        if event.type == "step" and event.step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train(config_for(tiny_model, square_data, tmp_path / "cut"), crash)
    train(config_for(tiny_model, square_data, tmp_path / "cut", resume_from_checkpoint="latest"))
    a = load_file(str(tmp_path / "full" / EMA_WEIGHTS_NAME))
    b = load_file(str(tmp_path / "cut" / EMA_WEIGHTS_NAME))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_default_run_keeps_no_average_and_decay_needs_use_ema(tiny_model, square_data, tmp_path):
    with pytest.raises(ConfigError, match="ema_decay: set use_ema"):
        config_for(tiny_model, square_data, tmp_path, use_ema=False)
    train(config_for(tiny_model, square_data, tmp_path, use_ema=False, ema_decay=0.999, max_train_steps=2))
    assert not (tmp_path / EMA_WEIGHTS_NAME).exists()


@pytest.mark.parametrize("family, fixture", [("sdxl", "tiny_sdxl_model"), ("flux", "tiny_flux_model"),
                                             ("sd3", "tiny_sd3_model")])
def test_other_families_save_the_average_beside_the_plain_file(family, fixture, square_data, tmp_path, request):
    model = request.getfixturevalue(fixture)
    extra = {} if family == "sdxl" else {"max_sequence_length": 16}
    result = train(config_for(model, square_data, tmp_path, family=family, max_train_steps=2,
                              checkpointing_steps=1000, **extra))
    plain, averaged = load_file(str(result.lora_path)), load_file(str(tmp_path / EMA_WEIGHTS_NAME))
    assert plain.keys() == averaged.keys()
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)
