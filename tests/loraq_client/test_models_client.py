"""`loraq models` and the client's models: each with its family; admins add and remove base models."""

from __future__ import annotations

import json
import shutil

import pytest

from loraq_client import Client
from loraq_client.client import LoraqError
from support.models import pipeline_folder
from trainer.sample_data import write_sample_dataset


@pytest.fixture
def service(settings, start_service, tiny_sdxl_model):
    """The API and one worker, with the demo model tiny-sdxl generated beside tiny-sd."""
    shutil.copytree(tiny_sdxl_model, settings.demo_dir("tiny-sdxl"))
    return start_service(settings)


@pytest.mark.parametrize("backend", ["sqlite"])  # the client's side; the API is tested on both databases
def test_loraq_models_shows_each_family(loraq):
    table = loraq.run("models")
    listed = {m["name"]: m for m in json.loads(loraq.run("models", "--json").stdout)}

    assert table.returncode == 0, table.stderr
    cells = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in table.stdout.splitlines()
             if line.startswith("│")]
    rows = {row[0]: row[1:] for row in cells}  # name -> family, source, available
    assert rows["tiny-sd"][0] == "sd" and rows["tiny-sdxl"][0] == "sdxl"
    assert rows["tiny-sdxl"][-1] == "yes"
    assert (listed["tiny-sdxl"]["family"], listed["tiny-sdxl"]["kind"]) == ("sdxl", "folder")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_client_models_add_and_remove(service, tmp_path):
    folder = pipeline_folder(tmp_path / "xl-finetune", "StableDiffusionXLPipeline")
    random_file = tmp_path / "random.safetensors"
    random_file.write_bytes(b"\x07" * 4096)

    with Client(service.url, service.api_key) as client:
        families = {m.name: m.family for m in client.models()}
        added = client.add_model(str(folder), name="xl")
        with pytest.raises(LoraqError) as refused:
            client.add_model(str(random_file))
        listed = {m.name: m for m in client.models()}
        client.remove_model("xl")
        after = {m.name for m in client.models()}
        dataset = client.upload_dataset(write_sample_dataset(tmp_path / "data", n_images=2, size=32))
        job = client.create_job(dataset.id, "tiny-sdxl", {"resolution": 32, "max_train_steps": 1})
        client.cancel(job.id)

    # tiny-flux and tiny-sd3 are not generated here: listed, with no family read from files
    assert families == {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-flux": None, "tiny-sd3": None}
    assert (added.name, added.family, added.origin) == ("xl", "sdxl", "added")
    assert refused.value.status == 422 and "not a safetensors file" in refused.value.message
    assert listed["xl"].family == "sdxl" and listed["xl"].problem is None
    assert "xl" not in after
    assert job.family == "sdxl" and job.config["resolution"] == 32
