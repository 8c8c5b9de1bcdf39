"""The dashboard in a real browser against the real API and worker (see conftest.py)."""

from __future__ import annotations

import io
import zipfile

from PIL import Image

from support.cli import run_sweep
from support.service import dataset_zip, submit, upload
from trainer.sample_data import write_sample_dataset

# Small enough to take seconds on a CPU, long enough to watch: a checkpoint and a validation image
# half way, and the final ones at the end.
STEPS = 60
OPTIONS = {"max_train_steps": STEPS, "train_batch_size": 2, "seed": 0, "checkpointing_steps": 30,
           "validation_steps": 30, "num_validation_images": 1, "validation_inference_steps": 2}


def zip_with_problems(tmp_path) -> bytes:
    """Four captioned images, one without a caption and a file that is no image."""
    buffer = io.BytesIO(dataset_zip(tmp_path, n_images=4))
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(png, "PNG")
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("uncaptioned.png", png.getvalue())
        archive.writestr("broken.png", b"not an image")
    return buffer.getvalue()


def test_upload_submit_watch_and_download(service, browse, tmp_path):
    # given a dataset zip on disk, with an uncaptioned image and a broken one
    zip_path = tmp_path / "pets.zip"
    zip_path.write_bytes(zip_with_problems(tmp_path))

    # when the browser drops it on New job, submits a job on tiny-sd and watches it to the end
    seen = browse("submit_and_watch.mjs", zip=str(zip_path), steps=STEPS, options=OPTIONS)

    # then the page showed the server's report of the upload
    report = seen["report"]
    assert (report["Images"], report["Missing captions"], report["Refused files"]) == ("5", "1", "1"), report
    assert report["Buckets at 512"] == "512×512: 5", report  # square images: the square bucket
    assert len(seen["refused"]) == 1 and seen["refused"][0].startswith("broken.png"), seen["refused"]

    # and the job ran on that dataset with the form's options
    job = service.client.get(f"/v1/jobs/{seen['job_id']}").json()
    assert job["state"] == "succeeded" and job["dataset_id"] == seen["selected_dataset"]
    assert job["name"] == "browser test" and job["base_model"] == "tiny-sd"
    assert job["config"]["resolution"] == 32 and job["config"]["max_train_steps"] == STEPS  # quick-test preset, edited

    # the chart gained points and the progress bar advanced while the job ran, in the same page
    running = [s for s in seen["observed"] if s["state"] == "running" and 0 < s["points"] < STEPS]
    assert len({s["points"] for s in running}) >= 3, seen["observed"]
    assert len({s["progress"] for s in running}) >= 3, seen["observed"]
    assert all(a["points"] <= b["points"] for a, b in zip(seen["observed"], seen["observed"][1:]))
    assert seen["observed"][-1]["points"] == STEPS and seen["same_document"] is True

    # validation images appeared, grouped by step; checkpoints are offered too
    assert seen["gallery_images"] >= 2 and 30 in seen["gallery_steps"] and STEPS in seen["gallery_steps"]
    assert seen["checkpoint_downloads"] == 2

    # the download is the server's LoRA, byte for byte
    artifacts = {a["name"]: a for a in service.client.get(f"/v1/jobs/{seen['job_id']}/artifacts").json()}
    assert seen["download_name"] == "pytorch_lora_weights.safetensors"
    assert seen["download_sha256"] == artifacts["pytorch_lora_weights.safetensors"]["sha256"]

    # and the datasets page shows the thumbnails and captions
    assert seen["thumbnails"] == 4 and seen["captions"] >= 4


def test_cancel_a_running_job_from_the_jobs_page(service, browse, tmp_path):
    # given a long job that is running
    job = submit(service, upload(service, tmp_path), max_train_steps=5000)
    service.wait_for(job["id"], {"running"})

    # when the browser cancels it from its row on the jobs page
    seen = browse("cancel_from_jobs.mjs", job_id=job["id"])

    # then the server has it canceled, and the page followed without a reload
    assert service.client.get(f"/v1/jobs/{job['id']}").json()["state"] == "canceled"
    assert seen["same_document"] is True and seen["eta_text"].endswith(("s", "min", "h"))
    assert seen["retry_visible"] and not seen["cancel_visible"] and seen["job_page_retry_visible"]


