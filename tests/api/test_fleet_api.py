"""Submitting fleet fields: the priority bound for owners' keys, the fields shown back, and queue
positions in claim order (priority, then age) among the jobs competing for the same workers."""

from __future__ import annotations

import pytest


def _key_for(client, owner: str) -> dict:
    response = client.post("/v1/keys", json={"owner": owner})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


@pytest.mark.parametrize("backend", ["sqlite"])  # the rules, not the store
def test_priority_bounds_fields_and_positions(client, png, submit):
    from support.hostile import zip_of

    alice = _key_for(client, "alice")
    upload = client.post("/v1/datasets", headers=alice, files={"files": (
        "a.zip", zip_of({"a.png": png(), "a.txt": "a"}), "application/zip")})
    dataset = upload.json()["id"]
    over = submit(headers=alice, dataset_id=dataset, priority=11)
    assert over.status_code == 422 and "priority: at most 10 for a non-admin key" in over.text
    for bad in ({"num_gpus": 0}, {"gpu_class": "A100 80G"}, {"min_gpu_memory_gb": -1}, {"priority": 10**7}):
        assert submit(headers=alice, dataset_id=dataset, **bad).status_code == 422, bad

    old = submit(headers=alice, dataset_id=dataset, priority=10).json()  # the owner's maximum
    plain = submit().json()  # admin's, classless, priority 0
    big = submit(gpu_class="a100-80gb", num_gpus=2, min_gpu_memory_gb=40).json()
    small = submit(gpu_class="4090").json()
    urgent = submit(gpu_class="4090", priority=500).json()  # an admin key may go past 10
    assert (big["gpu_class"], big["num_gpus"], big["min_gpu_memory_gb"], big["priority"]) == ("a100-80gb", 2, 40, 0)

    # Claim order for a 4090 worker: urgent (500), old (10, classless), plain (0, classless), small.
    # The a100 job is not ahead of the 4090 ones, nor they of it; classless jobs count every job.
    expected = {urgent["id"]: 1, old["id"]: 2, plain["id"]: 3, big["id"]: 3, small["id"]: 4}
    for job_id, position in expected.items():
        assert client.get(f"/v1/jobs/{job_id}").json()["queue_position"] == position, job_id
    for item in client.get("/v1/jobs").json()["items"]:
        assert item["queue_position"] == expected[item["id"]], item["id"]
