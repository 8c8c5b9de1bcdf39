"""/healthz, /v1/models, the docs, and the one error shape for routes that do not exist."""

from __future__ import annotations

import time


def test_healthz_ok(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert (body["database"], body["redis"]) == ("ok", "ok") and isinstance(body["workers"], int)


def test_healthz_503_when_redis_is_down(make_client, settings):
    client = make_client(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))

    response = client.get("/healthz")

    assert response.status_code == 503
    assert response.json() == {"database": "ok", "redis": "error", "workers": None}


def test_models_lists_the_demo_model(client, settings):
    items = client.get("/v1/models").json()

    # (families, single files and added models: tests/api/test_models_api.py)
    assert items[0] == {"name": "tiny-sd", "source": str(settings.demo_model_dir.resolve()), "available": True,
                        "family": "sd", "kind": "folder", "config": None, "origin": "demo", "problem": None}


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "multipart/form-data" in paths["/v1/datasets"]["post"]["requestBody"]["content"]


def test_unknown_route_has_the_error_shape(client):
    response = client.get("/v1/nothing")

    assert response.status_code == 404 and response.json() == {"error": {"status": 404, "message": "Not Found"}}


def test_healthz_counts_workers_by_their_heartbeat(client, settings):
    import redis

    from loraq.workers import start_heartbeat

    connection = redis.Redis.from_url(settings.redis_url)
    before = client.get("/healthz").json()["workers"]
    stop = start_heartbeat(connection, f"test-{settings.queue_name}", {"pid": 0})
    try:
        deadline = time.monotonic() + 5
        while client.get("/healthz").json()["workers"] != before + 1:
            assert time.monotonic() < deadline
    finally:
        stop.set()
    deadline = time.monotonic() + 10
    while client.get("/healthz").json()["workers"] != before:  # removed on stop, not left to expire
        assert time.monotonic() < deadline


def test_wrong_method_lists_every_allowed_one(client):
    for path, allowed in [("/v1/jobs", "GET, POST"), ("/v1/jobs/abc", "DELETE, GET"),
                          ("/v1/datasets/abc", "DELETE, GET"), ("/healthz", "GET")]:
        response = client.put(path)

        assert response.status_code == 405 and response.headers["allow"] == allowed, (path, response.headers)
        assert response.json() == {"error": {"status": 405, "message": "Method Not Allowed"}}
