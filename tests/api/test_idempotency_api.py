"""Idempotency-Key on POST /v1/jobs (IETF draft semantics): replays return the same job."""

from __future__ import annotations

import redis
from sqlalchemy import func, select

from loraq.models import Job
from support.hostile import assert_one_created, same_time


def job_count(session) -> int:
    return session.scalar(select(func.count()).select_from(Job))


def test_same_key_same_body_returns_the_same_job(session, settings, submit):
    first = submit({"rank": 8, "resolution": 32}, headers={"Idempotency-Key": "k-1"})
    replay = submit({"resolution": 32, "rank": 8}, headers={"Idempotency-Key": "k-1"})  # key order differs

    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["id"] == first.json()["id"]
    assert job_count(session) == 1
    assert redis.Redis.from_url(settings.redis_url).llen(settings.queue_name) == 1  # one message only


def test_same_key_different_body_is_422(session, submit):
    submit({"rank": 8}, headers={"Idempotency-Key": "k-2"})

    response = submit({"rank": 16}, headers={"Idempotency-Key": "k-2"})

    assert response.status_code == 422
    assert "already used with a different request" in response.json()["error"]["message"]
    assert job_count(session) == 1


def test_no_key_creates_a_job_each_time(session, submit):
    assert submit().json()["id"] != submit().json()["id"]
    assert job_count(session) == 2


def test_bad_key_is_422(submit):
    response = submit(headers={"Idempotency-Key": "x" * 201})

    assert response.status_code == 422 and "Idempotency-Key" in response.json()["error"]["message"]


def test_concurrent_posts_with_one_key_make_one_job(session, submit):
    # In process; tests/faults/test_idempotency.py sends the same race to a running server.
    responses = same_time(20, lambda _: submit({"rank": 4}, headers={"Idempotency-Key": "k-race"}))

    assert_one_created(responses)
    assert job_count(session) == 1
