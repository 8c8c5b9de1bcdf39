"""POST/GET/DELETE /v1/jobs, cancel and retry: validation, state changes, queue order, metrics."""

from __future__ import annotations

import json

import redis
from sqlalchemy import func, select

from loraq import storage
from loraq.jobs import claim, transition
from loraq.models import Job, JobEvent, JobMetric, JobState
from support.hostile import zip_of

S = JobState


def error_of(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == response.status_code, body
    return body["error"]["message"]


def job_count(session) -> int:
    return session.scalar(select(func.count()).select_from(Job))


def move(session, job_id: str, *states: JobState, **fields) -> None:
    """Walk a job through states as a worker would (queued -> running -> ...)."""
    for state in states:
        current = S(session.scalar(select(Job.state).where(Job.id == job_id)))
        if state == S.running and current == S.queued:
            assert claim(session, job_id, 1, "test-worker", 30) is not None
        else:
            assert transition(session, job_id, current, state, **fields) is not None
        session.commit()


def test_create_job(client, session, settings, submit):
    response = submit({"resolution": 32, "train_batch_size": 2, "num_train_epochs": 3}, name="first")

    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["state"], job["name"], job["base_model"], job["attempt"]) == ("queued", "first", "tiny-sd", 1)
    assert job["total_steps"] == 6  # 3 images, batch 2 -> 2 steps an epoch, 3 epochs
    assert (job["step"], job["progress"], job["queue_position"]) == (0, 0.0, 1)
    assert job["config"]["resolution"] == 32 and job["config"]["missing_captions"] == "empty"
    assert not {"output_dir", "device", "train_data_dir", "pretrained_model_name_or_path"} & set(job["config"])
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job["id"])).all()
    assert [(e.seq, e.type, e.data) for e in events] == [(1, "state", {"state": "queued"})]
    assert redis.Redis.from_url(settings.redis_url).llen(settings.queue_name) == 1  # sent after commit
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_total_steps_follow_the_trainer(submit, subtests):
    for options, steps in [({"max_train_steps": 7}, 7),
                           ({"max_train_samples": 1, "num_train_epochs": 2, "train_batch_size": 4}, 2),
                           ({"num_train_epochs": 2, "train_batch_size": 1, "gradient_accumulation_steps": 2}, 4)]:
        with subtests.test(str(options)):
            assert submit(options).json()["total_steps"] == steps


INVALID_OPTIONS = [
    ({"resolution": 30}, "resolution: must be a positive multiple of 8 (got 30)"),
    ({"rank": 0}, "rank:"),
    ({"learning_rate": -1}, "learning_rate:"),
    ({"prediction_type": "x"}, "prediction_type:"),
    ({"learning_rat": 1e-4}, "learning_rat: unknown option"),
    ({"output_dir": "/tmp/out"}, "output_dir: set by the service"),
    ({"device": "cpu"}, "device: set by the service"),
    ({"pretrained_model_name_or_path": "x"}, "pretrained_model_name_or_path: set by the service"),
    ({"train_data_dir": "/etc"}, "train_data_dir: set by the service"),
    ({"resume_from_checkpoint": "latest"}, "resume_from_checkpoint: set by the service"),
    ({"missing_captions": "sometimes"}, "missing_captions:"),
]


def test_invalid_options_are_422_naming_them(session, submit, subtests):
    for options, message in INVALID_OPTIONS:
        with subtests.test(str(options)):
            response = submit(options)

            assert response.status_code == 422 and message in error_of(response)
    assert job_count(session) == 0


def test_base_model_must_be_an_allowed_name(session, settings, submit, subtests):
    for base_model, message in [
        ("sd-9000", "unknown base model 'sd-9000'; GET /v1/models lists them"),
        ("/etc", "paths are not accepted"),
        ("./models/tiny-sd", "paths are not accepted"),
        ("../tiny-sd", "paths are not accepted"),
        (str(settings.demo_model_dir.resolve()), "paths are not accepted"),  # an existing model folder
    ]:
        with subtests.test(base_model):
            response = submit(base_model=base_model)

            assert response.status_code == 422 and message in error_of(response)
    assert job_count(session) == 0