def wide_images_zip(tmp_path) -> bytes:
    """Captioned 48x40 images: at resolution 32 every crop is random, so latents cannot be cached."""
    folder = write_sample_dataset(tmp_path / "wide", n_images=2, size=48)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".png":
                png = io.BytesIO()
                Image.open(path).crop((0, 0, 48, 40)).save(png, "PNG")
                archive.writestr(path.name, png.getvalue())
            else:
                archive.write(path, path.name)
    return buffer.getvalue()


def test_server_messages_reach_the_page(service, browse, tmp_path):
    # given a dataset, and a job the server accepts but training refuses
    dataset_id = upload(service, tmp_path)
    wide = service.client.post("/v1/datasets", files={"files": ("wide.zip", wide_images_zip(tmp_path), "application/zip")})
    failing = submit(service, wide.json()["id"], max_train_steps=2, cache_latents=True)

    # when the form sends a resolution that is not a multiple of 8 and a learning rate of 0,
    # and the browser then opens the failing job
    seen = browse("server_messages.mjs", dataset_id=dataset_id, failing_job_id=failing["id"])

    # then each refused field shows the server's own message, and no job was made
    assert "multiple of 8 (got 30)" in seen["live_resolution_error"]  # before submitting
    assert "greater than 0" in seen["live_learning_rate_error"]
    assert "multiple of 8 (got 30)" in seen["resolution_error"]
    assert "greater than 0" in seen["learning_rate_error"]
    assert seen["max_train_steps_error"] == "" and seen["resolution_invalid"] == "true"
    assert seen["path"] == "/jobs/new"
    assert service.client.get("/v1/jobs").json()["total"] == 1  # only the failing one

    # the failed job shows the trainer's message and offers a retry
    assert "cache_latents: cannot cache" in seen["failed_error"] and seen["failed_retry_visible"]
    assert seen["failed_error"] == service.client.get(f"/v1/jobs/{failing['id']}").json()["error"]

    # a refused key: a message on the form; a 401 later: back to the form, the key forgotten
    assert "refused" in seen["wrong_key_message"]
    assert "refused" in seen["flash"] and seen["key_after_401"] is None


def test_delete_jobs_and_a_dataset(service, browse, tmp_path):
    # given a dataset, two jobs on it that were canceled and one that is active
    dataset_id = upload(service, tmp_path)
    finished = [submit(service, dataset_id, max_train_steps=5000) for _ in range(2)]
    for job in finished:
        assert service.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    for job in finished:
        service.wait_for(job["id"], {"canceled"})
    active = submit(service, dataset_id, max_train_steps=5000)
    name = service.client.get(f"/v1/datasets/{dataset_id}").json()["name"]

    # when the browser deletes the dataset (refused), one job from the jobs list, the other from
    # its page, then cancels and deletes the active one, and deletes the dataset
    seen = browse("delete_things.mjs", dataset_id=dataset_id, list_job_id=finished[0]["id"],
                  page_job_id=finished[1]["id"], active_job_id=active["id"])

    # then each delete asked first, with the safe answer focused
    assert seen["dataset_dialog"] == f"Delete {name}?" and seen["dialog_focus"] == "Cancel"
    assert seen["job_dialog"].startswith("Delete ") and seen["kept_after_cancel"] is True

    # the dataset in use was refused with the server's message on its card
    assert f"({dataset_id}) is used by 3 job(s)" in seen["in_use_message"], seen["in_use_message"]
    # and its link listed exactly that dataset's three jobs
    assert seen["filtered_path"] == f"/jobs?dataset={dataset_id}" and name in seen["filter_label"]

    # the row went at once and stayed gone; an active job offered no delete
    assert seen["row_after_poll"] is False and seen["same_document"] is True
    assert seen["toast"].startswith("Deleted ") and seen["active_delete_visible"] is False

    # the job page went back to the list, and Back did not lead to the deleted job
    assert seen["job_page_delete_visible"] and seen["page_job_row"] is False and seen["path_after_back"] in ("/", "/jobs")  # the list it came from

    # and the server has none of them
    for job in [*finished, active]:
        assert service.client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert service.client.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert seen["empty_jobs"].startswith("No jobs yet") and seen["empty_datasets"].startswith("No datasets yet")


