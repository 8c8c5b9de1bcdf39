"""Artifact pushes to the object store never hold up the job's lease (worker/pusher.py).

The store is the real S3-protocol server (moto's, tests/support/s3.py). SlowStore is a real
ObjectStore that uploads each LoRA weights file for real, then holds the push for twice the lease,
as a large file on a slow link would: the attempt must keep its lease (renewed while the push is
under way), wait for the pushes before it records success, and leave every artifact in the store
with the sha256 its row names. FlakyStore refuses a file's first tries: the push is retried; one
that never goes through fails the job with a message naming it (never a silent success)."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from loraq import object_store
from loraq.models import Job
from loraq.object_store import ObjectStore
from support.s3 import keys, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from trainer.model import LORA_WEIGHTS_NAME
from worker import pusher
from worker.runner import Outcome, run_job

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])  # the store is under test, not the database

LEASE_S = 4.0


class SlowStore(ObjectStore):
    """Uploads for real; a LoRA weights file's push then lasts `hold_s` more. Records each
    put_file: (key, wall-clock start, wall-clock end)."""

    hold_s = 2 * LEASE_S

    def put_file(self, local, rel):
        started = time.time()
        super().put_file(local, rel)
        if rel.endswith(LORA_WEIGHTS_NAME):
            time.sleep(self.hold_s)
        self.puts.append((rel, started, time.time()))


class FlakyStore(ObjectStore):
    """Refuses the first `refusals` uploads of files named `name` (a store answering 503)."""

    name = "lora_kohya.safetensors"
    refusals = 0

    def put_file(self, local, rel):
        if rel.endswith(self.name) and self.refused < self.refusals:
            self.refused += 1
            raise ConnectionError(f"store unavailable (refusal {self.refused})")
        super().put_file(local, rel)


def use_store(monkeypatch, settings, cls, **attributes) -> ObjectStore:
    """Make `cls` the store the worker finds for these settings (object_store.from_settings)."""
    spec = (*object_store.parse_url(settings.storage_url), settings.s3_endpoint_url, settings.s3_multipart_bytes,
            settings.s3_presign, settings.s3_presign_expires_s)
    store = cls(*spec)
    store.puts, store.refused = [], 0
    for name, value in attributes.items():
        setattr(store, name, value)
    monkeypatch.setitem(object_store._stores, spec, store)
    return store


@pytest.fixture
def s3_settings(settings, s3_bucket):
    endpoint, bucket, client = s3_bucket
    return settings.model_copy(update={"storage_url": f"s3://{bucket}/loraq", "s3_endpoint_url": endpoint,
                                       "lease_s": LEASE_S, "heartbeat_s": 0.5}), client, bucket


def sha256_of_object(client, bucket: str, key: str) -> str:
    return hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


def test_lease_is_renewed_while_a_slow_push_is_under_way(s3_settings, make_job, store, monkeypatch):
    settings, client, bucket = s3_settings
    slow = use_store(monkeypatch, settings, SlowStore)
    job_id = make_job(4, checkpointing_steps=2, checkpoints_total_limit=1)
    leases: list[tuple[float, float]] = []  # (wall-clock time read, the job's lease_until then)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with store.sessions() as session:
                until = session.scalar(select(Job.lease_until).where(Job.id == job_id))
            if until is not None:
                leases.append((time.time(), until.replace(tzinfo=timezone.utc).timestamp()))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        outcome = run_job(settings, job_id, 1)
    finally:
        stop.set()
        watcher.join(10)

    # Before the change the push ran in the loop that renews the lease: the renewal after a
    # push longer than the lease was refused (the lease had run out) and the attempt was lost.
    assert outcome == Outcome.succeeded, store.job(job_id).error
    held = [(rel, start, end) for rel, start, end in slow.puts if rel.endswith(LORA_WEIGHTS_NAME)]
    assert {rel.split("/", 3)[-1] for rel, _, _ in held} >= {
        "checkpoint-4/" + LORA_WEIGHTS_NAME, LORA_WEIGHTS_NAME}
    for rel, start, end in held:
        assert end - start > LEASE_S  # longer than the lease: without a renewal meanwhile it would run out
        during = [until for seen, until in leases if start <= seen <= end]
        before = [until for seen, until in leases if seen <= start]
        assert during and before, (rel, len(leases))
        # Renewed while the push was under way, past where the lease stood when it began.
        assert max(during) > before[-1], rel
        assert max(during) > start + LEASE_S, rel

    job = store.job(job_id)
    assert job.state == "succeeded" and job.lease_until is None
    # Every push was done before the job was recorded succeeded.
    assert max(end for _, _, end in slow.puts) <= job.finished_at.replace(tzinfo=timezone.utc).timestamp()
    # Each checkpoint folder went with its LoRA file last (a folder is complete once that is there).
    for rel, _, _ in held:
        if "/checkpoint-" in rel:
            folder = rel.rsplit("/", 1)[0]
            in_folder = [key for key, _, _ in slow.puts if key.startswith(folder + "/")]
            assert in_folder[-1] == rel and len(in_folder) > 1, in_folder
    # Every artifact is in the store with the sha256 its row names; the pruned checkpoint is not.
    artifacts = store.artifacts(job_id)
    assert "checkpoint-2/" + LORA_WEIGHTS_NAME not in artifacts
    for name, artifact in artifacts.items():
        key = "loraq/" + object_store.relative(settings, Path(artifact.path))
        assert sha256_of_object(client, bucket, key) == artifact.sha256, name
    assert not any("/checkpoint-2/" in key for key in keys(client, bucket, f"loraq/jobs/{job_id}/"))


def test_a_refused_push_is_retried(s3_settings, make_job, store, monkeypatch):
    settings, client, bucket = s3_settings
    monkeypatch.setattr(pusher, "PUSH_BACKOFF_S", (0.05, 0.05))
    flaky = use_store(monkeypatch, settings, FlakyStore, refusals=pusher.PUSH_TRIES)  # one whole round
    job_id = make_job(2)

    assert run_job(settings, job_id, 1) == Outcome.succeeded, store.job(job_id).error

    assert flaky.refused == pusher.PUSH_TRIES  # every try of the first round refused, then tried again
    artifact = store.artifacts(job_id)[FlakyStore.name]
    key = "loraq/" + object_store.relative(settings, Path(artifact.path))
    assert sha256_of_object(client, bucket, key) == artifact.sha256


def test_a_push_that_never_goes_through_fails_the_job(s3_settings, make_job, store, monkeypatch):
    settings, client, bucket = s3_settings
    monkeypatch.setattr(pusher, "PUSH_BACKOFF_S", (0.05, 0.05))
    use_store(monkeypatch, settings, FlakyStore, refusals=10**6)
    job_id = make_job(2)

    assert run_job(settings, job_id, 1) == Outcome.failed

    job = store.job(job_id)
    assert job.state == "failed"
    assert "could not store 1 artifact(s)" in job.error and FlakyStore.name in job.error, job.error
    assert "store unavailable" in job.error
    # What did go through is there: the other LoRA file and the checkpoint.
    stored = keys(client, bucket, f"loraq/jobs/{job_id}/")
    assert any(key.endswith("/attempt-1/" + LORA_WEIGHTS_NAME) for key in stored), stored
    assert not any(key.endswith(FlakyStore.name) for key in stored)
