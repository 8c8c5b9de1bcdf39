"""API tests: the real app (create_app) on the per-test database and the real Redis, no mocks.

No worker runs here: jobs stay queued unless a test moves them with loraq.jobs.transition.
"""

from __future__ import annotations


import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from loraq.events import stream_key
# One copy of each builder: the hostile-upload payloads (tests/support/hostile.py) use them too.
from support.hostile import multipart as _multipart, png as _png, zip_of as _zip_bytes


@pytest.fixture
def png():
    """png(width=32, height=32, color=(r, g, b), fmt="PNG") -> image bytes."""
    return _png


@pytest.fixture
def zip_bytes():
    """zip_bytes({name: bytes or str}) -> a zip archive's bytes (names kept exactly)."""
    return _zip_bytes


@pytest.fixture
def multipart():
    """multipart([(field, filename or None, data)]) -> (body, headers), built by hand."""
    return _multipart


@pytest.fixture
def make_client(settings):
    """Open a TestClient on create_app(some settings); Redis keys the tests made are removed after."""
    opened = []

    def make(custom=None, authorized: bool = True) -> TestClient:
        """A client sending the first admin key (made when the first app starts), unless `authorized` is False."""
        from api.main import create_app

        client = TestClient(create_app(custom or settings))
        client.__enter__()
        opened.append(client)
        if authorized:
            key_file = next(path for path in ((custom or settings).data_dir / "admin-key",
                                              settings.data_dir / "admin-key") if path.exists())
            client.headers["Authorization"] = f"Bearer {key_file.read_text().strip()}"
        return client

    yield make
    for client in opened:
        from loraq.models import Job

        with client.app.state.session_factory() as session:
            job_ids = list(session.scalars(select(Job.id)))
        client.__exit__(None, None, None)
        keys = [settings.queue_name, f"_kombu.binding.{settings.queue_name}"]
        keys += [key for job_id in job_ids for key in (stream_key(job_id), f"loraq:jobs:{job_id}:cancel")]
        redis.Redis.from_url(settings.redis_url).delete(*keys)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def session(client):
    with client.app.state.session_factory() as session:
        yield session


@pytest.fixture
def upload(client):
    """POST a zip of {name: bytes} as a dataset; returns the response."""

    def post(entries: dict[str, bytes | str], name: str = "data.zip", to: TestClient | None = None):
        return (to or client).post("/v1/datasets", files={"files": (name, _zip_bytes(entries), "application/zip")})

    return post


@pytest.fixture
def dataset_id(upload) -> str:
    """A dataset of three captioned 32 px images."""
    response = upload({"a.png": _png(color=(255, 0, 0)), "a.txt": "a red square",
                       "b.png": _png(color=(0, 255, 0)), "b.txt": "a green square",
                       "c.png": _png(color=(0, 0, 255)), "c.txt": "a blue square"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def submit(client, dataset_id):
    """POST /v1/jobs for the dataset with these options (and headers); returns the response."""

    def post(options: dict | None = None, to: TestClient | None = None, **body):
        payload = {"dataset_id": dataset_id, "base_model": "tiny-sd", "options": options or {}, **body}
        headers = payload.pop("headers", None)
        return (to or client).post("/v1/jobs", json=payload, headers=headers)

    return post
