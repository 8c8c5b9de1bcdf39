"""GET /v1/jobs/{id}/artifacts: listed from the Artifact table, downloaded by name only."""

from __future__ import annotations

import hashlib

from loraq import storage
from loraq.models import Artifact


def add_artifact(session, job_id: str, name: str, path, kind: str = "lora", step: int | None = None) -> None:
    data = path.read_bytes() if path.is_file() else b""
    session.add(Artifact(job_id=job_id, kind=kind, name=name, path=str(path), size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), step=step))
    session.commit()


def test_list_and_download_artifacts(client, session, settings, submit):
    job = submit().json()
    folder = storage.attempt_dir(settings, job["id"], 1)
    (folder / "checkpoint-10").mkdir(parents=True)
    lora = folder / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"weights" * 100)
    (folder / "checkpoint-10" / "pytorch_lora_weights.safetensors").write_bytes(b"ckpt")
    add_artifact(session, job["id"], "pytorch_lora_weights.safetensors", lora)
    add_artifact(session, job["id"], "checkpoint-10/pytorch_lora_weights.safetensors",
                 folder / "checkpoint-10" / "pytorch_lora_weights.safetensors", kind="checkpoint", step=10)

    listed = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    download = client.get(listed[0]["url"])
    nested = client.get(f"/v1/jobs/{job['id']}/artifacts/checkpoint-10/pytorch_lora_weights.safetensors")

    assert [(a["kind"], a["name"], a["step"]) for a in listed] == [
        ("lora", "pytorch_lora_weights.safetensors", None),
        ("checkpoint", "checkpoint-10/pytorch_lora_weights.safetensors", 10)]
    assert listed[0]["size"] == 700 and listed[0]["sha256"] == hashlib.sha256(b"weights" * 100).hexdigest()
    assert download.status_code == 200 and download.content == b"weights" * 100
    assert download.headers["content-length"] == "700"
    assert download.headers["content-type"] == "application/octet-stream"
    assert nested.status_code == 200 and nested.content == b"ckpt"


def test_unknown_or_outside_artifacts_are_404(client, session, settings, submit, tmp_path):
    job = submit().json()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    add_artifact(session, job["id"], "secret.txt", outside)
    add_artifact(session, job["id"], "gone.safetensors", storage.job_dir(settings, job["id"]) / "gone.safetensors")

    for name in ("nope.safetensors", "secret.txt", "../../loraq.db", "gone.safetensors"):
        response = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
        assert response.status_code == 404, name
        assert set(response.json()) == {"error"} and "secret\n" not in response.text
