"""Faults: 20 clients submit the same job with the same Idempotency-Key at the same moment, over
their own connections to a running server. One job is created, queued once, trained once."""

from __future__ import annotations

import time

import httpx

from faults.checks import assert_artifacts, assert_finished, final_loras, logs, metric_steps
from support.hostile import assert_one_created, same_time
from support.service import FINAL, read_sse, upload

CLIENTS = 20
TOTAL = 4


def test_twenty_concurrent_submissions_with_one_key_make_one_job(settings, service, scratch, footprint):
    dataset_id = upload(service, scratch)
    body = {"dataset_id": dataset_id, "base_model": "tiny-sd",
            "options": {"resolution": 32, "train_batch_size": 2, "seed": 0, "max_train_steps": TOTAL}}
    clients = [httpx.Client(base_url=service.url, headers=service.client.headers, timeout=60)
               for _ in range(CLIENTS)]
    try:
        for client in clients:  # connected before the race, so the requests land together
            assert client.get("/healthz").status_code == 200

        responses = same_time(CLIENTS, lambda i: clients[i].post(
            "/v1/jobs", json=body, headers={"Idempotency-Key": "faults-race"}))
    finally:
        for client in clients:
            client.close()

    job_id = assert_one_created(responses)
    listed = service.client.get("/v1/jobs").json()
    assert listed["total"] == 1 and [j["id"] for j in listed["items"]] == [job_id]

    done = service.wait_for(job_id, FINAL, timeout=90)
    assert_finished(done, "succeeded", TOTAL, attempt=1, context=service.tail())
    assert metric_steps(service, job_id) == list(range(1, TOTAL + 1))
    events = read_sse(service.client, f"/v1/jobs/{job_id}/events")
    assert [e["data"]["state"] for e in events if e["event"] == "state"] == ["queued", "running", "succeeded"]
    time.sleep(1)  # time for a second message, had there been one, to reach the (idle) worker
    worker_log = (service.logs / "worker-1.log").read_text()
    assert worker_log.count("job.claimed job=") == 1 and "job.claim_rejected" not in worker_log, \
        "more than one message was queued for the job"
    assert_artifacts(service, job_id, final_loras() | logs(1))
    # A replay after the job ran still answers with it.
    replay = service.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "faults-race"})
    assert (replay.status_code, replay.json()["id"], replay.json()["state"]) == (200, job_id, "succeeded")
    footprint.assert_clean()