def test_bad_bodies_are_422_naming_the_field(client):
    missing = client.post("/v1/jobs", json={"base_model": "tiny-sd"})
    extra = client.post("/v1/jobs", json={"dataset_id": "x", "base_model": "tiny-sd", "colour": 1})
    broken = client.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"})
    not_dict = client.post("/v1/jobs", json={"dataset_id": "x", "base_model": "tiny-sd", "options": [1]})

    assert missing.status_code == 422 and "dataset_id: Field required" in error_of(missing)
    assert extra.status_code == 422 and "colour" in error_of(extra)
    assert broken.status_code == 422 and error_of(broken)
    assert not_dict.status_code == 422 and "options" in error_of(not_dict)


def test_unknown_ids_are_404(client, submit):
    assert error_of(submit(dataset_id="nope")) == "dataset nope not found"
    for method, path in [("GET", ""), ("POST", "/cancel"), ("POST", "/retry"), ("DELETE", ""),
                         ("GET", "/metrics"), ("GET", "/events"), ("GET", "/artifacts"), ("GET", "/artifacts/x")]:
        response = client.request(method, f"/v1/jobs/nope{path}")
        assert response.status_code == 404 and error_of(response) == "job nope not found", path


def test_uncaptioned_images_need_missing_captions_empty(client, upload, png, submit):
    dataset = upload({"a.png": png(), "b.png": png(color=(1, 1, 1)), "b.txt": "x"}).json()

    refused = submit({"missing_captions": "error"}, dataset_id=dataset["id"])
    accepted = submit(dataset_id=dataset["id"])

    assert refused.status_code == 422 and "1 of the dataset's images have no caption" in error_of(refused)
    assert accepted.status_code == 201 and accepted.json()["config"]["missing_captions"] == "empty"


# --------------------------------------------------------------------------------------------
# Cancel, retry, delete


def test_cancel_queued_job_is_immediate(client, submit):
    job = submit().json()

    response = client.post(f"/v1/jobs/{job['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["state"] == "canceled" and response.json()["finished_at"] is not None
    assert response.json()["queue_position"] is None


def test_cancel_running_job_flags_the_worker(client, session, settings, submit):
    job = submit().json()
    move(session, job["id"], S.running)

    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    again = client.post(f"/v1/jobs/{job['id']}/cancel")

    assert response.status_code == 200 and response.json()["state"] == "canceling"
    assert again.status_code == 200 and again.json()["state"] == "canceling"
    flags = redis.Redis.from_url(settings.redis_url)
    assert flags.get(f"loraq:jobs:{job['id']}:cancel") == b"1"
    assert 0 < flags.ttl(f"loraq:jobs:{job['id']}:cancel") <= 24 * 3600


def test_cancel_final_job_is_409(client, session, submit, subtests):
    for final, path in [(S.succeeded, [S.running, S.succeeded]), (S.failed, [S.running, S.failed]),
                        (S.canceled, [S.canceled])]:
        with subtests.test(final.value):
            job = submit().json()
            move(session, job["id"], *path)

            response = client.post(f"/v1/jobs/{job['id']}/cancel")

            assert response.status_code == 409 and error_of(response) == f"job {job['id']} is already {final.value}"


def test_retry_failed_job_queues_attempt_two(client, session, settings, submit):
    job = submit().json()
    move(session, job["id"], S.running, S.failed, error="CUDA out of memory")
    assert client.get(f"/v1/jobs/{job['id']}").json()["error"] == "CUDA out of memory"

    response = client.post(f"/v1/jobs/{job['id']}/retry")

    assert response.status_code == 200, response.text
    retried = response.json()
    assert (retried["state"], retried["attempt"], retried["error"], retried["worker"]) == ("queued", 2, None, None)
    assert retried["finished_at"] is None and retried["queue_position"] == 1
    assert redis.Redis.from_url(settings.redis_url).llen(settings.queue_name) == 2
    last = session.scalars(select(JobEvent).where(JobEvent.job_id == job["id"]).order_by(JobEvent.seq.desc())).first()
    assert last.data == {"state": "queued", "previous": "failed", "attempt": 2}


def test_retry_clears_an_old_cancel_flag(client, session, settings, submit):
    job = submit().json()
    move(session, job["id"], S.running)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    move(session, job["id"], S.canceled)

    response = client.post(f"/v1/jobs/{job['id']}/retry")

    assert response.json()["state"] == "queued"
    assert redis.Redis.from_url(settings.redis_url).get(f"loraq:jobs:{job['id']}:cancel") is None


def test_retry_other_states_is_409(client, session, submit, subtests):
    for name, path in [("succeeded", [S.running, S.succeeded]), ("queued", []), ("running", [S.running])]:
        with subtests.test(name):
            job = submit().json()
            move(session, job["id"], *path)

            response = client.post(f"/v1/jobs/{job['id']}/retry")

            assert response.status_code == 409 and "only failed or canceled jobs can be retried" in error_of(response)


def test_delete_active_job_is_409(client, session, submit):
    job = submit().json()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409
    move(session, job["id"], S.running)

    response = client.delete(f"/v1/jobs/{job['id']}")

    assert response.status_code == 409 and "is running" in error_of(response)


def test_delete_finished_job_removes_rows_and_files(client, session, settings, submit):
    job = submit().json()
    move(session, job["id"], S.running, S.succeeded)
    session.add(JobMetric(job_id=job["id"], step=1, loss=0.5))
    session.commit()
    folder = storage.attempt_dir(settings, job["id"], 1)
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"w")

    response = client.delete(f"/v1/jobs/{job['id']}")

    assert response.status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not storage.job_dir(settings, job["id"]).exists()
    for table in (JobEvent, JobMetric):
        assert session.scalar(select(func.count()).select_from(table)) == 0


