"""`loraq submit`, `jobs`, `datasets`, `models`, `download` against the real service."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from loraq_client import Client, LoraqError


def test_submit_wait_download_and_inspect(service, loraq, dataset_folder, tmp_path):
    out_dir = tmp_path / "out"
    done = loraq.run("submit", str(dataset_folder), "--base-model", "tiny-sd",
                     "--set", "max_train_steps=6", *loraq.TINY, "--wait", "-o", str(out_dir))
    assert done.returncode == 0, done.stderr + service.tail()
    job_id = done.stdout.splitlines()[0].strip()
    lora = out_dir / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and done.stdout.splitlines()[-1].strip() == str(lora)
    job = service.client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["step"] == 6 and job["config"]["resolution"] == 32
    listed = {a["name"]: a for a in service.client.get(f"/v1/jobs/{job_id}/artifacts").json()}
    assert hashlib.sha256(lora.read_bytes()).hexdigest() == listed[lora.name]["sha256"]

    # --json: machine-readable stdout only.
    shown = loraq.run("jobs", "show", job_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job_id
    page = json.loads(loraq.run("jobs", "list", "--state", "succeeded", "--json").stdout)
    assert page["total"] == 1 and page["items"][0]["id"] == job_id
    datasets = json.loads(loraq.run("datasets", "list", "--json").stdout)
    assert datasets["total"] == 1 and datasets["items"][0]["image_count"] == 4
    models = json.loads(loraq.run("models", "--json").stdout)
    assert "tiny-sd" in [m["name"] for m in models]
    logs = loraq.run("jobs", "logs", job_id)
    assert logs.returncode == 0
    assert [line.split()[-1] for line in logs.stdout.splitlines() if " state " in line] == \
        ["queued", "running", "succeeded"]
    assert sum(" step " in line for line in logs.stdout.splitlines()) == 6

    # A resumed download: half a file left as .part is completed with a Range request.
    again = tmp_path / "again"
    again.mkdir()
    whole = lora.read_bytes()
    (again / (lora.name + ".part")).write_bytes(whole[: len(whole) // 2])
    statuses = []
    with Client(service.url, service.api_key) as client:
        client.http.event_hooks["response"].append(lambda r: statuses.append(r.status_code))
        target = client.download(job_id, lora.name, again)
        # Options checked without queueing: the count of steps, or the submit's own error
        assert client.validate_job(job["dataset_id"], "tiny-sd", {"resolution": 32, "max_train_steps": 7}
                                   )["total_steps"] == 7
        with pytest.raises(LoraqError) as refused:
            client.validate_job(job["dataset_id"], "tiny-sd", {"resolution": 30})
        assert refused.value.status == 422 and "multiple of 8" in str(refused.value)
    assert target.read_bytes() == whole and 206 in statuses
    assert not (again / (lora.name + ".part")).exists()
    fetched = loraq.run("download", job_id, "-o", str(tmp_path / "dl"))
    assert fetched.returncode == 0 and (tmp_path / "dl" / lora.name).read_bytes() == whole

    # Bad input: the server's 422 message, exit code 2; nothing submitted.
    bad = loraq.run("submit", "--dataset", job["dataset_id"], "--base-model", "tiny-sd",
                    "--set", "resolution=30")
    assert bad.returncode == 2 and "resolution" in bad.stderr and "multiple of 8" in bad.stderr
    unknown = loraq.run("jobs", "show", "nope")
    assert unknown.returncode == 2 and "not found" in unknown.stderr
    assert service.client.get("/v1/jobs").json()["total"] == 1


def test_logs_follow_live_and_cancel(service, loraq, dataset_folder):
    """`jobs logs -f` prints steps while the job runs; a canceled `submit --wait` exits 1."""
    submit = loraq.popen("submit", str(dataset_folder), "--base-model", "tiny-sd",
                         "--set", "max_train_steps=2000", *loraq.TINY, "--wait")
    logs = None
    try:
        job_id = submit.stdout.readline().strip()
        assert job_id, submit.stderr.read()
        logs = loraq.popen("jobs", "logs", job_id, "-f")
        lines = []
        for line in logs.stdout:
            lines.append(line)
            if " step " in line:
                break
        # The step line arrived while the job is still running: it was streamed live.
        assert " step " in lines[-1], lines
        assert service.client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        first_step_at = time.monotonic()

        canceled = loraq.run("jobs", "cancel", job_id)
        assert canceled.returncode == 0, canceled.stderr
        assert canceled.stdout.split() in (["%s" % job_id, "canceling"], ["%s" % job_id, "canceled"])

        _, submit_err = submit.communicate(timeout=120)
        assert submit.returncode == 1 and "canceled" in submit_err, submit_err
        rest, logs_err = logs.communicate(timeout=60)
        lines += rest.splitlines(keepends=True)
        assert logs.returncode == 1 and "canceled" in logs_err
        assert lines[-1].split()[1:] == ["state", "canceled"]
        assert time.monotonic() - first_step_at < 60
    finally:
        for process in (submit, logs):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_failed_job_exits_non_zero_with_its_message(service, loraq, tmp_path):
    """Options the server accepts but training refuses: the job fails, the command says why."""
    from PIL import Image

    from trainer.sample_data import write_sample_dataset

    wide = write_sample_dataset(tmp_path / "wide", n_images=2, size=48)
    for path in wide.glob("*.png"):  # 48x40 at resolution 32: every crop is random
        Image.open(path).crop((0, 0, 48, 40)).save(path)

    failed = loraq.run("submit", str(wide), "--base-model", "tiny-sd", "--set", "max_train_steps=2",
                       "--set", "cache_latents=true", *loraq.TINY, "--wait", "-o", str(tmp_path / "out"))

    assert failed.returncode == 1, failed.stderr
    assert "failed" in failed.stderr and "cache_latents: cannot cache" in failed.stderr
    job_id = failed.stdout.splitlines()[0].strip()
    job = service.client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "failed" and "cache_latents" in job["error"]
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
