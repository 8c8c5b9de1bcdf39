"""webhook_url at submit (refused when private unless allowed), the owner's secret, the deliveries route."""

from __future__ import annotations

import base64

import pytest

from loraq import webhooks

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # validation only; the e2e test sends them


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:9/hook", "loopback, link-local or private address (127.0.0.1)"),
    ("http://localhost/hook", "LORAQ_WEBHOOK_ALLOW_PRIVATE"),
    ("http://10.1.2.3/hook", "10.1.2.3"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("http://[::1]:8080/", "::1"),
    ("ftp://example.com/hook", "must be an http or https URL"),
    ("http:///nohost", "has no host"),
    ("http://user:pw@8.8.8.8/", "must not carry credentials"),
])
def test_a_refused_webhook_url_is_a_422_naming_it(submit, client, url, says):
    response = submit({"max_train_steps": 1, "resolution": 32}, webhook_url=url)
    assert response.status_code == 422, response.text
    assert "webhook_url" in response.text and says in response.text
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing queued
    # /validate answers the same
    body = {"dataset_id": "x", "base_model": "tiny-sd", "webhook_url": url}
    assert client.post("/v1/jobs/validate", json=body).status_code in (404, 422)


def test_private_urls_pass_when_allowed(make_client, settings, dataset_id):
    client = make_client(settings.model_copy(update={"webhook_allow_private": True}))
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-sd",
                                             "options": {"max_train_steps": 1, "resolution": 32},
                                             "webhook_url": "http://127.0.0.1:9/hook"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["webhook_url"] == "http://127.0.0.1:9/hook"
    # The submit's own state change is recorded in its transaction, pending for a dispatcher.
    [delivery] = job["webhook_deliveries"]
    assert (delivery["state"], delivery["status"], delivery["attempts"]) == ("queued", "pending", 0)
    assert client.get(f"/v1/jobs/{job['id']}/webhook-deliveries").json() == [delivery]


def test_the_owner_secret_is_stable_until_rotated(client, make_client):
    first = client.get("/v1/webhook-secret").json()["secret"]
    assert first.startswith("whsec_") and len(base64.b64decode(first[6:])) == 32
    assert client.get("/v1/webhook-secret").json()["secret"] == first
    rotated = client.post("/v1/webhook-secret").json()["secret"]
    assert rotated != first and client.get("/v1/webhook-secret").json()["secret"] == rotated
    other = client.post("/v1/keys", json={"owner": "someone-else"}).json()["key"]
    stranger = make_client(authorized=False)
    stranger.headers["Authorization"] = f"Bearer {other}"
    assert stranger.get("/v1/webhook-secret").json()["secret"] not in (first, rotated)


def test_signature_is_the_standard_webhooks_hmac(backend):
    # The example secret and message from the Standard Webhooks reference implementation's tests.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
