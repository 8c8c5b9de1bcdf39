"""Webhooks, TensorBoard files, LoRA metadata and the workers list on a real running service:
a local receiver (a real HTTP server) gets a signed POST for each state change, a retry after
answering 500, and the job shows every delivery."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors

from support.service import FINAL, submit, upload

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # the deliveries are the worker's; one store is enough


class Receiver:
    """An HTTP server on a free port recording each POST; the first one is answered 500."""

    def __init__(self):
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(500 if len(receiver.requests) == 1 else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    running = Receiver()
    yield running
    running.close()


def verified(request: dict, secret: str) -> dict:
    """The body, once its Standard Webhooks signature checks out with `secret` (else AssertionError)."""
    headers = request["headers"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return json.loads(request["body"])


def settled(service, job_id: str, count: int, timeout: float = 60) -> list[dict]:
    """The job's deliveries once `count` of them are delivered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = service.client.get(f"/v1/jobs/{job_id}").json()["webhook_deliveries"]
        if sum(d["status"] == "delivered" for d in deliveries) >= count:
            return deliveries
        time.sleep(0.2)
    raise AssertionError(f"deliveries of {job_id} not settled: {deliveries}\n{service.tail()}")


def test_signed_webhooks_tensorboard_metadata_and_workers(settings, start_service, receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAQ_WEBHOOK_ALLOW_PRIVATE", "true")  # the receiver is on 127.0.0.1
    monkeypatch.setenv("LORAQ_WEBHOOK_RETRY_BASE_S", "0.5")
    service = start_service(settings)
    secret = service.client.get("/v1/webhook-secret").json()["secret"]
    dataset_id = upload(service, tmp_path)

    # A job that succeeds: queued, running, succeeded, each signed; the first answered 500, then retried.
    body = {"dataset_id": dataset_id, "base_model": "tiny-sd", "webhook_url": receiver.url,
            "options": {"resolution": 32, "train_batch_size": 2, "seed": 0, "max_train_steps": 6,
                        "checkpointing_steps": 3}}
    job = service.client.post("/v1/jobs", json=body).json()
    service.wait_for(job["id"], FINAL)
    deliveries = settled(service, job["id"], 3)
    assert [d["state"] for d in deliveries] == ["queued", "running", "succeeded"]
    assert all(d["status"] == "delivered" for d in deliveries)
    bodies = [verified(r, secret) for r in receiver.requests]
    assert sorted(b["state"] for b in bodies) == ["queued", "queued", "running", "succeeded"]
    assert all(b["job"]["id"] == job["id"] for b in bodies)
    first = deliveries[0]
    assert first["attempts"] == 2 and [a["status_code"] for a in first["history"]] == [500, 200]
    retried = [r["headers"]["webhook-id"] for r in receiver.requests if r["headers"]["webhook-id"] == first["id"]]
    assert len(retried) == 2  # the same id on the retry: receivers dedupe on it
    assert next(b for b in bodies if b["state"] == "succeeded")["job"]["state"] == "succeeded"

    # /metrics counts the attempts by outcome, as the database holds them.
    families = {f.name: f for f in text_string_to_metric_families(service.client.get("/metrics").text)}
    outcomes = {s.labels["outcome"]: s.value for s in families["loraq_webhook_deliveries"].samples}
    assert outcomes == {"success": 3.0, "failure": 1.0}

    check_tensorboard(service, job["id"])
    check_lora_metadata(service, job["id"])

    # A second job, canceled while it runs: running shows on the workers list, then canceling and canceled.
    body["options"] = {**body["options"], "max_train_steps": 5000, "checkpointing_steps": 5000}
    second = service.client.post("/v1/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while service.client.get(f"/v1/jobs/{second['id']}").json()["step"] < 1:
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.2)
    check_workers(service, settings, second["id"])
    assert service.client.post(f"/v1/jobs/{second['id']}/cancel").status_code == 200
    assert service.wait_for(second["id"], FINAL)["state"] == "canceled"
    deliveries = settled(service, second["id"], 4)
    assert [d["state"] for d in deliveries] == ["queued", "running", "canceling", "canceled"]
    assert all(d["attempts"] == 1 for d in deliveries)
    seen = [verified(r, secret) for r in receiver.requests]
    assert sorted(b["state"] for b in seen if b["job"]["id"] == second["id"]) == \
        ["canceled", "canceling", "queued", "running"]


def check_tensorboard(service, job_id: str) -> None:
    """TensorBoard's own reader finds the job's loss, lr and grad norm at every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    artifacts = service.client.get(f"/v1/jobs/{job_id}/artifacts").json()
    boards = [a for a in artifacts if a["kind"] == "tensorboard"]
    assert boards and all(a["name"].startswith("tensorboard/attempt-1/events.out.tfevents") for a in boards)
    archive = service.client.get(f"/v1/jobs/{job_id}/artifacts/tensorboard.zip")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    folder = service.logs.parent / "board"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
        assert sorted(zf.namelist()) == sorted(a["name"] for a in boards)
        zf.extractall(folder)
    events = EventAccumulator(str(folder / "tensorboard" / "attempt-1"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    metrics = service.client.get(f"/v1/jobs/{job_id}/metrics").json()
    losses = events.Scalars("train/loss")
    assert [s.step for s in losses] == [m["step"] for m in metrics] == list(range(1, 7))
    assert [s.value for s in losses] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert service.client.get(f"/v1/jobs/{job_id}/artifacts/nothing.zip").status_code == 404


def check_lora_metadata(service, job_id: str) -> None:
    """Both LoRA files, as downloaded, carry the metadata the artifact list shows."""
    artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job_id}/artifacts").json()}
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        shown = artifacts[name]["metadata"]
        assert shown["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert shown["ss_sd_model_name"] == "tiny-sd" and shown["ss_steps"] == "6"
        assert shown["ss_num_train_images"] == "4" and len(shown["ss_dataset_hash"]) == 64
        data = service.client.get(f"/v1/jobs/{job_id}/artifacts/{name}").content
        length = int.from_bytes(data[:8], "little")
        assert json.loads(data[8:8 + length])["__metadata__"] == shown
        assert load_safetensors(data)  # still a readable safetensors file
    assert artifacts["checkpoint-3/pytorch_lora_weights.safetensors"]["metadata"]["ss_steps"] == "3"
    assert artifacts[next(n for n in artifacts if n.startswith("logs/"))]["metadata"] is None


def check_workers(service, settings, job_id: str) -> None:
    """GET /v1/workers: the running worker with this job; another owner sees it busy, without the id."""
    [worker] = service.client.get("/v1/workers", params={"queue": settings.queue_name}).json()
    assert worker["queue"] == settings.queue_name and worker["gpu_class"] == "cpu" and worker["busy"]
    assert worker["current_job"]["id"] == job_id and worker["current_job"]["state"] == "running"
    assert worker["host"] and worker["pid"] == service.worker.pid
    other = service.client.post("/v1/keys", json={"owner": "someone-else"}).json()["key"]
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {other}"}) as stranger:
        [seen] = stranger.get("/v1/workers", params={"queue": settings.queue_name}).json()
    assert seen["busy"] and seen["current_job"] is None and seen["name"] == worker["name"]
