"""GET /metrics: Prometheus' text format parsed with prometheus-client's own parser, its numbers
checked against the database after jobs were moved through several states; no key needed;
LORAQ_METRICS_ENABLED=false and LORAQ_METRICS_PORT."""

from __future__ import annotations

from datetime import timedelta

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from loraq.jobs import claim, transition
from loraq.models import Dataset, Job, JobMetric, JobState, utcnow
from support.service import free_port

S = JobState


def scrape(text: str) -> dict:
    """{family name: {(sample name, sorted labels): value}}, and every family's type."""
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {"type": family.type,
                                 "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                             for s in family.samples}}
    return families


def submit_jobs(client, dataset_id: str, count: int) -> list[str]:
    ids = []
    for n in range(count):
        response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                                 "options": {"resolution": 32, "max_train_steps": 50 + n}})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def test_metrics_match_the_database(make_client, settings, session, dataset_id):
    client = make_client()
    ids = submit_jobs(client, dataset_id, 7)
    # 2 queued, 2 running (one on each of two workers, one with steps), 1 succeeded, 1 failed, 1 canceled.
    for job_id, worker in ((ids[2], "host-a:1"), (ids[3], "host-b:2"), (ids[4], "host-a:1"), (ids[5], "host-c:3")):
        assert claim(session, job_id, 1, worker, 600) is not None
    session.commit()
    assert transition(session, ids[4], S.running, S.succeeded) is not None
    assert transition(session, ids[5], S.running, S.failed, error="boom") is not None
    assert transition(session, ids[6], S.queued, S.canceled) is not None
    session.commit()
    # Known times: the succeeded job waited 10 s and ran 400 s; the failed one waited 2 s and ran 50 s.
    t0 = utcnow() - timedelta(hours=1)
    for job_id, wait, run in ((ids[4], 10, 400), (ids[5], 2, 50)):
        session.execute(update(Job).where(Job.id == job_id).values(
            queued_at=t0, started_at=t0 + timedelta(seconds=wait), finished_at=t0 + timedelta(seconds=wait + run)))
    # The running job on host-a has 30 steps, one every half second: 2 steps/s.
    for step in range(1, 31):
        session.add(JobMetric(job_id=ids[2], step=step, loss=0.1, time=t0 + timedelta(seconds=step / 2)))
    session.execute(update(Job).where(Job.id == ids[2]).values(step=30))
    session.commit()

    anonymous = make_client(authorized=False)
    response = anonymous.get("/metrics")  # no key: Prometheus scrapes without one

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    metrics = scrape(response.text)

    in_db = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    assert in_db == {"queued": 2, "running": 2, "succeeded": 1, "failed": 1, "canceled": 1}
    jobs = metrics["loraq_jobs"]["samples"]
    assert {labels[0][1]: value for (_, labels), value in jobs.items()} == {
        state.value: in_db.get(state.value, 0) for state in S}
    assert metrics["loraq_queue_depth"]["samples"] == {
        ("loraq_queue_depth", (("queue", settings.queue_name),)): in_db["queued"]}
    assert metrics["loraq_queue_messages"]["samples"] == {  # the 7 submissions' messages wait in Redis
        ("loraq_queue_messages", (("queue", settings.queue_name),)): 7}

    assert metrics["loraq_workers_busy"]["samples"] == {("loraq_workers_busy", ()): 2}  # host-a and host-b
    assert metrics["loraq_workers_alive"]["samples"][("loraq_workers_alive", ())] >= 2
    speeds = metrics["loraq_job_steps_per_second"]["samples"]
    assert list(speeds) == [("loraq_job_steps_per_second", (("job_id", ids[2]), ("worker", "host-a:1")))]
    assert abs(speeds[list(speeds)[0]] - 2.0) < 1e-6

    durations = metrics["loraq_job_duration_seconds"]
    assert durations["type"] == "histogram"
    samples = durations["samples"]
    assert samples[("loraq_job_duration_seconds_count", (("state", "succeeded"),))] == 1
    assert abs(samples[("loraq_job_duration_seconds_sum", (("state", "succeeded"),))] - 400) < 0.01
    assert samples[("loraq_job_duration_seconds_bucket", (("le", "300.0"), ("state", "succeeded")))] == 0
    assert samples[("loraq_job_duration_seconds_bucket", (("le", "900.0"), ("state", "succeeded")))] == 1
    assert samples[("loraq_job_duration_seconds_bucket", (("le", "60.0"), ("state", "failed")))] == 1
    assert samples[("loraq_job_duration_seconds_count", (("state", "canceled"),))] == 0  # never started

    waits = metrics["loraq_job_queue_wait_seconds"]["samples"]
    started = session.scalar(select(func.count()).select_from(Job).where(Job.started_at.is_not(None)))
    assert waits[("loraq_job_queue_wait_seconds_count", ())] == started == 4
    assert waits[("loraq_job_queue_wait_seconds_bucket", (("le", "5.0"),))] >= 1  # the failed one's 2 s
    assert waits[("loraq_job_queue_wait_seconds_bucket", (("le", "+Inf"),))] == started

    stored = session.scalar(select(func.sum(Dataset.total_bytes)))
    assert stored > 0 and metrics["loraq_upload_bytes"]["samples"] == {("loraq_upload_bytes", ()): stored}
    assert metrics["loraq_datasets"]["samples"] == {("loraq_datasets", ()): 1}
    # No job here has a webhook_url: both outcomes count zero (tests/e2e/test_webhooks.py counts real ones).
    assert metrics["loraq_webhook_deliveries"] == {"type": "counter", "samples": {
        ("loraq_webhook_deliveries_total", (("outcome", "success"),)): 0.0,
        ("loraq_webhook_deliveries_total", (("outcome", "failure"),)): 0.0}}
    assert "# TYPE loraq_webhook_deliveries_total counter\n" in response.text


