"""A fleet of workers on the CPU: GPU classes route jobs, priorities order the queue, a job
submitted while Redis is down is swept and runs, a two-process (gloo) job resumes on another
worker after its own is SIGKILLed (README "Fleets, routing and priorities")."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import pytest
from redis import Redis
from sqlalchemy import select

from api.schemas import JobCreate
from api.services.jobs import submit_job
from loraq import events
from loraq.auth import Principal
from loraq.db import make_engine, make_session_factory
from loraq.models import Job, JobEvent
from loraq.queue import make_celery
from support.service import free_port, launch, shut_down, start_worker, upload

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])  # workers racing for claims

FAST = {"LORAQ_LEASE_S": "6", "LORAQ_ANNOUNCE_SWEEP_S": "1"}  # reaper rounds every 2 s


def _submit(service, dataset_id: str, steps: int, **fields) -> dict:
    body = {"dataset_id": dataset_id, "base_model": "tiny-sd", **fields,
            "options": {"resolution": 32, "train_batch_size": 2, "seed": 0, "max_train_steps": steps,
                        "checkpointing_steps": steps}}
    response = service.client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _wait_all(service, job_ids: list[str], timeout: float = 420) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job_id: service.client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids}
        if all(job["state"] in {"succeeded", "failed", "canceled"} for job in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, f"{[j['state'] for j in jobs.values()]}\n{service.tail()}"
        time.sleep(0.5)


def _pid(job: dict) -> int:
    return int(job["worker"].rsplit(":", 1)[1])  # "<celery hostname>:<pid>"


def test_classes_route_priorities_order_and_an_unannounced_job_is_swept(settings, tmp_path):
    service = launch(settings, tmp_path / "logs", worker_env={**FAST, "LORAQ_WORKER_GPU_CLASS": "a100-80g"})
    try:
        small = start_worker({**service.env, **FAST, "LORAQ_WORKER_GPU_CLASS": "4090"}, service.logs, "worker-2")
        service.workers.append(small)
        dataset_id = upload(service, tmp_path)
        too_high = service.client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                                         "priority": 10**7})
        assert too_high.status_code == 422 and "priority" in too_high.text

        long = _submit(service, dataset_id, 200, gpu_class="a100-80g")
        service.wait_for(long["id"], {"running"}, timeout=120)
        low = [_submit(service, dataset_id, 2, gpu_class="a100-80g") for _ in range(2)]
        urgent = _submit(service, dataset_id, 2, gpu_class="a100-80g", priority=5)
        small_jobs = [_submit(service, dataset_id, 2, gpu_class="4090") for _ in range(4)]
        positions = [service.client.get(f"/v1/jobs/{job['id']}").json() for job in (urgent, *low)]
        assert service.client.get(f"/v1/jobs/{long['id']}").json()["state"] == "running", "the long job ended early"
        # The a100 worker's queue in claim order: priority first, then age; the 4090 jobs are not in it.
        assert [(job["state"], job["queue_position"]) for job in positions] == [("queued", 1), ("queued", 2),
                                                                                  ("queued", 3)]
        assert positions[0]["priority"] == 5 and positions[0]["gpu_class"] == "a100-80g"

        # Redis down at submit: the job is committed, its wake-up lost; the reaper's sweep sends one.
        # Submitted once the 4090 worker is idle: a busy one would find it when it looks for its next job.
        _wait_all(service, [job["id"] for job in small_jobs])
        dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
        engine = make_engine(settings)
        celery, redis = make_celery(dead), Redis.from_url(dead.redis_url)
        try:
            owner = service.client.get("/v1/whoami").json()["owner"]
            with make_session_factory(engine)() as session:
                swept, created = submit_job(
                    session, settings, redis, celery, Principal(owner=owner, admin=True, key_id="test"),
                    JobCreate(dataset_id=dataset_id, base_model="tiny-sd", gpu_class="4090",
                              options={"resolution": 32, "train_batch_size": 2, "max_train_steps": 2}), None)
                assert created and swept.state == "queued" and swept.announced_at is None
                swept_id = swept.id
        finally:
            celery.close()
            redis.close()

        four_each = [long, *low, urgent], small_jobs
        done = _wait_all(service, [job["id"] for job in (*four_each[0], *four_each[1])] + [swept_id])
        assert {job["state"] for job in done.values()} == {"succeeded"}, service.tail()
        assert {_pid(done[job["id"]]) for job in four_each[0]} == {service.worker.pid}
        assert {_pid(done[job["id"]]) for job in four_each[1]} == {small.pid}
        assert _pid(done[swept_id]) == small.pid and done[swept_id]["attempt"] == 1
        started = [datetime.fromisoformat(done[job["id"]]["started_at"]) for job in (urgent, *low)]
        assert started == sorted(started), "the priority-5 job submitted last ran before the older ones"
        with make_session_factory(engine)() as session:  # each ran once: one claim (state running) each
            for job_id in done:
                states = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id,
                                                                     JobEvent.type == events.STATE)).all()
                assert [s["state"] for s in states].count("running") == 1, (job_id, states)
            assert session.get(Job, swept_id).announced_at is not None
        engine.dispose()
        worker_logs = "".join(path.read_text() for path in service.logs.glob("worker-*.log"))
        assert f"job.announced job={swept_id}" in worker_logs
    finally:
        shut_down(service)


def test_a_two_process_job_trains_reports_each_step_once_and_resumes_after_its_worker_is_killed(settings, tmp_path):
    two = {**FAST, "LORAQ_WORKER_GPUS": "2"}
    service = launch(settings, tmp_path / "logs", worker_env=two)
    try:
        dataset_id = upload(service, tmp_path)
        body = {"dataset_id": dataset_id, "base_model": "tiny-sd", "num_gpus": 2,
                "options": {"resolution": 32, "train_batch_size": 1, "seed": 0, "max_train_steps": 12,
                            "checkpointing_steps": 2}}
        response = service.client.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 180
        while service.client.get(f"/v1/jobs/{job_id}").json()["step"] < 5:
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.1)
        os.kill(service.worker.pid, signal.SIGKILL)  # its training processes die with it (PDEATHSIG)
        service.worker.wait()
        service.workers.append(start_worker({**service.env, **two}, service.logs, "worker-2"))

        job = service.wait_for(job_id, {"succeeded", "failed"}, timeout=240)
        assert job["state"] == "succeeded" and job["attempt"] == 2, service.tail()
        assert job["num_gpus"] == 2
        metrics = service.client.get(f"/v1/jobs/{job_id}/metrics").json()
        assert [m["step"] for m in metrics] == list(range(1, 13))
        engine = make_engine(settings)
        with make_session_factory(engine)() as session:
            recorded = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
        engine.dispose()
        starts = [i for i, e in enumerate(recorded) if e.type == events.LOG and "total_batch_size" in str(e.data)]
        assert len(starts) == 2, [e.data for e in recorded if e.type == events.LOG]
        for i in starts:  # two processes of batch 1 each
            assert recorded[i].data["data"]["total_batch_size"] == 2, recorded[i].data
        resumed_at = recorded[starts[1]].data["step"]
        assert resumed_at >= 4 and resumed_at % 2 == 0  # from a checkpoint of attempt 1
        first = [e.data["step"] for e in recorded[starts[0]:starts[1]] if e.type == events.STEP]
        second = [e.data["step"] for e in recorded[starts[1]:] if e.type == events.STEP]
        assert first == list(range(1, len(first) + 1)) and len(first) >= 5, "each step once (rank 0 only)"
        assert second == list(range(resumed_at + 1, 13))
    finally:
        shut_down(service)
