"""Faults: the same Celery task delivered twice (as a redelivered message would be), to two worker
processes that race for it. The database claim lets exactly one of them train."""

from __future__ import annotations

import time

import pytest

from faults.checks import assert_artifacts, assert_finished, final_loras, logs, metric_steps
from loraq.queue import enqueue_job, make_celery
from support.service import FINAL, read_sse, submit, upload

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])  # the claim is one conditional UPDATE on either

TOTAL = 8


def test_the_same_task_sent_twice_trains_once(settings, service, scratch, footprint):
    service.start_worker("worker-2")  # two consumers, so the two deliveries can run at once
    dataset_id = upload(service, scratch)
    job = submit(service, dataset_id, max_train_steps=TOTAL)  # the API sends attempt 1's message
    app = make_celery(settings)
    try:
        enqueue_job(app, job["id"], 1)  # the same task again
    finally:
        app.close()

    done = service.wait_for(job["id"], FINAL, timeout=120)
    deadline = time.monotonic() + 60
    while (output := _worker_output(service)).count("job.claim_rejected") < 1:
        assert time.monotonic() < deadline, f"the duplicate was never rejected:\n{service.tail()}"
        time.sleep(0.2)

    assert_finished(done, "succeeded", TOTAL, attempt=1, context=service.tail())
    assert done["error"] is None
    assert metric_steps(service, job["id"]) == list(range(1, TOTAL + 1))
    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")
    assert [e["data"]["state"] for e in events if e["event"] == "state"] == ["queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == list(range(1, TOTAL + 1))
    assert output.count(f"job.claimed job={job['id']}") == 1
    assert output.count(f"job.claim_rejected job={job['id']}") == 1
    assert output.count(f"job.started job={job['id']}") == 1, "a second training child was started"
    assert done["worker"].startswith("loraq-")
    assert_artifacts(service, job["id"], final_loras() | logs(1))
    footprint.assert_clean()


def _worker_output(service) -> str:
    return "".join(path.read_text() for path in sorted(service.logs.glob("worker-*.log")))
