"""Limits an operator sets on a job's size (loraq/limits.py): a submission over one is a 422 naming
the option and the limit, on POST /v1/jobs and POST /v1/jobs/validate alike; admins are exempt
unless LORAQ_LIMITS_EXEMPT_ADMINS is off. The wall-clock limit is tested against the running
service in tests/e2e/test_time_limit.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from loraq.models import Job

# Each oversized submission the issue found answered 201, and the default limit it now meets.
OVERSIZED = [
    ({"resolution": 65536}, "resolution: 65536 is over this server's limit of 2048 (LORAQ_MAX_RESOLUTION)"),
    ({"train_batch_size": 100000},
     "train_batch_size: 100000 is over this server's limit of 64 (LORAQ_MAX_TRAIN_BATCH_SIZE)"),
    ({"rank": 100000}, "rank: 100000 is over this server's limit of 256 (LORAQ_MAX_RANK)"),
    ({"num_validation_images": 100000},
     "num_validation_images: 100000 is over this server's limit of 16 (LORAQ_MAX_VALIDATION_IMAGES)"),
    ({"max_train_steps": 100001},
     "max_train_steps: 100001 is over this server's limit of 100000 (LORAQ_MAX_TRAIN_STEPS)"),
    # 3 images at batch 1 make 3 steps an epoch: the count comes from the epochs, which are named.
    ({"train_batch_size": 1, "num_train_epochs": 40000},
     "num_train_epochs: 40000 epochs make 120000 steps, over this server's limit of 100000 "
     "(LORAQ_MAX_TRAIN_STEPS); lower num_train_epochs or set max_train_steps"),
]
# The limits are checked before any row is written: the database plays no part (one suffices).
pytestmark = pytest.mark.parametrize("backend", ["sqlite"])

AT_THE_LIMITS = {"resolution": 2048, "train_batch_size": 64, "rank": 256, "num_validation_images": 16,
                 "max_train_steps": 100000}


@pytest.fixture
def user(client, make_client, settings, zip_bytes, png) -> tuple[TestClient, str]:
    """A client with a plain (non-admin) key of owner alice, and a dataset of hers."""
    secret = client.post("/v1/keys", json={"owner": "alice"}).json()["key"]
    alice = make_client(settings, authorized=False)
    alice.headers["Authorization"] = f"Bearer {secret}"
    entries = {f"{n}.png": png(color=(40 * n, 0, 0)) for n in range(3)} | {f"{n}.txt": "a square" for n in range(3)}
    response = alice.post("/v1/datasets", files={"files": ("d.zip", zip_bytes(entries), "application/zip")})
    assert response.status_code == 201, response.text
    return alice, response.json()["id"]


def body(dataset_id: str, options: dict) -> dict:
    return {"dataset_id": dataset_id, "base_model": "tiny-sd", "options": options}


def error_of(response) -> str:
    assert response.json()["error"]["status"] == response.status_code
    return response.json()["error"]["message"]


@pytest.mark.parametrize("options, message", OVERSIZED, ids=[next(iter(o)) for o, _ in OVERSIZED[:-1]] + ["epochs"])
def test_each_limit_refuses_an_oversized_submission_naming_it(user, session, options, message):
    alice, dataset_id = user
    for path in ("/v1/jobs", "/v1/jobs/validate"):
        response = alice.post(path, json=body(dataset_id, options))
        assert response.status_code == 422, (path, response.text)
        assert error_of(response) == message, path
    assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_every_limit_past_is_named_at_once(user):
    alice, dataset_id = user
    response = alice.post("/v1/jobs", json=body(dataset_id, {"resolution": 4096, "rank": 512}))
    assert response.status_code == 422
    assert error_of(response).split("; ") == [
        "resolution: 4096 is over this server's limit of 2048 (LORAQ_MAX_RESOLUTION)",
        "rank: 512 is over this server's limit of 256 (LORAQ_MAX_RANK)"]


def test_a_submission_at_the_limits_is_accepted(user):
    alice, dataset_id = user
    checked = alice.post("/v1/jobs/validate", json=body(dataset_id, AT_THE_LIMITS))
    assert checked.status_code == 200, checked.text
    created = alice.post("/v1/jobs", json=body(dataset_id, AT_THE_LIMITS))
    assert created.status_code == 201, created.text
    assert created.json()["total_steps"] == 100000


def test_limits_follow_the_settings_and_zero_turns_one_off(make_client, settings, client, zip_bytes, png):
    custom = settings.model_copy(update={"max_resolution": 64, "max_rank": 0, "limits_exempt_admins": False})
    admin = make_client(custom)
    entries = {"a.png": png(), "a.txt": "a square"}
    dataset_id = admin.post("/v1/datasets", files={"files": ("d.zip", zip_bytes(entries), "application/zip")}
                            ).json()["id"]
    refused = admin.post("/v1/jobs/validate", json=body(dataset_id, {"resolution": 72, "rank": 100000}))
    assert refused.status_code == 422
    # Admins are not exempt here; rank's limit is off, so only the resolution is named.
    assert error_of(refused) == "resolution: 72 is over this server's limit of 64 (LORAQ_MAX_RESOLUTION)"
    assert admin.post("/v1/jobs/validate", json=body(dataset_id, {"resolution": 64, "rank": 100000})
                      ).status_code == 200


def test_admins_are_exempt_by_default(client, dataset_id):
    response = client.post("/v1/jobs", json=body(dataset_id, {"resolution": 4096, "rank": 512,
                                                              "max_train_steps": 200000}))
    assert response.status_code == 201, response.text
    assert response.json()["config"]["resolution"] == 4096
