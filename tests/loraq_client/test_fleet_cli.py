"""The fleet fields (priority, num_gpus, gpu_class, min_gpu_memory_gb) and webhook_url through the
real `loraq` command (submit, batch, jobs show) and the Python client, against the real service.

Every job here asks for a GPU class no worker of the test offers, so it stays queued on its class's
queue (loraq.queue.job_queue) and nothing trains: the test reads what the server stored."""

from __future__ import annotations

import json

import pytest

from loraq_client import Client, LoraqError

FIELDS = ("priority", "num_gpus", "gpu_class", "min_gpu_memory_gb")


def stored(service, job_id: str) -> dict:
    job = service.client.get(f"/v1/jobs/{job_id}").json()
    return {key: job[key] for key in (*FIELDS, "webhook_url", "state")}


def test_submit_and_show_the_fleet_fields(service, loraq, dataset_folder):
    done = loraq.run("submit", str(dataset_folder), "--base-model", "tiny-sd", *loraq.TINY,
                     "--set", "max_train_steps=3", "--priority", "7", "--num-gpus", "2",
                     "--gpu-class", "a100-80gb", "--min-gpu-memory-gb", "40.5")
    assert done.returncode == 0, done.stderr + service.tail()
    job_id = done.stdout.splitlines()[0].strip()
    assert stored(service, job_id) == {"priority": 7, "num_gpus": 2, "gpu_class": "a100-80gb",
                                       "min_gpu_memory_gb": 40.5, "webhook_url": None, "state": "queued"}

    shown = loraq.run("jobs", "show", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert (job["priority"], job["num_gpus"], job["gpu_class"], job["min_gpu_memory_gb"]) == (7, 2, "a100-80gb", 40.5)
    table = loraq.run("jobs", "show", job_id)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines() if line.strip()}
    assert rows["priority"] == ["7"] and rows["num_gpus"] == ["2"]
    assert rows["gpu_class"] == ["a100-80gb"] and rows["min_gpu_memory_gb"] == ["40.5"]

    # Without the options: the server's defaults, and no field sent (the body older servers accept).
    plain = loraq.run("submit", "--dataset", job["dataset_id"], "--base-model", "tiny-sd", *loraq.TINY,
                      "--set", "max_train_steps=3", "--gpu-class", "a100-80gb")
    assert plain.returncode == 0, plain.stderr
    assert stored(service, plain.stdout.split()[0]) == {"priority": 0, "num_gpus": 1, "gpu_class": "a100-80gb",
                                                        "min_gpu_memory_gb": None, "webhook_url": None,
                                                        "state": "queued"}

    # Bad values: click refuses what it can judge (exit 2, nothing sent); the server the rest (its 422).
    zero = loraq.run("submit", "--dataset", job["dataset_id"], "--base-model", "tiny-sd", "--num-gpus", "0")
    assert zero.returncode == 2 and "--num-gpus" in zero.stderr
    bad_class = loraq.run("submit", "--dataset", job["dataset_id"], "--base-model", "tiny-sd", *loraq.TINY,
                          "--gpu-class", "Not A Class")
    assert bad_class.returncode == 2 and "gpu_class" in bad_class.stderr, bad_class.stderr
    # --webhook-url is sent: the server refuses a loopback receiver here (not allowed in this service).
    hook = loraq.run("submit", "--dataset", job["dataset_id"], "--base-model", "tiny-sd", *loraq.TINY,
                     "--gpu-class", "a100-80gb", "--webhook-url", "http://127.0.0.1:9/hook")
    assert hook.returncode == 2 and "webhook_url" in hook.stderr, hook.stderr
    assert service.client.get("/v1/jobs").json()["total"] == 2


