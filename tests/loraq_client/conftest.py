"""Helpers that run the real `loraq` command against the `service` fixture (tests/conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace
from pathlib import Path

import pytest

from support.cli import ROOT, cli_env, loraq_cmd, run_loraq
TINY = ["--set", "resolution=32", "--set", "train_batch_size=2", "--set", "seed=0",
        "--set", "checkpointing_steps=100000"]


@pytest.fixture
def dataset_folder(tmp_path) -> Path:
    from trainer.sample_data import write_sample_dataset

    return write_sample_dataset(tmp_path / "data", n_images=4, size=32)


@pytest.fixture
def batch_spec(dataset_folder, tmp_path):
    """write(name, body) -> a batch YAML file on tiny-sd beside a copy of the photos (`dataset: ./photos`)."""
    folder = tmp_path / "batch"
    shutil.copytree(dataset_folder, folder / "photos")

    def write(name: str, body: str) -> Path:
        spec = folder / name
        spec.write_text("base_model: tiny-sd\ndataset: ./photos\n" + body)
        return spec

    return write


@pytest.fixture
def loraq(service):
    """Run the real `loraq` command against the test's service: run(*args), popen(*args), ..."""

    def popen(*args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(loraq_cmd(*args), env=cli_env(service), cwd=kwargs.pop("cwd", ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    return SimpleNamespace(run=lambda *args, **kw: run_loraq(service, *args, **kw), popen=popen,
                           env=cli_env(service), TINY=TINY, ROOT=ROOT, url=service.url)
