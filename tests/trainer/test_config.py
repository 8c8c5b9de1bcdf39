"""TrainConfig: the diffusers script's defaults, and errors that name the bad option."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, TrainConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"pretrained_model_name_or_path": "model", "train_data_dir": "data"}

# train_text_to_image_lora.py's argparse defaults (mixed_precision: its "no" choice).
SCRIPT_DEFAULTS = {
    "resolution": 512,
    "train_batch_size": 16,
    "num_train_epochs": 100,
    "max_train_steps": None,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "rank": 4,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "num_validation_images": 4,
    "validation_epochs": 1,
    "validation_prompt": None,
    "image_column": "image",
    "caption_column": "text",
    "center_crop": False,
    "random_flip": False,
    "image_interpolation_mode": "lanczos",
    "dataloader_num_workers": 0,
    "snr_gamma": None,
    "noise_offset": 0.0,
    "prediction_type": None,
    "seed": None,
    "mixed_precision": "no",
    "output_dir": "sd-model-finetuned-lora",
    "resume_from_checkpoint": None,
    "gradient_checkpointing": False,
    "max_train_samples": None,
}


def test_defaults_are_the_diffusers_script_defaults():
    config = load_config(REQUIRED)
    actual = {name: getattr(config, name) for name in SCRIPT_DEFAULTS}
    assert actual == SCRIPT_DEFAULTS
    # Same types too: a default of 1 where 1e-4 belongs would still compare equal above.
    for name, value in SCRIPT_DEFAULTS.items():
        assert type(actual[name]) is type(value), name


def test_lora_alpha_defaults_to_rank():
    assert load_config(REQUIRED).effective_lora_alpha == 4.0
    assert load_config({**REQUIRED, "rank": 16}).effective_lora_alpha == 16.0
    assert load_config({**REQUIRED, "rank": 16, "lora_alpha": 8}).effective_lora_alpha == 8.0


def test_string_values_from_the_command_line_are_converted():
    config = load_config({**REQUIRED, "resolution": "32", "learning_rate": "1e-3", "center_crop": "true",
                          "seed": "0", "snr_gamma": "5.0"})
    assert (config.resolution, config.learning_rate, config.center_crop, config.seed, config.snr_gamma) == (
        32, 1e-3, True, 0, 5.0)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("resolution", 30, "multiple of 8"),
        ("resolution", 0, "multiple of 8"),
        ("resolution", -8, "multiple of 8"),
        ("resolution", "big", "integer"),
        ("rank", 0, "greater than or equal to 1"),
        ("learning_rate", 0, "greater than 0"),
        ("learning_rate", -1, "greater than 0"),
        ("prediction_type", "sample", "epsilon"),
        ("snr_gamma", 0, "greater than 0"),
        ("lr_scheduler", "bogus", "constant"),
        ("train_batch_size", 0, "greater than or equal to 1"),
        ("mixed_precision", "fp8", "bf16"),
        ("center_crop", "maybe", "boolean"),
    ],
)
def test_bad_value_names_the_field(field, value, expected):
    with pytest.raises(ConfigError) as raised:
        load_config({**REQUIRED, field: value})
    message = str(raised.value)
    assert message.startswith(f"{field}: "), message
    assert expected in message


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"^learning_rat: unknown option$"):
        load_config({**REQUIRED, "learning_rat": 1e-4})


def test_missing_required_option_is_named():
    with pytest.raises(ConfigError, match=r"^pretrained_model_name_or_path: is required$"):
        load_config({"train_data_dir": "data"})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        load_config({"train_data_dir": "data", "resolution": 30, "rank": 0})
    message = str(raised.value)
    for field in ("pretrained_model_name_or_path", "resolution", "rank"):
        assert f"{field}: " in message


def test_cross_field_error_reads_as_an_option_error():
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 needs a CUDA device"):
        load_config({**REQUIRED, "mixed_precision": "fp16", "device": "cpu"})


def test_assignment_is_validated_too():
    config = load_config(REQUIRED)
    with pytest.raises(ValueError, match="multiple of 8"):
        config.resolution = 30


def test_config_round_trips_through_json():
    config = load_config({**REQUIRED, "resolution": 32, "lora_alpha": 2, "seed": 7})
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config


def test_config_module_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = "import sys, trainer.config; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
