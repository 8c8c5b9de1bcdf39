"""GET /v1/jobs/{id}/events: Server-Sent Events from the database, resumable, ending at a final state."""

from __future__ import annotations

import json
import threading
import time

import pytest

from api.services import sse
from loraq import events
from loraq.jobs import claim, transition
from loraq.models import JobState

S = JobState


def parse_sse(text: str) -> list[dict]:
    """The events of an SSE body as {"id", "event", "data"}; comment lines are skipped."""
    parsed = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            parsed.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return parsed


def run_job(factory, redis, job_id: str, steps: int = 2, final: JobState = S.succeeded, publish: bool = True) -> None:
    """What a worker records: running, a few step events, then a final state (published after commit)."""
    with factory() as session:
        written = [claim(session, job_id, 1, "w1", 30)]
        written += [events.append_event(session, job_id, events.STEP, {"step": n, "loss": 1.0 / n})
                    for n in range(1, steps + 1)]
        written.append(transition(session, job_id, S.running, final))
        session.commit()
        if publish:
            events.publish(redis, written)


@pytest.fixture
def job_id(submit) -> str:
    return submit().json()["id"]


def test_stored_events_stream_with_ids_and_end_after_the_final_state(client, job_id):
    run_job(client.app.state.session_factory, client.app.state.redis, job_id)

    response = client.get(f"/v1/jobs/{job_id}/events")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    received = parse_sse(response.text)
    assert [(e["id"], e["event"]) for e in received] == [
        (1, "state"), (2, "state"), (3, "step"), (4, "step"), (5, "state")]
    assert received[0]["data"] == {"state": "queued"} and received[4]["data"]["state"] == "succeeded"
    assert received[2]["data"] == {"step": 1, "loss": 1.0}


def test_resume_after_last_event_id_has_no_repeat(client, job_id):
    run_job(client.app.state.session_factory, client.app.state.redis, job_id, final=S.failed)

    by_header = parse_sse(client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "2"}).text)
    by_query = parse_sse(client.get(f"/v1/jobs/{job_id}/events", params={"after": 3}).text)
    header_wins = parse_sse(client.get(f"/v1/jobs/{job_id}/events", params={"after": 1},
                                       headers={"Last-Event-ID": "4"}).text)
    at_end = parse_sse(client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "5"}).text)

    assert [e["id"] for e in by_header] == [3, 4, 5]
    assert [e["id"] for e in by_query] == [4, 5]
    assert [e["id"] for e in header_wins] == [5]
    assert at_end == []  # the job is final and nothing follows: the stream closes at once


@pytest.mark.parametrize("publish", [True, False], ids=["woken-by-redis", "database-poll"])
def test_live_events_follow_until_the_job_ends(client, job_id, publish, monkeypatch):
    # given a client following a queued job while a "worker" records events a moment later
    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.5)
    worker = threading.Timer(1.5, run_job, (client.app.state.session_factory, client.app.state.redis, job_id, 3,
                                            S.succeeded, publish))
    worker.start()
    started = time.monotonic()

    response = client.get(f"/v1/jobs/{job_id}/events")
    worker.join()

    # then every event arrives once, in order, and the stream ends soon after the final one
    received = parse_sse(response.text)
    assert [e["id"] for e in received] == [1, 2, 3, 4, 5, 6]
    assert received[-1]["data"]["state"] == "succeeded"
    assert time.monotonic() - started < 6
    assert ": keep-alive" in response.text  # sent while nothing happened


def test_events_survive_without_redis_entries(client, job_id):
    # events only in the database (never published): the stream still sends them
    with client.app.state.session_factory() as session:
        claim(session, job_id, 1, "w1", 30)
        transition(session, job_id, S.running, S.canceling)
        transition(session, job_id, S.canceling, S.canceled)
        session.commit()

    received = parse_sse(client.get(f"/v1/jobs/{job_id}/events").text)

    assert [e["data"]["state"] for e in received] == ["queued", "running", "canceling", "canceled"]


def test_bad_last_event_id_is_422(client, job_id):
    response = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})

    assert response.status_code == 422 and "Last-Event-ID" in response.json()["error"]["message"]