def test_client_keyword_arguments(service, dataset_folder):
    with Client(service.url, service.api_key) as client:
        dataset = client.upload_dataset(dataset_folder)
        options = {"resolution": 32, "max_train_steps": 3}
        checked = client.validate_job(dataset.id, "tiny-sd", options, num_gpus=2, gpu_class="h100-80gb")
        assert checked["total_steps"] == 3
        job = client.create_job(dataset.id, "tiny-sd", options, name="fleet", priority=-3, num_gpus=4,
                                gpu_class="h100-80gb", min_gpu_memory_gb=80)
        assert (job.priority, job.num_gpus, job.gpu_class, job.min_gpu_memory_gb) == (-3, 4, "h100-80gb", 80)
        assert stored(service, job.id) == {"priority": -3, "num_gpus": 4, "gpu_class": "h100-80gb",
                                           "min_gpu_memory_gb": 80, "webhook_url": None, "state": "queued"}
        again = client.job(job.id)
        assert (again.priority, again.num_gpus, again.gpu_class, again.min_gpu_memory_gb) == (-3, 4, "h100-80gb", 80)
        with pytest.raises(LoraqError) as refused:  # the server's own bound, its message
            client.create_job(dataset.id, "tiny-sd", options, num_gpus=65, gpu_class="h100-80gb")
        assert refused.value.status == 422 and "num_gpus" in str(refused.value)
        with pytest.raises(TypeError):
            client.create_job(dataset.id, "tiny-sd", options, gpus=2)  # a typo is not silently dropped


def test_batch_fields_top_level_and_per_job(service, loraq, batch_spec):
    spec = batch_spec(
        "fleet.yaml",
        "options: {resolution: 32, train_batch_size: 2, max_train_steps: 2, seed: 0}\n"
        "gpu_class: a100-80gb\n"
        "priority: 5\n"
        "jobs:\n"
        "  - {name: plain}\n"
        "  - {name: urgent, priority: 50, num_gpus: 2, min_gpu_memory_gb: 40}\n"
        "  - {name: other-class, gpu_class: rtx-4090, priority: null}\n")

    dry = loraq.run("batch", str(spec), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = {p["name"]: p for p in json.loads(dry.stdout)}
    assert {name: {k: p.get(k) for k in FIELDS} for name, p in plan.items()} == {
        "plain": {"priority": 5, "num_gpus": None, "gpu_class": "a100-80gb", "min_gpu_memory_gb": None},
        "urgent": {"priority": 50, "num_gpus": 2, "gpu_class": "a100-80gb", "min_gpu_memory_gb": 40},
        "other-class": {"priority": None, "num_gpus": None, "gpu_class": "rtx-4090", "min_gpu_memory_gb": None}}
    assert len({p["idempotency_key"] for p in plan.values()}) == 3

    first = loraq.run("batch", str(spec), "--json")
    assert first.returncode == 0, first.stderr + service.tail()
    jobs = {j["name"]: j for j in json.loads(first.stdout)}
    assert all(j["created"] for j in jobs.values())
    assert {name: {k: v for k, v in stored(service, j["id"]).items() if k in FIELDS} for name, j in jobs.items()} == {
        "plain": {"priority": 5, "num_gpus": 1, "gpu_class": "a100-80gb", "min_gpu_memory_gb": None},
        "urgent": {"priority": 50, "num_gpus": 2, "gpu_class": "a100-80gb", "min_gpu_memory_gb": 40},
        "other-class": {"priority": 0, "num_gpus": 1, "gpu_class": "rtx-4090", "min_gpu_memory_gb": None}}
    # The queue order follows priority: among the a100 jobs, the urgent one is first.
    assert stored(service, jobs["urgent"]["id"])["state"] == "queued"
    assert service.client.get(f"/v1/jobs/{jobs['urgent']['id']}").json()["queue_position"] == 1
    assert service.client.get(f"/v1/jobs/{jobs['plain']['id']}").json()["queue_position"] == 2

    again = loraq.run("batch", str(spec), "--json")  # a rerun: the same jobs, nothing new
    assert again.returncode == 0, again.stderr
    rerun = {j["name"]: j for j in json.loads(again.stdout)}
    assert {n: j["id"] for n, j in rerun.items()} == {n: j["id"] for n, j in jobs.items()}
    assert not any(j["created"] for j in rerun.values())

    spec.write_text(spec.read_text().replace("priority: 5\n", "priority: high\n"))
    refused = loraq.run("batch", str(spec), "--dry-run")
    assert refused.returncode == 2 and "priority: expected int" in refused.stderr, refused.stderr
    assert service.client.get("/v1/jobs").json()["total"] == 3
