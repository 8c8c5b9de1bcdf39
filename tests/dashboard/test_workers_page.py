"""The workers page in a browser: the running worker with its queue, GPU class and current job."""

from __future__ import annotations

import re
import time

from support.service import FINAL, submit, upload


def test_workers_page_shows_the_running_worker(service, settings, browse, tmp_path):
    dataset_id = upload(service, tmp_path)
    job = submit(service, dataset_id, max_train_steps=5000, checkpointing_steps=5000)
    deadline = time.monotonic() + 60
    while service.client.get(f"/v1/jobs/{job['id']}").json()["step"] < 1:
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.2)

    seen = browse("workers_page.mjs", queue=settings.queue_name, job_id=job["id"])

    name, host, queue, gpu_class, current, heartbeat, _ = seen["cells"]
    assert queue == settings.queue_name and gpu_class == "cpu" and host and name.endswith(f":{service.worker.pid}")
    assert job["id"][:8] in current and "running" in current
    assert re.fullmatch(r"\d+ s ago", heartbeat) and int(heartbeat.split()[0]) <= 15, heartbeat  # heartbeat TTL
    assert seen["job_link"] == f"/jobs/{job['id']}" and seen["nav_active"] and seen["job_page"]
    service.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert service.wait_for(job["id"], FINAL)["state"] == "canceled"