# --------------------------------------------------------------------------------------------
# Listing, queue position, metrics


def test_list_filters_and_pages_newest_first(client, session, submit):
    ids = [submit(name=f"job-{n}").json()["id"] for n in range(4)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")

    everything = client.get("/v1/jobs").json()
    queued = client.get("/v1/jobs", params={"state": "queued"}).json()
    page = client.get("/v1/jobs", params={"state": "queued", "limit": 1, "offset": 1}).json()
    bad = client.get("/v1/jobs", params={"state": "sleeping"})

    assert everything["total"] == 4 and [j["name"] for j in everything["items"]] == [
        "job-3", "job-2", "job-1", "job-0"]
    assert queued["total"] == 3 and [j["id"] for j in queued["items"]] == [ids[3], ids[2], ids[0]]
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)
    assert [j["id"] for j in page["items"]] == [ids[2]]
    assert bad.status_code == 422 and "state" in error_of(bad)
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_queue_position_counts_queued_jobs_oldest_first(client, session, submit):
    ids = [submit().json()["id"] for _ in range(3)]
    assert [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]

    move(session, ids[0], S.running)

    assert [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [None, 1, 2]
    listed = {j["id"]: j["queue_position"] for j in client.get("/v1/jobs").json()["items"]}
    assert listed == {ids[0]: None, ids[1]: 1, ids[2]: 2}


def test_metrics_come_ordered_by_step(client, session, submit):
    job = submit({"max_train_steps": 4}).json()
    move(session, job["id"], S.running)
    for step in (3, 1, 2):
        session.add(JobMetric(job_id=job["id"], step=step, loss=1.0 / step, lr=1e-4, grad_norm=0.5, epoch=0,
                              images_per_s=10.0))
    session.execute(Job.__table__.update().where(Job.id == job["id"]).values(step=2, last_loss=0.5))
    session.commit()

    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    after = client.get(f"/v1/jobs/{job['id']}/metrics", params={"after_step": 2}).json()
    shown = client.get(f"/v1/jobs/{job['id']}").json()

    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert set(metrics[0]) == {"step", "loss", "lr", "grad_norm", "epoch", "images_per_s", "validation_loss", "time"}
    assert [m["step"] for m in after] == [3]
    assert (shown["progress"], shown["last_loss"]) == (0.5, 0.5)


def test_numbers_the_database_cannot_hold_are_422(session, client, dataset_id, subtests):
    for options, message in [
        ({"learning_rate": float("nan")}, "learning_rate: must be a finite number"),
        ({"learning_rate": float("inf")}, "learning_rate: must be a finite number"),
        ({"max_train_steps": 10**30}, "max_train_steps: the run would take"),
        ({"num_train_epochs": 10**12}, "max_train_steps: the run would take"),
    ]:
        with subtests.test(str(options)):
            # json.dumps writes NaN and Infinity, and the API's JSON parser takes them
            body = json.dumps({"dataset_id": dataset_id, "base_model": "tiny-sd", "options": options})

            response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})

            assert response.status_code == 422 and message in error_of(response)
    assert job_count(session) == 0


