"""Faults: every hostile upload (tests/support/hostile.py) sent to a running server. Each is
refused with a 4xx whose message names the problem, the data directory holds nothing new
afterwards, and the server goes on accepting good uploads and training on them."""

from __future__ import annotations

import httpx
import pytest

from faults.checks import assert_artifacts, assert_finished, data_dir_listing, final_loras, logs
from support.hostile import LIMITS, hostile_uploads
from support.service import FINAL, submit, upload

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # refusals happen before any row is written

HOSTILE = hostile_uploads(LIMITS)


@pytest.fixture
def limited_service(settings, start_service, monkeypatch):
    """The service with small upload limits (the processes read them from the environment)."""
    for key, value in LIMITS.environ().items():
        monkeypatch.setenv(key, value)
    return start_service(settings.model_copy(update=LIMITS.settings()))


def test_every_hostile_upload_is_refused_and_leaves_nothing(settings, limited_service, scratch, footprint, subtests):
    service = limited_service
    dataset_id = upload(service, scratch)  # a good one first: the folders a good upload makes exist
    before = data_dir_listing(settings.data_dir)

    for case in HOSTILE:
        with subtests.test(case.name):
            try:
                response = service.client.post("/v1/datasets", **case.request())
            except httpx.TransportError as error:  # a refusal must be an answer, not a dropped connection
                pytest.fail(f"{case.name}: no answer ({error!r})\n{service.tail()}")
            assert response.status_code == case.status, response.text
            error = response.json()["error"]
            assert error["status"] == case.status and case.message in error["message"], error
            assert data_dir_listing(settings.data_dir) == before, f"{case.name} left files in the data directory"

    datasets = service.client.get("/v1/datasets").json()
    assert [d["id"] for d in datasets["items"]] == [dataset_id], "a refused upload was recorded"
    assert service.api.poll() is None and service.client.get("/healthz").status_code == 200
    # ... and it still trains on the good dataset.
    job = submit(service, dataset_id, max_train_steps=2)
    done = service.wait_for(job["id"], FINAL, timeout=60)
    assert_finished(done, "succeeded", 2, attempt=1, context=service.tail())
    assert_artifacts(service, job["id"], final_loras() | logs(1))
    footprint.assert_clean()
