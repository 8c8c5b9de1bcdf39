"""A job whose dataset and artifacts live in an S3-protocol store (moto's standalone server),
with a worker that shares no directory with the API: it gets its own LORAQ_DATA_DIR, pulls the
dataset from the store and pushes what it writes; the API serves downloads from the store."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest

from support.s3 import keys, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from support.service import API_FLAGS, ROOT, dataset_zip, free_port, launch, shut_down, stop, submit, upload


@contextmanager
def another_api(service, logs, **env):
    """One more API process on the same database and store, with `env` changed; its client."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                                "127.0.0.1", "--port", str(port), *API_FLAGS], cwd=ROOT, env={**service.env, **env},
                               stdout=open(logs / f"api-{port}.log", "wb"), stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=dict(service.client.headers), timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/livez").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the extra API did not start"
            time.sleep(0.3)
        yield client
    finally:
        client.close()
        stop(process)

# One database is enough: the store is what is under test (PostgreSQL, so the worker's data
# directory holds no database file either).
pytestmark = pytest.mark.parametrize("backend", ["postgresql"])


def test_job_on_object_store_without_shared_directory(settings, tmp_path, tiny_model, s3_bucket, monkeypatch):
    endpoint, bucket, client = s3_bucket
    monkeypatch.setenv("LORAQ_STORAGE_URL", f"s3://{bucket}/loraq")
    monkeypatch.setenv("LORAQ_S3_ENDPOINT_URL", endpoint)
    worker_dir = tmp_path / "worker-var"
    (worker_dir / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, worker_dir / "models" / "tiny-sd")  # base models are no store matter
    service = launch(settings, tmp_path / "logs", worker_env={"LORAQ_DATA_DIR": str(worker_dir)})
    try:
        dataset_id = upload(service, tmp_path)
        stored = keys(client, bucket, f"loraq/datasets/{dataset_id}/")
        assert f"loraq/datasets/{dataset_id}/metadata.jsonl" in stored or \
            any(key.endswith(".txt") for key in stored), stored
        assert sum(key.endswith(".png") for key in stored) >= 4  # the images and thumbnails
        # The same content again is the same dataset (dedupe asks the store), nothing stored twice.
        again = service.client.post("/v1/datasets", files={"files": ("pets.zip", dataset_zip(tmp_path),
                                                                     "application/zip")})
        assert again.status_code == 200 and again.json()["id"] == dataset_id and again.json()["reused"]
        assert {key.split("/")[2] for key in keys(client, bucket, "loraq/datasets/")} == {dataset_id}
        # An API host without the local copy reads a thumbnail from the store.
        shutil.rmtree(settings.data_dir / "datasets" / dataset_id)
        thumbnail = service.client.get(f"/v1/datasets/{dataset_id}/thumbnails/0")
        assert thumbnail.status_code == 200 and thumbnail.content[:4] == b"\x89PNG"

        job = submit(service, dataset_id, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2)
        finished = service.wait_for(job["id"], {"succeeded", "failed", "canceled"}, timeout=300)
        assert finished["state"] == "succeeded", service.tail()

        # The worker read its own copy and wrote only under its own data directory.
        assert (worker_dir / "datasets" / dataset_id).is_dir()
        assert not (settings.data_dir / "jobs" / job["id"]).exists()
        job_keys = keys(client, bucket, f"loraq/jobs/{job['id']}/")
        assert f"loraq/jobs/{job['id']}/attempt-1/checkpoint-4/trainer_state.json" in job_keys
        # checkpoint-2, pruned by the trainer (checkpoints_total_limit), left the store too.
        assert not any("/checkpoint-2/" in key for key in job_keys), job_keys

        artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
        assert "checkpoint-2/pytorch_lora_weights.safetensors" not in artifacts
        for name in ("pytorch_lora_weights.safetensors", "checkpoint-4/pytorch_lora_weights.safetensors",
                     "checkpoint-6/pytorch_lora_weights.safetensors"):
            download = service.client.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
            assert download.status_code == 200, (name, download.text)
            assert hashlib.sha256(download.content).hexdigest() == artifacts[name]["sha256"], name
            assert len(download.content) == artifacts[name]["size"]
        assert artifacts["pytorch_lora_weights.safetensors"]["metadata"], "read from the object's header"
        zipped = service.client.get(f"/v1/jobs/{job['id']}/artifacts/checkpoint-4.zip")
        assert zipped.status_code == 200 and zipped.content[:2] == b"PK"
        assert service.client.get(f"/v1/jobs/{job['id']}/artifacts/nothing.bin").status_code == 404

        # LORAQ_S3_PRESIGN: a 307 to a URL the store itself answers with the same bytes.
        with another_api(service, tmp_path / "logs", LORAQ_S3_PRESIGN="true") as presigning:
            name = "checkpoint-4/pytorch_lora_weights.safetensors"
            redirect = presigning.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
            assert redirect.status_code == 307 and redirect.headers["location"].startswith(endpoint)
            fetched = httpx.get(redirect.headers["location"])
            assert hashlib.sha256(fetched.content).hexdigest() == artifacts[name]["sha256"]
        # A store that does not answer: an upload is a 503 naming it, and leaves no row.
        with another_api(service, tmp_path / "logs", LORAQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                         AWS_MAX_ATTEMPTS="1") as cut_off:
            refused = cut_off.post("/v1/datasets", params={"dedupe": "false"}, files={
                "files": ("other.zip", dataset_zip(tmp_path / "other", n_images=2), "application/zip")})
            assert refused.status_code == 503 and "object store" in refused.text, refused.text
        assert service.client.get("/v1/datasets").json()["total"] == 1

        # A later attempt on a host with an empty folder resumes from the store's furthest checkpoint.
        from loraq.settings import Settings
        from trainer.checkpoints import is_complete
        from worker.job_config import resume_checkpoint

        fresh = Settings(data_dir=tmp_path / "fresh-host", storage_url=f"s3://{bucket}/loraq",
                         s3_endpoint_url=endpoint)
        resumed = resume_checkpoint(fresh, job["id"], 2)
        assert resumed == (fresh.data_dir / "jobs" / job["id"] / "attempt-1" / "checkpoint-6").resolve() or \
            resumed == fresh.data_dir.resolve() / "jobs" / job["id"] / "attempt-1" / "checkpoint-6"
        assert is_complete(resumed)
        weights = resumed / "pytorch_lora_weights.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == \
            artifacts["checkpoint-6/pytorch_lora_weights.safetensors"]["sha256"]

        # Deletes remove the objects.
        assert service.client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert keys(client, bucket, f"loraq/jobs/{job['id']}/") == []
        assert service.client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        assert keys(client, bucket, f"loraq/datasets/{dataset_id}/") == []
    finally:
        shut_down(service)
