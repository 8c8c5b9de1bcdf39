"""run_job on the real database, Redis and trainer (tiny model): success, duplicates, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraq import events, jobs, storage
from loraq.models import JobState
from worker.runner import Outcome, run_job

LORA_FILES = {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors"}


def test_job_runs_to_succeeded_with_metrics_events_and_artifacts(settings, make_job, store, redis_client):
    job_id = make_job(6, checkpointing_steps=3, checkpoints_total_limit=1, validation_prompt="a red circle",
                      validation_steps=3, num_validation_images=1, validation_inference_steps=2)

    assert run_job(settings, job_id, 1) == Outcome.succeeded

    job = store.job(job_id)
    assert (job.state, job.step, job.total_steps, job.error) == ("succeeded", 6, 6, None)
    assert job.last_loss is not None and job.lease_until is None and job.finished_at is not None
    assert store.metric_steps(job_id) == [1, 2, 3, 4, 5, 6]

    recorded = store.events(job_id)
    assert [e.seq for e in recorded] == list(range(1, len(recorded) + 1))
    assert recorded[0].type == events.STATE and recorded[0].data["state"] == "running"
    assert [e.data["step"] for e in recorded if e.type == events.STEP] == [1, 2, 3, 4, 5, 6]
    assert [e.data["step"] for e in recorded if e.type == events.CHECKPOINT] == [3, 6]
    assert [e.type for e in recorded[-2:]] == [events.DONE, events.STATE]
    assert recorded[-1].data["state"] == "succeeded"
    streamed = redis_client.xrange(events.stream_key(job_id))
    assert [int(fields[b"seq"]) for _, fields in streamed] == [e.seq for e in recorded]

    artifacts = store.artifacts(job_id)
    assert set(artifacts) == LORA_FILES | {
        "checkpoint-6/pytorch_lora_weights.safetensors",  # checkpoint-3 was pruned (total limit 1)
        "samples/step-000003-0.png", "samples/step-000006-0.png", "samples/final-step-000006-0.png",
        "logs/attempt-1.log",
    }
    attempt_dir = storage.attempt_dir(settings, job_id, 1)
    for artifact in artifacts.values():
        path = Path(artifact.path)
        assert attempt_dir in path.parents
        assert (artifact.size, artifact.sha256) == (path.stat().st_size, storage.sha256_file(path))
    assert {artifacts[name].kind for name in LORA_FILES} == {"lora"}
    assert artifacts["checkpoint-6/pytorch_lora_weights.safetensors"].step == 6
    assert "step 6/6" in (attempt_dir / "train.log").read_text()

    # The same message delivered again: the claim is refused and nothing more is written.
    assert run_job(settings, job_id, 1) == Outcome.rejected
    assert len(store.events(job_id)) == len(recorded)


def test_job_canceled_while_queued_is_never_started(settings, make_job, store):
    job_id = make_job(4)
    with store.sessions.begin() as session:
        jobs.transition(session, job_id, JobState.queued, JobState.canceled)

    assert run_job(settings, job_id, 1) == Outcome.rejected

    assert store.job(job_id).state == "canceled"
    assert not storage.job_dir(settings, job_id).exists()


def test_message_for_another_attempt_is_rejected(settings, make_job, store):
    job_id = make_job(4)

    assert run_job(settings, job_id, 2) == Outcome.rejected

    assert (store.job(job_id).state, store.metric_steps(job_id)) == ("queued", [])


def test_unreadable_image_fails_with_the_trainers_message(settings, make_job, store):
    job_id = make_job(4)
    folder = store.dataset_path(job_id)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "broken.txt").write_text("a broken image")

    assert run_job(settings, job_id, 1) == Outcome.failed

    job = store.job(job_id)
    assert job.state == "failed" and "broken.png" in job.error
    assert store.events(job_id)[-1].data == {"state": "failed", "error": job.error}
    assert "logs/attempt-1.log" in store.artifacts(job_id)


@pytest.mark.parametrize(("options", "message"), [
    ({"learning_rat": 1e-4}, "learning_rat: unknown option"),
    ({"resolution": 30}, "resolution: must be a positive multiple of 8 (got 30)"),
    ({"base_model": "not-allowed"}, "base_model: 'not-allowed' is not one of the allowed models"),
])
def test_invalid_job_config_fails_naming_the_field(settings, make_job, store, options, message):
    job_id = make_job(4, **options)

    assert run_job(settings, job_id, 1) == Outcome.failed

    job = store.job(job_id)
    assert (job.state, job.error) == ("failed", message)
    assert not (storage.attempt_dir(settings, job_id, 1) / "train.log").exists()

