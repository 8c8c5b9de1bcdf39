"""Both LoRA files carry kohya's ss_* and the modelspec.* keys of the run that wrote them."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from trainer import metadata
from trainer.config import load_config
from trainer.loop import train
from trainer.model import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("family, architecture, version", [
    ("sd", "stable-diffusion-v1/lora", "sd_v1"),
    ("sdxl", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"),
])
def test_both_lora_files_carry_the_runs_metadata(request, tmp_path, sample_data, family, architecture, version):
    model = request.getfixturevalue("tiny_model" if family == "sd" else "tiny_sdxl")
    config = load_config({"pretrained_model_name_or_path": str(model), "train_data_dir": str(sample_data),
                          "output_dir": str(tmp_path / "out"), "resolution": 32, "max_train_steps": 4,
                          "train_batch_size": 2, "rank": 4, "lora_alpha": 8, "learning_rate": 3e-4,
                          "checkpointing_steps": 2, "seed": 0}, family)
    with metadata.recording(config) as recorder:
        train(config, recorder)

    expected_hash = metadata.tree_hash(model, lambda p: p.suffix in metadata.WEIGHT_SUFFIXES)
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        meta = header(tmp_path / "out" / name)
        assert meta["modelspec.architecture"] == architecture, name
        assert meta["modelspec.sai_model_spec"] == "1.0.0"
        assert meta["modelspec.resolution"] == "32x32" and meta["ss_resolution"] == "(32, 32)"
        assert meta["ss_base_model_version"] == version
        assert (meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("4", 8.0)
        assert meta["ss_sd_model_name"] == model.name
        assert meta["ss_new_sd_model_hash"] == expected_hash and len(expected_hash) == 64
        assert meta["ss_steps"] == "4" and meta["ss_max_train_steps"] == "4"
        assert meta["ss_num_epochs"] == "2"  # 4 images, batch 2: two steps an epoch
        assert float(meta["ss_learning_rate"]) == 3e-4 and meta["ss_optimizer"].startswith("torch.optim.AdamW")
        assert meta["ss_prediction_type"] == "epsilon" and meta["modelspec.prediction_type"] == "epsilon"
        assert meta["ss_dataset_hash"] == metadata.tree_hash(sample_data, lambda p: True)
        assert meta["ss_num_train_images"] == "4"
        tags = json.loads(meta["ss_tag_frequency"])["data"]
        assert sum(tags.values()) >= 4 and all(isinstance(n, int) for n in tags.values())
        assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
        assert meta["modelspec.trainer"].startswith("loraq-trainer")
    # diffusers' own header stays (the adapter's alpha), and the file still loads as the script's.
    assert "lora_adapter_metadata" in header(tmp_path / "out" / LORA_WEIGHTS_NAME)
    assert header(tmp_path / "out" / "checkpoint-2" / LORA_WEIGHTS_NAME)["ss_steps"] == "2"


def test_no_recording_writes_no_training_keys(tmp_path, sample_data, tiny_model):
    config = load_config({"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(sample_data),
                          "output_dir": str(tmp_path / "out"), "resolution": 32, "max_train_steps": 1,
                          "train_batch_size": 2})
    train(config)
    assert "ss_steps" not in header(tmp_path / "out" / LORA_WEIGHTS_NAME)
    assert header(tmp_path / "out" / KOHYA_WEIGHTS_NAME)["ss_network_module"] == "networks.lora"


@pytest.mark.parametrize("family, architecture, version", [
    ("flux", "flux-1-dev/lora", "flux1"),
    ("sd3", "stable-diffusion-v3-medium/lora", "sd3"),
])
def test_flow_matching_families_are_labelled_flow(tmp_path, sample_data, family, architecture, version):
    # A flow-matching LoRA must not claim a DDPM prediction type: loaders pick the sampler from it.
    config = load_config({"pretrained_model_name_or_path": str(tmp_path / "model"), "train_data_dir": str(sample_data),
                          "output_dir": str(tmp_path / "out"), "resolution": 32, "max_train_steps": 4}, family)
    meta = metadata.MetadataRecorder(config).build(tmp_path / "out")
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == version
    assert meta["ss_prediction_type"] == "flow" and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_v_parameterization"] == "False"
