"""Issue 10, end to end: a batch rerun stays a replay whatever copies of its dataset were uploaded
meanwhile, and identical uploads are one dataset per owner (the real API and worker, the real
`loraq` command and curl as subprocesses)."""

from __future__ import annotations

import json
import subprocess
import zipfile

import httpx
from sqlalchemy import select

from api.services.quotas import storage_used
from loraq.db import make_engine, make_session_factory
from loraq.models import Dataset
from loraq_client.fingerprint import dataset_fingerprint
from support.cli import run_loraq as loraq, run_sweep

TINY = ["--base-model", "tiny-sd", "--set", "resolution=32", "--set", "train_batch_size=2", "--set", "seed=0",
        "--set", "checkpointing_steps=100000"]


def curl_upload(service, files, query: str = "", key: str | None = None) -> dict:
    """A plain curl multipart POST (one -F per file, as the README shows); the answer and status."""
    args = ["curl", "-sS", "-H", f"Authorization: Bearer {key or service.api_key}", "-w", "\n%{http_code}"]
    for path in files:
        args += ["-F", f"files=@{path}"]
    done = subprocess.run([*args, f"{service.url}/v1/datasets{query}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return {"status": int(status), **json.loads(body)}


def dashboard_upload(service, folder, dedupe: bool) -> httpx.Response:
    """Shaped like api/dashboard/api.js's uploadDataset for a chosen folder: one `files` part per
    file, named by its path with the folder's own name removed (upload.js `relative`), each with
    the browser's type, then the name field."""
    types = {".png": "image/png", ".txt": "text/plain"}
    parts = [("files", (path.name, path.read_bytes(), types.get(path.suffix, "application/octet-stream")))
             for path in sorted(folder.iterdir())]
    return service.client.post("/v1/datasets", params=None if dedupe else {"dedupe": "false"},
                               files=parts, data={"name": folder.name})


def job_count(service) -> int:
    return service.client.get("/v1/jobs", params={"limit": 1}).json()["total"]


def test_batch_rerun_after_the_same_folder_is_uploaded_again(service, tmp_path):
    from trainer.sample_data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "data", n_images=4, size=32)
    # 1. loraq submit ./data --wait
    first = loraq(service, "submit", "./data", *TINY, "--set", "max_train_steps=2", "--wait", "-o", "out",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr + service.tail()
    dataset_id = service.client.get(f"/v1/jobs/{first.stdout.split()[0]}").json()["dataset_id"]

    # 2. loraq batch sweep.yaml: a 2x2 grid on ./data, on the dataset step 1 uploaded
    jobs = run_sweep(service, tmp_path)
    assert len(jobs) == 4 and all(j["created"] for j in jobs) and {j["dataset_id"] for j in jobs} == {dataset_id}
    assert service.client.get("/v1/datasets").json()["total"] == 1

    # 3. the same folder uploaded again, as a real second copy each time, then the batch again:
    # exit 0, the same four jobs as replays (created: false, status 200), nothing new submitted
    def rerun():
        before = job_count(service)
        replayed = run_sweep(service, tmp_path)
        assert [j["id"] for j in replayed] == [j["id"] for j in jobs]
        assert not any(j["created"] for j in replayed)
        assert job_count(service) == before

    copies = []
    # (i) loraq submit --no-dedupe (stores a copy, and queues one more job of its own)
    submitted = loraq(service, "submit", "./data", *TINY, "--set", "max_train_steps=1", "--no-dedupe", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    copies.append(service.client.get(f"/v1/jobs/{submitted.stdout.split()[0]}").json()["dataset_id"])
    rerun()
    # (ii) plain curl with ?dedupe=false
    files = sorted(data.iterdir())
    copies.append(curl_upload(service, files, "?dedupe=false")["id"])
    rerun()
    # (iii) the dashboard's multipart shape with dedupe=false; without it, the upload is reused
    response = dashboard_upload(service, data, dedupe=False)
    assert response.status_code == 201, response.text
    copies.append(response.json()["id"])
    rerun()
    reused = dashboard_upload(service, data, dedupe=True)
    assert reused.status_code == 200 and reused.headers["X-Loraq-Dataset-Reused"] == "true"
    assert reused.json()["id"] == dataset_id and reused.json()["reused"] is True
    plain = curl_upload(service, files)
    assert (plain["status"], plain["id"], plain["reused"]) == (200, dataset_id, True)
    # and a plain loraq submit trains on the first dataset, storing nothing
    resubmitted = loraq(service, "submit", "./data", *TINY, "--set", "max_train_steps=1", cwd=tmp_path)
    assert resubmitted.returncode == 0 and "reused" in resubmitted.stderr, resubmitted.stderr
    assert service.client.get(f"/v1/jobs/{resubmitted.stdout.split()[0]}").json()["dataset_id"] == dataset_id
    # the same shape of bug in `loraq submit PATH --idempotency-key`: a rerun uploads the folder
    # again, gets the same dataset back, so sends the same body and gets the same job
    keyed = [loraq(service, "submit", "./data", *TINY, "--set", "max_train_steps=1", "--idempotency-key", "k-1",
                   cwd=tmp_path) for _ in range(2)]
    assert [k.returncode for k in keyed] == [0, 0], keyed[1].stderr
    assert keyed[0].stdout.split()[0] == keyed[1].stdout.split()[0]

    hashes = {d["id"]: d["content_hash"] for d in service.client.get("/v1/datasets").json()["items"]}
    assert len(set(copies)) == 3 and set(hashes) == {dataset_id, *copies}
    assert set(hashes.values()) == {dataset_fingerprint(data)}


def test_identical_uploads_are_one_dataset_per_owner(service, settings, tmp_path):
    from trainer.sample_data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "data", n_images=3, size=32)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        for path in sorted(data.iterdir()):
            archive.write(path, path.name)
    archive = [tmp_path / "data.zip"]
    bob = service.client.post("/v1/keys", json={"owner": "bob"}).json()["key"]
    session = make_session_factory(make_engine(settings))()
    folders = settings.data_dir / "datasets"

    def used(owner: str) -> int:
        session.rollback()  # a fresh snapshot
        return storage_used(session, owner)

    # bob's copy is the older one, and the admin sees it: the admin's upload is still its own
    bobs = curl_upload(service, archive, key=bob)
    assert (bobs["status"], bobs["owner"]) == (201, "bob")
    first = curl_upload(service, archive)
    assert (first["status"], first["reused"], first["owner"]) == (201, False, "admin")
    assert first["id"] != bobs["id"] and first["content_hash"] == bobs["content_hash"]
    stored, listing = used("admin"), sorted(p.name for p in folders.iterdir())
    second = curl_upload(service, archive)
    assert (second["status"], second["id"], second["reused"]) == (200, first["id"], True)
    assert used("admin") == stored and sorted(p.name for p in folders.iterdir()) == listing
    bobs_again = curl_upload(service, archive, key=bob)
    assert (bobs_again["status"], bobs_again["id"]) == (200, bobs["id"])
    assert (used("bob"), used("admin")) == (bobs["total_bytes"], stored)
    rows = session.scalars(select(Dataset.owner).order_by(Dataset.owner)).all()
    assert rows == ["admin", "bob"]
    session.close()
