"""Faults: the database (a private PostgreSQL, stopped immediately) or Redis goes away for 8 s while
a job trains. The training child never needs either: the worker holds its events, writes them in
order once the store is back, and the job succeeds in its first attempt with every step and every
event once. Meanwhile the API answers 503 with Retry-After naming the store, never 500."""

from __future__ import annotations

import re
import time
import uuid

import pytest

from faults.checks import assert_artifacts, assert_finished, checkpoint_loras, final_loras, logs, metric_steps
from faults.stores import PrivatePostgres, wait_until
from faults.test_restarts import PrivateRedis
from support.service import FINAL, read_sse, submit, upload

OUTAGE_S = 8.0
TOTAL, EVERY = 300, 50


@pytest.fixture(scope="module")
def postgres():
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def pg_settings(postgres, settings):
    """The test's settings (lease 30 s, own data folder and queue) on a fresh, migrated database
    of the private server instead."""
    from loraq.migrate import upgrade

    postgres.ensure_running()
    url = postgres.create_database(f"loraq_outage_{uuid.uuid4().hex[:10]}")
    moved = settings.model_copy(update={"database_url": url})
    upgrade(moved)
    return moved


def v1_routes(service, ids: dict) -> list[tuple[str, str]]:
    """(method, path) of every /v1 route in the API's own OpenAPI schema, ids filled in."""
    paths = service.client.get("/openapi.json").json()["paths"]
    routes = []
    for path, operations in paths.items():
        if path.startswith("/v1/"):
            filled = re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), "x"), path)
            routes.extend((method.upper(), filled) for method in operations)
    return routes


def valid_body(method: str, path: str, ids: dict) -> dict:
    """Request arguments a route would accept when the service is up: an outage, not a malformed
    request, must be what answers."""
    if method != "POST":
        return {}
    if path in ("/v1/jobs", "/v1/jobs/validate"):
        return {"json": {"dataset_id": ids["dataset_id"], "base_model": "tiny-sd", "options": {"resolution": 32}}}
    if path == "/v1/datasets":
        return {"files": {"files": ("a.txt", b"a caption", "text/plain")}}
    if path == "/v1/keys":
        return {"json": {"owner": "someone"}}
    if path == "/v1/models":
        return {"json": {"name": "another", "source": ids["model_source"]}}
    return {}


# Routes that answer without the database: who the key is (the bootstrap admin key is checked
# against its file).
WITHOUT_DATABASE = {("GET", "/v1/whoami")}


def assert_unavailable(service, routes, store: str, ids: dict) -> dict[str, int]:
    """Every route answers 503 with Retry-After and a message naming `store` (those that need no
    database answer as usual); returns the codes."""
    codes = {}
    for method, path in routes:
        response = service.client.request(method, path, timeout=20, **valid_body(method, path, ids))
        codes[f"{method} {path}"] = response.status_code
        if (method, path) in WITHOUT_DATABASE:
            assert response.status_code == 200, (method, path, response.status_code, response.text)
            continue
        assert response.status_code == 503, (method, path, response.status_code, response.text)
        assert int(response.headers["retry-after"]) > 0, (method, path)
        assert f"the {store} is not answering" in response.json()["error"]["message"], (method, path)
    return codes


