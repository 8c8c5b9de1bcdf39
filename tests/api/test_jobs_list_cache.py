"""GET /v1/jobs pages kept in memory (api.services.jobs.PageCache): every write a page shows is in
the very next listing, from the process that wrote it and from another one on the same database;
and the job_versions triggers (migration 0010) move on exactly what a page shows."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, insert, select, update

from api.services import jobs as service
from loraq.auth import Principal
from loraq.jobs import claim, transition
from loraq.models import Dataset, Job, JobMetric, JobState, JobVersion

S = JobState


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _key(client, owner: str) -> str:
    response = client.post("/v1/keys", json={"owner": owner})
    assert response.status_code == 201, response.text
    return response.json()["key"]


@pytest.fixture
def two(make_client, client):
    """Two API apps (two processes' worth of kept pages) on one database: (the first, the second)."""
    return client, make_client()


def fresh(session, principal: Principal, **params) -> dict:
    """The page as it is built without anything kept."""
    session.commit()  # a new snapshot
    return json.loads(service.list_jobs_json(session, principal, params.get("state"), params.get("limit", 50),
                                             params.get("offset", 0)))


def listed(apps, session, principal: Principal, headers: dict | None = None, **params) -> dict:
    """GET /v1/jobs from each app, twice (the second from what it kept): all equal to the page built
    afresh. Returns it."""
    query = {k: (v.value if isinstance(v, JobState) else v) for k, v in params.items()}
    expected = fresh(session, principal, **params)
    for app in apps:
        for _ in range(2):
            response = app.get("/v1/jobs", params=query, headers=headers)
            assert response.status_code == 200 and response.headers["content-type"] == "application/json"
            assert response.json() == expected
    return expected


def admin_of(client) -> Principal:
    me = client.get("/v1/whoami").json()
    return Principal(owner=me["owner"], admin=me["admin"], key_id=me["key_id"])


def by_id(page: dict) -> dict:
    return {item["id"]: item for item in page["items"]}


def test_every_write_is_in_the_next_listing_of_both_processes(two, session, submit):
    first, second = two
    admin = admin_of(first)
    assert listed(two, session, admin)["total"] == 0

    # a submission, through either process
    a = submit(to=first).json()["id"]
    page = listed(two, session, admin)
    assert page["total"] == 1 and by_id(page)[a]["queue_position"] == 1
    b = submit(to=second, name="second").json()["id"]
    page = listed(two, session, admin)
    assert page["total"] == 2 and by_id(page)[b]["queue_position"] == 2
    assert listed(two, session, admin, state=S.queued, limit=1, offset=1)["items"][0]["id"] == a

    # a worker's claim (not through the API): b moves up the queue
    assert claim(session, a, 1, "test-worker", 30) is not None
    session.commit()
    page = listed(two, session, admin)
    assert (by_id(page)[a]["state"], by_id(page)[a]["worker"], by_id(page)[b]["queue_position"]) == (
        "running", "test-worker", 1)

    # the worker's progress: the job row's step, then metrics alone (speed and ETA come from them)
    session.execute(update(Job).where(Job.id == a).values(step=20, last_loss=0.25))
    session.commit()
    page = listed(two, session, admin)
    assert (by_id(page)[a]["step"], by_id(page)[a]["last_loss"], by_id(page)[a]["eta_s"]) == (20, 0.25, None)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    session.execute(insert(JobMetric), [{"job_id": a, "step": s, "images_per_s": 4.0,
                                         "time": start + timedelta(seconds=s)} for s in range(1, 21)])
    session.commit()
    page = listed(two, session, admin)
    assert by_id(page)[a]["images_per_s"] == 4.0 and by_id(page)[a]["eta_s"] > 0
    session.execute(update(JobMetric).where(JobMetric.job_id == a, JobMetric.step == 20).values(images_per_s=8.0))
    session.commit()
    assert by_id(listed(two, session, admin))[a]["images_per_s"] == 8.0
    session.execute(delete(JobMetric).where(JobMetric.job_id == a, JobMetric.step > 10))  # a resume drops steps
    session.commit()
    assert by_id(listed(two, session, admin))[a]["images_per_s"] == 4.0

    # a cancel through one process, seen by the other
    assert second.post(f"/v1/jobs/{b}/cancel").status_code == 200
    page = listed(two, session, admin)
    assert (by_id(page)[b]["state"], by_id(page)[b]["queue_position"]) == ("canceled", None)

    # the worker ends a job (loraq.jobs.transition)
    assert transition(session, a, S.running, S.succeeded, step=100) is not None
    session.commit()
    page = listed(two, session, admin)
    assert (by_id(page)[a]["state"], by_id(page)[a]["progress"]) == ("succeeded", 1.0)

    # a retry queues it again, a delete takes a job away
    assert first.post(f"/v1/jobs/{b}/retry").status_code == 200
    assert by_id(listed(two, session, admin))[b]["queue_position"] == 1
    assert second.delete(f"/v1/jobs/{a}").status_code == 204
    page = listed(two, session, admin)
    assert page["total"] == 1 and set(by_id(page)) == {b}


def test_another_owners_queue_moves_an_owners_positions(two, session, upload, zip_bytes, png, submit):
    """An owner's page is kept per owner, but queue positions count every owner's queued jobs."""
    first, second = two
    alice = _key(first, "alice")
    alice_principal = Principal(owner="alice", admin=False, key_id="")
    response = first.post("/v1/datasets", headers=_as(alice), files={"files": (
        "a.zip", zip_bytes({"a.png": png(), "a.txt": "a red square"}), "application/zip")})
    assert response.status_code == 201, response.text
    mine = first.post("/v1/jobs", headers=_as(alice), json={
        "dataset_id": response.json()["id"], "base_model": "tiny-sd", "options": {}}).json()["id"]
    assert listed(two, session, alice_principal, headers=_as(alice))["items"][0]["queue_position"] == 1

    # the admin's job, queued first (priority above alice's), goes ahead of hers; then leaves the queue
    ahead = submit(to=second, priority=5).json()["id"]
    page = listed(two, session, alice_principal, headers=_as(alice))
    assert [(item["id"], item["queue_position"]) for item in page["items"]] == [(mine, 2)]
    assert second.post(f"/v1/jobs/{ahead}/cancel").status_code == 200
    page = listed(two, session, alice_principal, headers=_as(alice))
    assert [(item["id"], item["queue_position"]) for item in page["items"]] == [(mine, 1)]
    # and the admin's listing, which holds both, follows too
    assert set(by_id(listed(two, session, admin_of(first)))) == {mine, ahead}


def test_pages_kept_are_bounded_and_stamps_read_once_for_many_requests(client, session, submit):
    """The cache holds at most max_pages pages (least recently used out), and requests waiting at
    the same moment share one stamp read, each getting its own scope's stamp."""
    submit()
    engine = client.app.state.engine
    cache = service.PageCache(engine, max_pages=2)
    factory = client.app.state.session_factory
    admin = admin_of(client)
    owners = [Principal(owner=name, admin=False, key_id="") for name in ("alice", "bob")]
    reads = []
    read_stamps = cache.read_stamps

    def counted(scopes):
        reads.append(set(scopes))
        return read_stamps(scopes)

    cache.read_stamps = counted

    async def run():
        stamps = await asyncio.gather(*(cache.stamp(p) for p in [admin, *owners, admin]))
        pages = [await cache.page(factory, admin, None, limit, 0) for limit in (1, 2, 3, 1)]
        return stamps, pages

    stamps, pages = asyncio.run(run())

    assert reads[0] == {None, "alice", "bob"}  # one read for the four waiting requests
    with engine.connect() as conn:
        counters = dict(conn.execute(select(JobVersion.owner, JobVersion.n)).all())
    assert stamps == [sum(counters.values()), counters[""], counters[""], sum(counters.values())]
    assert [json.loads(body)["limit"] for body in pages] == [1, 2, 3, 1]
    assert len(cache._pages) == 2 and [key[4] for key in cache._pages] == [3, 1]  # least recently used out


# -- the triggers -----------------------------------------------------------------------------

# A value other than the one set below, for each column a listed page shows.
CHANGES = {"name": "renamed", "dataset_id": "d2", "base_model": "other", "config_json": None, "state": "running",
           "step": 7, "total_steps": 9, "last_loss": 0.5, "queued_at": None, "started_at": None,
           "finished_at": None, "error": "boom", "attempt": 2, "worker": "w", "priority": 3, "num_gpus": 2,
           "gpu_class": "a100", "min_gpu_memory_gb": 8.0}


def test_job_versions_move_on_what_a_page_shows_and_only_that(settings):
    """Every column GET /v1/jobs lists moves its owner's counter when it changes; bookkeeping
    (events, leases, wake-ups) does not; the queue's counter moves on what changes queue
    positions; metrics move the owner's. Also checks a later migration kept the triggers."""
    from loraq.db import make_engine

    engine = make_engine(settings)
    now = datetime.now(timezone.utc)

    def counters(conn) -> dict:
        return dict(conn.execute(select(JobVersion.owner, JobVersion.n)).all())

    def moved(statement) -> set[str]:
        """The counters `statement` moves, in its own transaction."""
        with engine.begin() as conn:
            before = counters(conn)
            conn.execute(statement)
            after = counters(conn)
        assert all(after[k] >= before.get(k, 0) for k in after)
        return {k for k in after if after[k] != before.get(k)}

    try:
        with engine.begin() as conn:
            conn.execute(insert(Dataset), [{"id": d, "owner": "a", "name": "d", "image_count": 1,
                                            "captioned_count": 1, "total_bytes": 1, "content_hash": d * 32,
                                            "storage_path": d, "report": {}} for d in ("d1", "d2")])
        job = {"dataset_id": "d1", "base_model": "m", "config": {"x": 1}, "state": "succeeded", "total_steps": 1,
               "queued_at": now}
        assert moved(insert(Job).values(id="j1", owner="a", **job)) == {"a"}  # not queued: not the queue's
        assert moved(insert(Job).values(id="j2", owner="b", **{**job, "state": "queued"})) == {"b", ""}

        listed_columns = {column.name for column in service._LIST_COLUMNS} - {"id"}
        assert listed_columns == set(CHANGES)  # a column added to the page needs its trigger (0010)
        for name in sorted(listed_columns):
            column = "config" if name == "config_json" else name
            value = {"config_json": {"x": 2}, "queued_at": now + timedelta(seconds=1),
                     "started_at": now, "finished_at": now}.get(name, CHANGES[name])
            assert moved(update(Job).where(Job.id == "j1").values({column: value})) == {"a"}, name
        for bookkeeping in ({"event_seq": 5}, {"lease_until": now}, {"announced_at": now}, {"attempt_base": 1},
                            {"webhook_url": "http://x"}, {"best_checkpoint": "c"}, {"step": Job.step}):
            assert moved(update(Job).where(Job.id == "j2").values(bookkeeping)) == set(), bookkeeping

        # the queue: a queued job's place (priority, time, class) or state; not its name
        assert moved(update(Job).where(Job.id == "j2").values(priority=1)) == {"b", ""}
        assert moved(update(Job).where(Job.id == "j2").values(name="x")) == {"b"}
        assert moved(update(Job).where(Job.id == "j2").values(state="running")) == {"b", ""}
        assert moved(update(Job).where(Job.id == "j2").values(priority=2)) == {"b"}  # no longer queued

        metric = {"job_id": "j2", "step": 1, "images_per_s": 1.0, "time": now}
        assert moved(insert(JobMetric).values(metric)) == {"b"}
        assert moved(update(JobMetric).where(JobMetric.job_id == "j2").values(images_per_s=2.0)) == {"b"}
        assert moved(update(JobMetric).where(JobMetric.job_id == "j2").values(validation_loss=0.1)) == set()
        assert moved(delete(JobMetric).where(JobMetric.job_id == "j2")) == {"b"}

        assert moved(delete(Job).where(Job.id == "j1")) == {"a"}
        assert moved(update(Job).where(Job.id == "j2").values(owner="c", state="queued")) == {"b", "c", ""}
    finally:
        engine.dispose()


def test_a_database_that_does_not_answer_is_a_503_not_a_500():
    """The stamp read fails as any other read does: with SQLAlchemy's error, which the API answers
    as 503 naming the database (api.main's handler, loraq.errors.unavailable_store)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from loraq.errors import unavailable_store

    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    cache = service.PageCache(engine)
    try:
        with pytest.raises(OperationalError) as raised:
            asyncio.run(cache.stamp(Principal(owner="alice", admin=False, key_id="")))
    finally:
        engine.dispose()
    assert unavailable_store(raised.value) == "database"
    assert cache._reader is None and cache._next is None  # the next request reads again
