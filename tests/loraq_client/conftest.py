"""Helpers that run the real `loraq` command against the `service` fixture (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "resolution=32", "--set", "train_batch_size=2", "--set", "seed=0",
        "--set", "checkpointing_steps=100000"]


def cli_env(service=None, **extra: str) -> dict[str, str]:
    """The environment of a `loraq` run against `service` (its URL and admin key), or none."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}
    env.pop("LORAQ_API_KEY", None)
    if service is not None:
        env["LORAQ_URL"] = service.url
        env["LORAQ_API_KEY"] = service.api_key
    return env


def loraq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraq_client.cli", *args]


def run_loraq(service, *args: str, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(loraq_cmd(*args), env=cli_env(service), cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout)


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