def test_hostile_input_is_never_a_500(client, submit, dataset_id):
    job_id = submit().json()["id"]
    responses = [
        client.get("/v1/jobs/a%00b"), client.get("/v1/datasets/a%00b"), submit(dataset_id="x\x00"),
        submit(base_model="tiny\x00sd"), submit(base_model="a/" + "b" * 290), submit(name="bad\x00name"),
        client.get("/v1/jobs", params={"offset": 10**30}), client.get("/v1/datasets", params={"offset": -1}),
        client.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": 10**30}),
        client.get(f"/v1/jobs/{job_id}/events", params={"after": 10**30}),
        client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "9" * 40}),
        client.get(f"/v1/jobs/{job_id}/artifacts/a%00b"), submit(headers={"Idempotency-Key": "two words"}),
        submit({"resolution": "big"}), submit({"validation_prompt": {"nested": [1]}}),
        submit({"validation_prompt": "nul\x00in a prompt"}, name="ok"),
        client.post("/v1/jobs", json=[1, 2]), client.post("/v1/jobs/x/cancel", json={"anything": 1}),
    ]
    assert [r.status_code for r in responses] == [404, 404, 404, 422, 422, 422, 422, 422, 422, 422, 422, 404,
                                                  422, 422, 422, 201, 422, 404]
    assert all(set(r.json()) == {"error"} for r in responses if r.status_code != 201)


def test_a_running_jobs_speed_and_eta_come_from_its_last_steps(client, session, submit):
    from datetime import datetime, timedelta, timezone

    job = submit({"resolution": 32, "max_train_steps": 100}).json()
    assert job["eta_s"] is None and job["images_per_s"] is None  # queued
    assert claim(session, job["id"], 1, "test-worker", 30) is not None
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    # 30 steps: slow at first (5 s each), then 0.5 s each for the last 20 that the pace is read from
    times = [start + timedelta(seconds=5 * n) for n in range(10)]
    times += [times[-1] + timedelta(seconds=0.5 * n) for n in range(1, 21)]
    for step, time in enumerate(times, start=1):
        session.add(JobMetric(job_id=job["id"], step=step, loss=0.1, lr=1e-4, images_per_s=float(step), time=time))
    session.query(Job).filter(Job.id == job["id"]).update({"step": 30})
    session.commit()

    shown = client.get(f"/v1/jobs/{job['id']}").json()
    assert shown["images_per_s"] == 30.0
    assert abs(shown["eta_s"] - 70 * 0.5) < 1e-6  # 70 steps left at 0.5 s per step
    listed = next(j for j in client.get("/v1/jobs").json()["items"] if j["id"] == job["id"])
    assert listed["eta_s"] == shown["eta_s"]


def test_validate_answers_as_submit_would_without_queueing(client, session, dataset_id, subtests):
    def validate(options, **body):
        return client.post("/v1/jobs/validate", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                                      "options": options, **body})

    for options, message in INVALID_OPTIONS:
        with subtests.test(str(options)):
            response = validate(options)
            assert response.status_code == 422 and message in error_of(response)
    checked = validate({"resolution": 32, "train_batch_size": 2, "num_train_epochs": 3})
    assert checked.status_code == 200, checked.text
    assert checked.json()["total_steps"] == 6  # 3 images, batches of 2: 2 steps an epoch
    assert checked.json()["config"]["resolution"] == 32 and checked.json()["config"]["rank"] == 4
    assert validate({}, base_model="no-such-model").status_code == 422
    assert validate({}, dataset_id="0" * 32).status_code == 404
    assert job_count(session) == 0


