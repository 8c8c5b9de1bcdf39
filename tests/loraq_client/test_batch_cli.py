"""`loraq batch`: a 2x2 grid, a dry run, and an idempotent rerun against the real service."""

from __future__ import annotations

import json


def test_grid_batch_dry_run_submit_and_rerun(service, loraq, batch_spec):
    spec = batch_spec(
        "sweep.yaml",
        "name: sweep\n"
        "options: {resolution: 32, train_batch_size: 2, max_train_steps: 2, seed: 0, checkpointing_steps: 100000}\n"
        "grid:\n"
        "  learning_rate: [1e-4, 5.0e-4]\n"
        "  rank: [2, 4]\n")

    dry = loraq.run("batch", str(spec), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert len(plan) == 4 and len({p["idempotency_key"] for p in plan}) == 4
    assert {(p["options"]["learning_rate"], p["options"]["rank"]) for p in plan} == \
        {(1e-4, 2), (1e-4, 4), (5e-4, 2), (5e-4, 4)}
    table = loraq.run("batch", str(spec), "--dry-run")
    assert table.returncode == 0 and "4 planned job(s)" in table.stdout
    assert service.client.get("/v1/jobs").json()["total"] == 0, "a dry run submits nothing"
    assert service.client.get("/v1/datasets").json()["total"] == 0

    first = loraq.run("batch", str(spec), "--json")
    assert first.returncode == 0, first.stderr + service.tail()
    jobs = json.loads(first.stdout)
    assert len(jobs) == 4 and all(j["created"] for j in jobs)
    assert sorted(j["name"] for j in jobs) == sorted(
        f"sweep-learning_rate={lr}-rank={r}" for lr in (0.0001, 0.0005) for r in (2, 4))

    # Rerun (and follow to the end): the same four jobs, nothing new, no second upload.
    again = loraq.run("batch", str(spec), "--wait", "--json", timeout=400)
    assert again.returncode == 0, again.stderr + service.tail()
    rerun = json.loads(again.stdout)
    assert [j["id"] for j in rerun] == [j["id"] for j in jobs]
    assert not any(j["created"] for j in rerun)
    assert {j["state"] for j in rerun} == {"succeeded"}
    assert service.client.get("/v1/jobs").json()["total"] == 4
    assert service.client.get("/v1/datasets").json()["total"] == 1

    shown = loraq.run("batch", str(spec))  # the human table, once more: still nothing new
    assert shown.returncode == 0 and "0 new, 4 existing" in shown.stdout
    assert service.client.get("/v1/jobs").json()["total"] == 4