def assert_every_event_once(service, job_id: str, total: int) -> list[dict]:
    events = read_sse(service.client, f"/v1/jobs/{job_id}/events")
    ids = [e["id"] for e in events]
    assert ids == list(range(1, len(ids) + 1)), f"event ids have a gap or a repeat: {ids}"
    steps = [e["data"]["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, total + 1)), "one step event per step, no gap, no repeat"
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"], "one attempt, never requeued"
    return events


def trained_through(events: list[dict], start: float, end: float) -> int:
    """How many steps the trainer finished between two wall-clock times (its own timestamps)."""
    return sum(1 for e in events if e["event"] == "step" and start <= e["data"]["time"] <= end)


@pytest.mark.parametrize("backend", ["sqlite"])  # the service runs on the private PostgreSQL instead
def test_database_stopped_for_8_s_mid_job(pg_settings, postgres, start_service, scratch, footprint):
    service = start_service(pg_settings)
    dataset_id = upload(service, scratch)
    job = submit(service, dataset_id, max_train_steps=TOTAL, checkpointing_steps=EVERY, train_batch_size=1)
    ids = {"job_id": job["id"], "dataset_id": dataset_id, "name": "train.log",
           "model_source": str(pg_settings.data_dir / "models" / "tiny-sd")}
    routes = v1_routes(service, ids)
    assert len(routes) >= 15 and ("GET", f"/v1/jobs/{job['id']}/events") in routes

    before = wait_until(lambda: (j := service.client.get(f"/v1/jobs/{job['id']}").json())["step"] >= 5 and j,
                        60, service.tail)
    assert before["state"] == "running", before
    postgres.stop("immediate")
    stopped_at = time.time()
    codes = assert_unavailable(service, routes, "database", ids)
    time.sleep(max(0.0, stopped_at + OUTAGE_S - time.time()))
    postgres.start()
    back_at = time.time()

    # The API recovers by itself, and the job is still in its first attempt.
    during = wait_until(lambda: (r := service.client.get(f"/v1/jobs/{job['id']}")).status_code == 200 and r.json(),
                        30, service.tail)
    assert during["attempt"] == 1 and during["state"] in ("running", "succeeded"), f"{during}\n{service.tail()}"
    finished = service.wait_for(job["id"], FINAL, timeout=180)
    assert_finished(finished, "succeeded", TOTAL, attempt=1, context=service.tail())
    assert metric_steps(service, job["id"]) == list(range(1, TOTAL + 1)), "one metric row per step, no gap"
    events = assert_every_event_once(service, job["id"], TOTAL)
    assert trained_through(events, stopped_at + 1, back_at - 1) > 0, "the training waited for the database"
    assert_artifacts(service, job["id"], checkpoint_loras(*range(EVERY, TOTAL + 1, EVERY)) | final_loras() | logs(1))

    worker_log = (service.logs / "worker-1.log").read_text()
    assert "job.store_unavailable" in worker_log and "store=database" in worker_log
    assert re.search(r"job\.store_back job=\w+ after \d+\.\d s; \d+ held events written", worker_log), worker_log
    assert "worker_error" not in worker_log and "Traceback" not in worker_log
    assert "api.unexpected_error" not in (service.logs / "api.log").read_text()
    assert sum(code == 503 for code in codes.values()) >= len(codes) - len(WITHOUT_DATABASE)
    footprint.assert_clean()


@pytest.mark.parametrize("backend", ["sqlite"])  # Redis is the fault here
def test_redis_stopped_for_8_s_mid_job(settings, start_service, scratch, footprint, tmp_path):
    private_redis = PrivateRedis(tmp_path / "redis")
    private_redis.start()
    try:
        service = start_service(settings.model_copy(update={"redis_url": private_redis.url}))
        dataset_id = upload(service, scratch)
        job = submit(service, dataset_id, max_train_steps=TOTAL, checkpointing_steps=EVERY, train_batch_size=1)
        # Reads of the real job and dataset; changes (cancel, delete, ...) and the event stream
        # (which follows a live job to its end) of missing ids.
        real = v1_routes(service, {"job_id": job["id"], "dataset_id": dataset_id, "name": "train.log"})
        missing = v1_routes(service, {})
        routes = ([(m, p) for m, p in real if m == "GET" and not p.endswith("/events")]
                  + [(m, p) for m, p in missing if m != "GET" or p.endswith("/events")])
        wait_until(lambda: service.client.get(f"/v1/jobs/{job['id']}").json()["step"] >= 5, 60, service.tail)

        private_redis.kill()
        stopped_at = time.time()
        # What needs only the database answers as usual; what needs Redis says so: never a 500.
        for method, path in routes:
            response = service.client.request(method, path, timeout=20)
            assert response.status_code != 500, (method, path, response.text)
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) > 0, (method, path)
                assert "the redis is not answering" in response.json()["error"]["message"], (method, path)
        during = service.client.get(f"/v1/jobs/{job['id']}").json()
        assert during["state"] == "running", during
        time.sleep(max(0.0, stopped_at + OUTAGE_S - time.time()))
        private_redis.start()
        back_at = time.time()

        finished = service.wait_for(job["id"], FINAL, timeout=180)
        assert_finished(finished, "succeeded", TOTAL, attempt=1, context=service.tail())
        assert metric_steps(service, job["id"]) == list(range(1, TOTAL + 1))
        events = assert_every_event_once(service, job["id"], TOTAL)
        assert trained_through(events, stopped_at + 1, back_at - 1) > 0, "the training waited for Redis"
        assert_artifacts(service, job["id"], checkpoint_loras(*range(EVERY, TOTAL + 1, EVERY)) | final_loras() | logs(1))
        assert "api.unexpected_error" not in (service.logs / "api.log").read_text()
        footprint.assert_clean()
    finally:
        private_redis.stop()


@pytest.mark.parametrize("backend", ["sqlite"])  # the service runs on the private PostgreSQL instead
def test_an_outage_longer_than_the_lease_ends_the_attempt(pg_settings, postgres, start_service, scratch, footprint):
    """Past its lease the attempt stops (another worker's reaper may already count it lost); once
    the database is back the reaper's rules apply as after a crash: attempt 2 resumes from the
    newest checkpoint and finishes, with one metric per step."""
    service = start_service(pg_settings.model_copy(update={"lease_s": 4.0, "heartbeat_s": 0.5}))
    dataset_id = upload(service, scratch)
    job = submit(service, dataset_id, max_train_steps=TOTAL, checkpointing_steps=EVERY, train_batch_size=1)
    wait_until(lambda: service.client.get(f"/v1/jobs/{job['id']}").json()["step"] >= 5, 60, service.tail)

    postgres.stop("immediate")
    worker_log = service.logs / "worker-1.log"
    wait_until(lambda: "job.abandoned" in worker_log.read_text(), 20, service.tail)
    postgres.start()

    done = service.wait_for(job["id"], FINAL, timeout=180)
    assert_finished(done, "succeeded", TOTAL, attempt=2, context=service.tail())
    assert metric_steps(service, job["id"]) == list(range(1, TOTAL + 1)), "one metric row per step"
    events = read_sse(service.client, f"/v1/jobs/{job['id']}/events")
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    states = [e["data"] for e in events if e["event"] == "state"]
    assert [s["state"] for s in states] == ["queued", "running", "queued", "running", "succeeded"], service.tail()
    assert states[2] == {"state": "queued", "reason": "lease expired", "attempt": 2}
    text = worker_log.read_text()
    assert "its lease ran out while the database was away" in text and "job.requeued job=" + job["id"] in text
    footprint.assert_clean()