# --------------------------------------------------------------------------------------------
# The list under load: built in one pass from the page's rows (see list_jobs_json); it must say
# exactly what each job's own GET says.


def _key_for(client, owner: str) -> dict:
    response = client.post("/v1/keys", json={"owner": owner})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


def test_each_listed_job_is_what_its_own_get_answers(client, session, submit):
    from datetime import datetime, timedelta, timezone

    ids = [submit({"max_train_steps": 40}, name=name).json()["id"]
           for name in ("plain", 'quotes " and \\ backslash', "ünïcode ✓", None, "running", "done", "failed")]
    move(session, ids[4], S.running)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for step in range(1, 31):
        session.add(JobMetric(job_id=ids[4], step=step, loss=0.1, images_per_s=float(step),
                              time=start + timedelta(seconds=step / 3)))
    session.query(Job).filter(Job.id == ids[4]).update({"step": 30, "last_loss": 0.25})
    session.commit()
    move(session, ids[5], S.running, S.succeeded)
    move(session, ids[6], S.running, S.failed, error='CUDA "out of memory"\nat step 3')

    listed = client.get("/v1/jobs", params={"limit": 200})

    assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
    body = listed.json()
    assert (body["total"], body["limit"], body["offset"]) == (7, 200, 0)
    assert [item["id"] for item in body["items"]] == ids[::-1]
    for item in body["items"]:
        assert item == client.get(f"/v1/jobs/{item['id']}").json()
    running = next(item for item in body["items"] if item["id"] == ids[4])
    assert running["images_per_s"] == 30.0 and running["eta_s"] is not None and running["progress"] == 0.75
    assert [item["queue_position"] for item in body["items"] if item["state"] == "queued"] == [4, 3, 2, 1]


def test_queue_positions_and_totals_on_filtered_and_paged_lists(client, png, dataset_id, submit):
    """Positions count every owner's queued jobs, also on a page of one owner's jobs, a page of
    one dataset's or a later page; totals count every match, short page or not."""
    alice = _key_for(client, "alice")
    response = client.post("/v1/datasets", headers=alice, files={"files": (
        "a.zip", zip_of({"a.png": png(), "a.txt": "a"}), "application/zip")})
    alice_dataset = response.json()["id"]
    order = []  # every job, oldest first, alternating owners
    for n in range(6):
        if n % 2:
            order.append(submit(headers=alice, dataset_id=alice_dataset).json()["id"])
        else:
            order.append(submit().json()["id"])
    client.post(f"/v1/jobs/{order[2]}/cancel")
    queued = [job_id for job_id in order if job_id != order[2]]
    expected = {job_id: n for n, job_id in enumerate(queued, start=1)}

    for params, headers in [({}, alice), ({"limit": 1, "offset": 1}, alice), ({"limit": 2, "offset": 1}, None),
                            ({"dataset_id": dataset_id}, None), ({"state": "queued", "limit": 2}, None)]:
        page = client.get("/v1/jobs", params=params, headers=headers).json()
        for item in page["items"]:
            assert item["queue_position"] == expected.get(item["id"]), (params, item["id"])
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 3
    assert client.get("/v1/jobs", params={"limit": 2}, headers=alice).json()["total"] == 3
    assert client.get("/v1/jobs", params={"offset": 2}, headers=alice).json()["total"] == 3  # short page
    assert client.get("/v1/jobs", params={"offset": 9}, headers=alice).json() == {
        "items": [], "total": 3, "limit": 50, "offset": 9}
    assert client.get("/v1/jobs", params={"state": "queued", "limit": 1}).json()["total"] == 5
    assert client.get("/v1/jobs", params={"dataset_id": dataset_id, "limit": 1}).json()["total"] == 3
    assert client.get("/v1/jobs", params={"dataset_id": "0" * 32}).json()["total"] == 0
