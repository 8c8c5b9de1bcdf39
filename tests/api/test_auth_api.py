"""API keys and owners: every /v1 route needs a live key, and an owner sees only their own data."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from loraq.auth import ADMIN_KEY_FILE
from loraq.models import ApiKey, Artifact, Job
from loraq.storage import sha256_file

ROOT = Path(__file__).resolve().parents[2]


def _key(client, owner: str, admin: bool = False) -> str:
    response = client.post("/v1/keys", json={"owner": owner, "name": f"{owner}'s laptop", "admin": admin})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["key"].startswith(body["prefix"]) and body["owner"] == owner
    return body["key"]


def _as(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key is not None else {"Authorization": ""}


@pytest.fixture
def alice(client, zip_bytes, png, session, settings):
    """Alice's key, a dataset and a queued job of hers with one artifact file."""
    key = _key(client, "alice")
    response = client.post("/v1/datasets", headers=_as(key), files={"files": (
        "a.zip", zip_bytes({"a.png": png(), "a.txt": "a red square"}), "application/zip")})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    response = client.post("/v1/jobs", headers=_as(key),
                           json={"dataset_id": dataset_id, "base_model": "tiny-sd", "options": {"resolution": 32}})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    path = settings.data_dir / "jobs" / job_id / "attempt-1" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not really weights")
    session.add(Artifact(job_id=job_id, kind="lora", name=path.name, path=str(path), size=path.stat().st_size,
                         sha256=sha256_file(path)))
    # the best-checkpoint route redirects to an artifact: name this one so the owner's request
    # follows it through to a 200
    session.get(Job, job_id).best_checkpoint = path.name
    session.commit()
    return {"key": key, "dataset_id": dataset_id, "job_id": job_id, "name": path.name}