def test_metrics_can_be_switched_off(make_client, settings):
    client = make_client(settings.model_copy(update={"metrics_enabled": False}))
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.json()["error"]["status"] == 404


def test_metrics_on_a_port_of_their_own(make_client, settings, dataset_id):
    port = free_port()
    client = make_client(settings.model_copy(update={"metrics_port": port}))
    submit_jobs(client, dataset_id, 2)

    assert client.get("/metrics").status_code == 404  # not on the main app
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    jobs = scrape(response.text)["loraq_jobs"]["samples"]
    assert jobs[("loraq_jobs", (("state", "queued"),))] == 2


def test_queue_depth_per_routing_queue(make_client, settings, session, dataset_id):
    """Jobs asking for a GPU class route to `{queue_name}.{class}` (loraq.queue.job_queue): the
    depth of each queue is its queued jobs in the database, the default one listed even at 0, and
    a class queue a live worker of this deployment consumes listed at 0 while nothing waits there."""
    import json

    import redis as redis_lib

    from loraq.queue import job_queue
    from loraq.workers import KEY_PREFIX

    client = make_client()
    submitted = {}  # class -> job ids
    for gpu_class, count in (("a100-80gb", 3), ("rtx-4090", 2)):
        for n in range(count):
            response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                                     "gpu_class": gpu_class,
                                                     "options": {"resolution": 32, "max_train_steps": 10 + n}})
            assert response.status_code == 201, response.text
            submitted.setdefault(gpu_class, []).append(response.json()["id"])
    # One a100 job leaves the queue (claimed by a worker), one 4090 job is canceled.
    assert claim(session, submitted["a100-80gb"][0], 1, "host-a:1", 600) is not None
    session.commit()
    assert transition(session, submitted["rtx-4090"][0], S.queued, S.canceled) is not None
    session.commit()
    broker = redis_lib.Redis.from_url(settings.redis_url)
    idle_queue = job_queue(settings, "h100-80gb")  # an idle worker's class queue: nothing waits there
    worker_key = f"{KEY_PREFIX}metrics-test-{settings.queue_name}"
    broker.set(worker_key, json.dumps({"name": "metrics-test-worker", "queue": settings.queue_name,
                                       "queues": [settings.queue_name, idle_queue]}), ex=60)
    class_queues = [job_queue(settings, gpu_class) for gpu_class in submitted]
    try:
        text = make_client(authorized=False).get("/metrics").text
        metrics = scrape(text)
        queued = session.execute(select(Job.gpu_class, func.count()).where(Job.state == S.queued.value)
                                 .group_by(Job.gpu_class)).all()
        in_db = {job_queue(settings, gpu_class): count for gpu_class, count in queued}
        assert in_db == {class_queues[0]: 2, class_queues[1]: 1}  # none in the default queue
        assert metrics["loraq_queue_depth"]["samples"] == {
            ("loraq_queue_depth", (("queue", queue),)): count
            for queue, count in {settings.queue_name: 0, idle_queue: 0, **in_db}.items()}
        # Each submission's wake-up went to its class's queue in Redis (the claim and the cancel
        # change the database, not the broker's messages).
        assert metrics["loraq_queue_messages"]["samples"] == {
            ("loraq_queue_messages", (("queue", queue),)): count
            for queue, count in {settings.queue_name: 0, idle_queue: 0, class_queues[0]: 3,
                                 class_queues[1]: 2}.items()}
    finally:
        broker.delete(worker_key, *class_queues, *(f"_kombu.binding.{queue}" for queue in class_queues))
