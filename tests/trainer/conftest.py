"""Fixtures shared by the trainer tests: the tiny model (written once) and a small image folder."""

import os
from pathlib import Path

import pytest

# Never reach for the model hub: every model a test uses is written locally. Set before any test
# module imports huggingface_hub, which reads it once at import.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _hub_offline():
    """Keep the hub offline for the whole session, even if something in between unset it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@pytest.fixture
def sample_data(tmp_path) -> Path:
    """Four 40x40 captioned PNGs with sidecar .txt captions, in tmp_path/"data"."""
    from trainer.sample_data import write_sample_dataset

    return write_sample_dataset(tmp_path / "data", n_images=4, size=40)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline (32 px default), written once per session; treat it as read-only."""
    from trainer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), family="sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_v(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline predicting v (velocity)."""
    from trainer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-sdxl-v"), prediction_type="v_prediction", family="sdxl")