def _id_routes(client) -> list[tuple[str, str]]:
    """(method, path) of every /v1 route that takes an id of a dataset, job or artifact (from the
    app's own OpenAPI schema, so a new route is covered the day it is added); the admin-only key
    and base-model routes own nothing of an owner's."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, operations in paths.items()
            if path.startswith("/v1/") and "{" in path and not path.startswith(("/v1/keys", "/v1/models"))
            for method in operations]


def _fill(path: str, ids: dict) -> str:
    return (path.replace("{job_id}", ids["job_id"]).replace("{dataset_id}", ids["dataset_id"])
            .replace("{n}", "0").replace("{name}", ids["name"]))


def test_every_id_route_is_404_to_another_owner_exactly_as_a_missing_id(client, alice, subtests):
    bob = _key(client, "bob")
    routes = _id_routes(client)
    paths = {path for _, path in routes}
    assert {"/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/artifacts/{name}",
            "/v1/datasets/{dataset_id}/thumbnails/{n}", "/v1/jobs/{job_id}/retry"} <= paths
    assert len(routes) >= 11
    missing = {"job_id": uuid.uuid4().hex, "dataset_id": uuid.uuid4().hex, "name": alice["name"]}
    for method, path in routes:
        with subtests.test(route=f"{method} {path}"):
            as_bob = client.request(method, _fill(path, alice), headers=_as(bob))
            absent = client.request(method, _fill(path, missing), headers=_as(alice["key"]))
            assert as_bob.status_code == absent.status_code == 404, (as_bob.text, absent.text)
            as_text = as_bob.text.replace(alice["job_id"], "ID").replace(alice["dataset_id"], "ID")
            assert as_text == absent.text.replace(missing["job_id"], "ID").replace(missing["dataset_id"], "ID")
            # and the owner herself gets through (not 401/403/404) on the same route
            if method == "GET":
                if path.endswith("/events"):
                    continue  # streams until the job ends; its 404 above is what matters
                own = client.get(_fill(path, alice), headers=_as(alice["key"]))
                assert own.status_code == 200, (path, own.text)
    # nothing of Alice's changed: her job is still queued and her dataset is still there
    job = client.get(f"/v1/jobs/{alice['job_id']}", headers=_as(alice["key"])).json()
    assert job["state"] == "queued"
    assert client.get(f"/v1/datasets/{alice['dataset_id']}", headers=_as(alice["key"])).status_code == 200


def test_lists_hold_only_the_owners_items_and_admins_see_all(client, alice):
    bob = _key(client, "bob")
    for path in ("/v1/jobs", "/v1/datasets"):
        assert client.get(path, headers=_as(bob)).json()["total"] == 0
        mine = client.get(path, headers=_as(alice["key"])).json()
        assert mine["total"] == 1
        everyone = client.get(path).json()  # the admin key
        assert {item["id"] for item in everyone["items"]} >= {item["id"] for item in mine["items"]}
    # Bob cannot train on Alice's dataset: it does not exist for him
    response = client.post("/v1/jobs", headers=_as(bob),
                           json={"dataset_id": alice["dataset_id"], "base_model": "tiny-sd", "options": {}})
    assert response.status_code == 404 and alice["dataset_id"] in response.json()["error"]["message"]
    # the admin reads and downloads Alice's things
    assert client.get(f"/v1/jobs/{alice['job_id']}/artifacts/{alice['name']}").content == b"not really weights"


def test_no_key_a_wrong_key_or_a_revoked_key_get_401(client, alice, subtests):
    routes = [("GET", "/v1/jobs"), ("GET", "/v1/models"), ("GET", "/v1/whoami"),
              ("POST", "/v1/datasets"), *[(m, _fill(p, alice)) for m, p in _id_routes(client)]]
    response = client.get("/v1/keys")
    alice_key_id = next(k["id"] for k in response.json() if k["owner"] == "alice")
    assert client.delete(f"/v1/keys/{alice_key_id}").json()["revoked_at"] is not None
    bad = {"none": {}, "empty": {"Authorization": ""}, "not bearer": {"Authorization": f"Basic {alice['key']}"},
           "unknown": _as("lq_" + "x" * 43), "garbage": _as("hello"),
           "revoked": _as(alice["key"])}
    for label, headers in bad.items():
        for method, path in routes:
            with subtests.test(key=label, route=f"{method} {path}"):
                request = client.build_request(method, path, headers=headers)
                if label == "none":
                    request.headers.pop("Authorization", None)
                response = client.send(request)
                assert response.status_code == 401, response.text
                assert response.headers["www-authenticate"] == "Bearer"
                assert "API key" in response.json()["error"]["message"]
    # pages outside /v1 need no key
    assert client.get("/healthz", headers={"Authorization": ""}).status_code in (200, 503)


def test_whoami_and_key_management_are_admin_only(client, alice):
    me = client.get("/v1/whoami", headers=_as(alice["key"])).json()
    assert me["owner"] == "alice" and me["admin"] is False
    assert client.get("/v1/whoami").json()["admin"] is True
    for method, path, body in (("GET", "/v1/keys", None), ("POST", "/v1/keys", {"owner": "mallory", "admin": True}),
                               ("DELETE", f"/v1/keys/{me['key_id']}", None)):
        response = client.request(method, path, json=body, headers=_as(alice["key"]))
        assert response.status_code == 403, response.text
        assert "admin" in response.json()["error"]["message"]
    listed = client.get("/v1/keys").json()
    assert all("key" not in item and "key_hash" not in item for item in listed)
    assert {item["owner"] for item in listed} >= {"admin", "alice"}
    assert client.post("/v1/keys", json={"owner": "Not Valid!"}).status_code == 422
    assert client.delete(f"/v1/keys/{uuid.uuid4().hex}").status_code == 404


def test_keys_are_stored_hashed(client, alice, session):
    rows = list(session.scalars(select(ApiKey)))
    assert rows and all(len(row.key_hash) == 64 for row in rows)
    assert all(alice["key"] not in (row.key_hash, row.prefix, row.name or "") for row in rows)


def test_first_start_writes_the_admin_key_once_with_mode_0600(make_client, settings, capfd):
    client = make_client()  # the first start on this database
    key_file = settings.data_dir / ADMIN_KEY_FILE
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key in capfd.readouterr().out  # printed once, at creation
    assert client.get("/v1/whoami").json() == {"owner": "admin", "admin": True, "key_id": "bootstrap-admin"}
    make_client()  # a restart makes no new key and prints nothing
    assert key_file.read_text().strip() == key
    assert key not in capfd.readouterr().out


def test_queued_jobs_limit_is_a_429_naming_it(make_client, settings, submit, session):
    client = make_client(settings.model_copy(update={"max_queued_jobs": 2}))
    for _ in range(2):
        assert submit({"resolution": 32}, to=client).status_code == 201
    response = submit({"resolution": 32}, to=client)
    assert response.status_code == 429
    assert "queued jobs limit" in response.json()["error"]["message"]
    assert "LORAQ_MAX_QUEUED_JOBS" in response.json()["error"]["message"]
    assert len(list(session.scalars(select(Job)))) == 2
    # a retry queues a job too, so it counts against the same limit
    job_id = client.get("/v1/jobs").json()["items"][0]["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "canceled"
    assert submit({"resolution": 32}, to=client).status_code == 201
    response = client.post(f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 429 and "queued jobs limit" in response.text


def test_racing_submissions_cannot_pass_the_queued_jobs_limit_together(make_client, settings, submit, session):
    from support.hostile import same_time

    client = make_client(settings.model_copy(update={"max_queued_jobs": 3}))
    responses = same_time(12, lambda i: submit({"resolution": 32, "seed": i}, to=client))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] * 3 + [429] * 9, [r.text[:200] for r in responses]
    assert len(list(session.scalars(select(Job).where(Job.state == "queued")))) == 3


def test_storage_limit_is_a_413_naming_it_and_leaves_nothing(make_client, settings, upload, png, client):
    small = make_client(settings.model_copy(update={"max_storage_bytes": 3000}))

    def files():
        return sorted(p for p in settings.data_dir.rglob("*") if p.is_file() and "models" not in p.parts
                      and not p.name.startswith("loraq.db"))

    before = files()
    response = upload({"a.png": png(64, 64), "b.png": png(64, 64, (0, 9, 9)), "a.txt": "x" * 4000}, to=small)
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert "storage limit" in message and "LORAQ_MAX_STORAGE_BYTES" in message
    assert files() == before
    assert client.get("/v1/datasets").json()["total"] == 0
    # a small upload still fits
    assert upload({"a.png": png(8, 8)}, to=small).status_code == 201


def test_racing_uploads_cannot_pass_the_storage_limit_together(make_client, settings, upload, png, client):
    from support.hostile import same_time

    def files(n: int) -> dict:  # the same size, not the same content (an identical one is reused)
        return {"a.png": png(64, 64), "a.txt": f"a red square {n}"}

    first = upload(files(9))
    assert first.status_code == 201
    size = first.json()["total_bytes"]
    assert client.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
    small = make_client(settings.model_copy(update={"max_storage_bytes": int(size * 2.5)}))
    responses = same_time(6, lambda n: upload(files(n), to=small))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] * 2 + [413] * 4, [r.text[:200] for r in responses]
    assert client.get("/v1/datasets").json()["total"] == 2


def test_admin_cli_creates_lists_and_revokes_keys(client, settings):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAQ_DATA_DIR": str(settings.data_dir)}
    if settings.database_url:
        env["LORAQ_DATABASE_URL"] = settings.database_url

    def admin(*args):
        return subprocess.run([sys.executable, "-m", "loraq.admin", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    created = admin("keys", "create", "--owner", "carol", "--name", "ci")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    key_id = re.search(r"created key (\w+) for carol", created.stderr).group(1)
    assert client.get("/v1/whoami", headers=_as(secret)).json()["owner"] == "carol"
    listed = admin("keys", "list", "--owner", "carol")
    assert key_id in listed.stdout and "active" in listed.stdout and secret not in listed.stdout
    assert admin("keys", "revoke", key_id).returncode == 0
    assert client.get("/v1/whoami", headers=_as(secret)).status_code == 401
    assert "revoked" in admin("keys", "list", "--owner", "carol").stdout
    refused = admin("keys", "create", "--owner", "Bad Name")
    assert refused.returncode == 2 and "owner" in refused.stderr