def test_save_now_and_sample_now_from_the_job_page(service, browse, tmp_path):
    # given a long running job with a validation prompt and nothing scheduled
    job = submit(service, upload(service, tmp_path), max_train_steps=5000, checkpointing_steps=100000,
                 validation_steps=100000, validation_prompt="a red circle", num_validation_images=1,
                 validation_inference_steps=2)
    service.wait_for(job["id"], {"running"})

    # when the browser clicks "Save checkpoint now" and "Sample now" on its page
    seen = browse("job_actions.mjs", job_id=job["id"])

    # then a checkpoint and an image appeared on the page without a reload, as the server has them
    assert seen["checkpoints_before"] == 0 and seen["images_before"] == 0
    assert len(seen["checkpoint_names"]) == 1 and len(seen["gallery_steps"]) == 1 and seen["same_document"]
    kinds = {a["kind"] for a in service.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert {"checkpoint", "sample"} <= kinds
    service.client.post(f"/v1/jobs/{job['id']}/cancel")
    service.wait_for(job["id"], {"canceled"})


def test_validation_loss_line_and_best_checkpoint_on_the_job_page(service, browse, tmp_path):
    # given a finished job that measured validation loss at its checkpoints
    job = submit(service, upload(service, tmp_path), max_train_steps=6, checkpointing_steps=2,
                 validation_split=0.25)
    assert service.wait_for(job["id"], {"succeeded", "failed"})["state"] == "succeeded"

    # when the browser opens its page
    seen = browse("validation_loss.mjs", job_id=job["id"], steps=6)

    # then the loss chart has a validation loss line, its last value the one stored at step 6
    legend = dict(seen["legend"])
    metrics = service.client.get(f"/v1/jobs/{job['id']}/metrics").json()
    last = [m["validation_loss"] for m in metrics if m["step"] == 6][0]
    assert "validation loss" in legend and legend["validation loss"] not in ("", "—", None), legend
    assert abs(float(legend["validation loss"]) - last) <= 0.01 * abs(last) + 1e-3, (legend, last)
    # and the facts name the best checkpoint, as the job has it
    best = service.client.get(f"/v1/jobs/{job['id']}").json()["best_checkpoint"]
    assert seen["facts"]["Best checkpoint"] == best.split("/")[0]


def test_a_batch_rerun_after_the_dashboard_uploads_its_folder_again(service, browse, tmp_path):
    # given a folder run as a 2x2 batch with the real `loraq` command
    folder = write_sample_dataset(tmp_path / "data", n_images=4, size=32)
    jobs = run_sweep(service, tmp_path)
    assert len(jobs) == 4 and all(j["created"] for j in jobs)
    dataset = service.client.get(f"/v1/datasets/{jobs[0]['dataset_id']}").json()

    # when the browser chooses the same folder again on New job
    seen = browse("upload_again.mjs", folder=str(folder))

    # then the page says the owner's dataset was reused, by name, and selects it; no copy is stored
    assert seen["reused"] == "true" and f"“{dataset['name']}”" in seen["status"], seen["status"]
    assert "nothing new was stored" in seen["status"] and seen["selected_dataset"] == dataset["id"]
    assert [d["id"] for d in service.client.get("/v1/datasets").json()["items"]] == [dataset["id"]]

    # and the batch run again exits 0 with the same four jobs, submitting nothing
    replayed = run_sweep(service, tmp_path)
    assert [j["id"] for j in replayed] == [j["id"] for j in jobs] and not any(j["created"] for j in replayed)
    assert service.client.get("/v1/jobs").json()["total"] == 4
