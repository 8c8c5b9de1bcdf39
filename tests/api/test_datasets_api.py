"""POST/GET/DELETE /v1/datasets: the pre-flight report, refused files, and uploads that fail cleanly."""

from __future__ import annotations

import io
import json

from PIL import Image
from sqlalchemy import func, select

from api.services.quotas import storage_used
from loraq import storage
from loraq_client.fingerprint import dataset_fingerprint
from support.hostile import LIMITS, assert_one_created, hostile_uploads, same_time, zip_of as _zip
from loraq.models import Dataset
from trainer.files import scan_examples

LONG_CAPTION = " ".join(["a photo of a small red cat sitting on a wooden chair,"] * 8)


def assert_nothing_left(client, settings):
    """No dataset folder, no staging folder and no row: a refused upload leaves no trace."""
    for root in (storage.datasets_root(settings), storage.uploads_root(settings)):
        assert not root.exists() or not any(root.iterdir()), list(root.iterdir())
    with client.app.state.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0


def error_of(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == response.status_code, body
    return body["error"]["message"]


def test_zip_with_sidecar_captions_gets_a_report(client, settings, upload, png):
    # given a zip with captions beside two images, an uncaptioned duplicate, a PDF and a broken PNG
    red = png(64, 64, (255, 0, 0))
    response = upload({"a.png": red, "a.txt": "a red square", "b.png": png(32, 48, (0, 0, 255)),
                       "b.txt": LONG_CAPTION, "c.png": red, "notes.pdf": b"%PDF-1.4",
                       "broken.png": b"\x89PNG not really", ".DS_Store": b"junk"}, name="shapes.zip")

    # then the dataset holds the three good images and says what it refused
    assert response.status_code == 201, response.text
    body = response.json()
    report = body["report"]
    assert (body["name"], body["image_count"], body["captioned_count"]) == ("shapes", 3, 2)
    assert (report["image_count"], report["captioned_count"], report["uncaptioned_count"]) == (3, 2, 1)
    assert report["min_size"] == [32, 48] and report["max_size"] == [64, 64]
    assert report["smaller_than"] == {"512": 3, "768": 3, "1024": 3}
    assert report["duplicates"] == [["a.png", "c.png"]]
    assert report["long_captions"]["files"] == ["b.png"] and report["long_captions"]["estimate"] is True
    # aspect-ratio buckets at 512 (kohya's defaults: 256..1024 in steps of 64): the squares go to
    # 512x512; 32x48 (ratio 0.667) to 384x640 (0.6; the next, 448x576, is 0.778)
    plan = {plan["resolution"]: plan for plan in report["bucket_plans"]}
    assert (plan[512]["min_bucket_reso"], plan[512]["max_bucket_reso"], plan[512]["bucket_reso_steps"]) == (256, 1024, 64)
    assert plan[512]["buckets"] == [{"width": 512, "height": 512, "images": 2}, {"width": 384, "height": 640, "images": 1}]
    assert sum(bucket["images"] for bucket in plan[1024]["buckets"]) == 3
    refused = {item["file"]: item["reason"] for item in report["refused"]}
    assert set(refused) == {"notes.pdf", "broken.png"}
    assert "not an image" in refused["notes.pdf"]
    folder = storage.dataset_dir(settings, body["id"])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "a.png", "a.txt", "b.png", "b.txt", "c.png"]
    assert not any(storage.uploads_root(settings).iterdir())
    assert len(body["thumbnails"]) == 3
    assert body["captions"][0] == {"file": "a.png", "caption": "a red square"}


def test_show_dataset_serves_thumbnails(client, upload, png):
    created = upload({"a.png": png(64, 40), "a.txt": "x"}).json()

    shown = client.get(f"/v1/datasets/{created['id']}")
    thumb = client.get(shown.json()["thumbnails"][0])

    assert shown.status_code == 200 and shown.json()["report"] == created["report"]
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 40)
    assert client.get(f"/v1/datasets/{created['id']}/thumbnails/1").status_code == 404
    assert client.get(f"/v1/datasets/{created['id']}/thumbnails/9").status_code == 422


def test_zip_with_one_top_folder_and_metadata(upload, png):
    response = upload({"photos/": b"", "photos/a.png": png(), "photos/b.png": png(color=(1, 2, 3)),
                       "photos/metadata.jsonl": '{"file_name": "a.png", "text": "first"}\n'})

    assert response.status_code == 201, response.text
    assert (response.json()["image_count"], response.json()["captioned_count"]) == (2, 1)


def test_many_files_with_metadata_jsonl(client, settings, png):
    # given images with awkward names, a metadata.jsonl (one row without an image) and a name field
    metadata = "\n".join(json.dumps(row) for row in [
        {"file_name": "my cat.png", "text": "a cat"}, {"file_name": "dog.jpg", "text": "a dog"},
        {"file_name": "ghost.png", "text": "nobody"}])
    files = [("files", ("my cat.png", png(40, 30), "image/png")),
             ("files", ("dog.jpg", png(600, 8, fmt="JPEG"), "image/jpeg")),
             ("files", ("bird.webp", png(800, 900, (9, 9, 9), fmt="WEBP"), "image/webp")),
             ("files", ("metadata.jsonl", metadata.encode(), "application/jsonl"))]

    response = client.post("/v1/datasets", files=files, data={"name": "pets"})

    # then names are flattened, the ghost row is a warning, and the trainer accepts the folder as stored
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["image_count"], body["captioned_count"]) == ("pets", 3, 2)
    assert body["report"]["smaller_than"] == {"512": 2, "768": 2, "1024": 3}
    assert any("ghost.png" in warning for warning in body["report"]["warnings"])
    folder = storage.dataset_dir(settings, body["id"])
    assert (folder / "my_cat.png").is_file()
    stored = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in stored] == ["my_cat.png", "dog.jpg"]
    assert len(scan_examples(folder, missing_captions="empty")) == 3


def test_many_small_files_and_an_empty_caption(client, settings, multipart, png):
    parts = [part for n in range(150) for part in (("files", f"{n}.png", png(8, 8, (n, 0, 0))),
                                                   ("files", f"{n}.txt", f"image {n}".encode()))]
    parts[1] = ("files", "0.txt", b"")  # an empty file is kept: image 0 is then uncaptioned
    body, headers = multipart(parts)

    response = client.post("/v1/datasets", content=body, headers=headers)

    assert response.status_code == 201, response.text
    assert (response.json()["image_count"], response.json()["captioned_count"]) == (150, 149)
    assert (storage.dataset_dir(settings, response.json()["id"]) / "0.txt").read_bytes() == b""


def test_image_over_the_pixel_limit_is_refused_from_its_header(make_client, settings, zip_bytes, png):
    client = make_client(settings.model_copy(update={"max_image_pixels": 1000}))

    response = client.post("/v1/datasets", files={"files": ("d.zip", zip_bytes(
        {"big.png": png(64, 64), "small.png": png(16, 16)}), "application/zip")})

    assert response.status_code == 201, response.text
    assert response.json()["image_count"] == 1
    assert response.json()["report"]["refused"] == [
        {"file": "big.png", "reason": "64x64 pixels is over the limit of 1000"}]


MALFORMED_ZIPS = {
    "only non-images": ({"a.txt": "caption", "b.pdf": b"%PDF"}, 422, "b.pdf: not an image"),
    "no image decodes": ({"bad.png": b"\x89PNG broken", "bad.txt": "x"}, 422, "bad.png: not a readable image"),
    "empty zip": ({}, 422, "no images found"),
    "bad metadata": ({"a.png": None, "metadata.jsonl": "{not json"}, 422, "metadata.jsonl line 1"),
}


def test_malformed_zips_are_refused_and_leave_nothing(client, settings, upload, png, subtests):
    for case, (entries, status, message) in MALFORMED_ZIPS.items():
        with subtests.test(case):
            response = upload({name: png() if data is None else data for name, data in entries.items()})

            assert response.status_code == status, response.text
            assert message in error_of(response)
            assert_nothing_left(client, settings)


PNG, ZIP = object(), object()  # stand-ins for a small PNG and a zip holding one
BAD_UPLOADS = {
    "zip name, not a zip": ([("files", "data.zip", b"hello")], 415, "data.zip: not a zip archive"),
    "one non-image file": ([("files", "notes.txt", b"hello")], 415, "expected a zip archive or an image"),
    "no files": ([("name", None, b"just a name")], 422, "no files uploaded"),
    "zip among images": ([("files", "a.zip", ZIP), ("files", "b.png", PNG)], 400, "send one zip file on its own"),
    "unknown field": ([("files", "a.png", PNG), ("color", None, b"red")], 422, "color: unknown form field"),
    "file in other field": ([("images", "a.png", PNG)], 422, "files go in the form field 'files'"),
    "control character in name": ([("files", "a.png", PNG), ("name", None, b"a\x07b")], 422,
                                  "name: control characters are not allowed"),
    "name over 200 characters": ([("files", "a.png", PNG), ("name", None, b"n" * 201)], 422,
                                 "name: longer than 200 characters"),
    "one broken image": ([("files", "a.png", b"not a png")], 422, "a.png: not a readable image"),
}


def test_bad_uploads_are_refused_and_leave_nothing(client, settings, png, zip_bytes, multipart, subtests):
    stand_ins = {PNG: png(), ZIP: zip_bytes({"a.png": png()})}
    for case, (parts, status, message) in BAD_UPLOADS.items():
        with subtests.test(case):
            body, headers = multipart([(field, name, stand_ins.get(data, data)) for field, name, data in parts])

            response = client.post("/v1/datasets", content=body, headers=headers)

            assert response.status_code == status, response.text
            assert message in error_of(response)
            assert_nothing_left(client, settings)
    with subtests.test("not multipart"):
        response = client.post("/v1/datasets", data={"name": "x"})

        assert response.status_code == 415 and "multipart/form-data" in error_of(response)


# The hostile uploads (tests/support/hostile.py) in process; tests/faults sends the same bytes to
# a running server.
HOSTILE = hostile_uploads(LIMITS)


def test_hostile_uploads_are_refused_and_leave_nothing(make_client, settings, subtests):
    client = make_client(settings.model_copy(update=LIMITS.settings()))
    for upload in HOSTILE:
        with subtests.test(upload.name):
            response = client.post("/v1/datasets", **upload.request())

            assert response.status_code == upload.status, response.text
            assert upload.message in error_of(response)
            assert_nothing_left(client, settings)


def test_list_show_and_delete(client, settings, upload, png):
    first = upload({"a.png": png()}, name="first.zip").json()
    second = upload({"a.png": png(color=(1, 2, 3))}, name="second.zip").json()

    listed = client.get("/v1/datasets").json()
    deleted = client.delete(f"/v1/datasets/{first['id']}")

    assert [d["name"] for d in listed["items"]] == ["second", "first"] and listed["total"] == 2
    assert "report" not in listed["items"][0]
    assert deleted.status_code == 204
    assert client.get(f"/v1/datasets/{first['id']}").status_code == 404
    assert not storage.dataset_dir(settings, first["id"]).exists()
    assert storage.dataset_dir(settings, second["id"]).is_dir()


def test_unknown_dataset_is_404(client):
    for response in (client.get("/v1/datasets/nope"), client.delete("/v1/datasets/nope"),
                     client.get("/v1/datasets/nope/thumbnails/0")):
        assert response.status_code == 404 and error_of(response) == "dataset nope not found"


def test_dataset_used_by_a_job_cannot_be_deleted(client, session, dataset_id, submit):
    from loraq.jobs import transition
    from loraq.models import JobState

    job = submit().json()
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 409
    transition(session, job["id"], JobState.queued, JobState.canceled)
    session.commit()

    response = client.delete(f"/v1/datasets/{dataset_id}")

    assert response.status_code == 409 and "used by 1 job(s)" in error_of(response)
    listed = client.get("/v1/jobs", params={"dataset_id": dataset_id}).json()
    assert f"?dataset_id={dataset_id}" in error_of(response) and [j["id"] for j in listed["items"]] == [job["id"]]
    assert client.get("/v1/jobs", params={"dataset_id": "0" * 32}).json()["total"] == 0


# --------------------------------------------------------------------------------------------
# Identical uploads are one dataset (issue 10)

SQUARES = {"a.png": ("red", (255, 0, 0)), "b.png": ("green", (0, 255, 0))}


def squares(png) -> dict[str, bytes]:
    files = {}
    for name, (caption, color) in SQUARES.items():
        files[name] = png(color=color)
        files[name.replace(".png", ".txt")] = f"a {caption} square".encode()
    return files


def dataset_folders(settings) -> list[str]:
    root = storage.datasets_root(settings)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def used(client, owner: str = "admin") -> int:
    with client.app.state.session_factory() as session:
        return storage_used(session, owner)


def test_identical_upload_reuses_the_dataset_and_stores_nothing(client, settings, upload, png, multipart,
                                                                tmp_path):
    files = squares(png)
    first = upload(files, name="squares.zip")
    assert first.status_code == 201 and first.json()["reused"] is False, first.text
    assert first.headers["x-loraq-dataset-reused"] == "false"
    dataset = first.json()
    # the server's hash is the client's: a folder with these files hashes the same
    folder = tmp_path / "squares"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert dataset["content_hash"] == dataset_fingerprint(folder)
    folders, stored = dataset_folders(settings), used(client)

    # the same zip again, the same files sent one by one (the dashboard's and curl's way), and a
    # zip holding them in one top folder: each the same dataset, and nothing more stored
    body, headers = multipart([("files", name, data) for name, data in files.items()])
    again = [upload(files, name="again.zip"), client.post("/v1/datasets", content=body, headers=headers),
             upload({f"squares/{name}": data for name, data in files.items()}, name="nested.zip")]
    for response in again:
        assert response.status_code == 200, response.text
        assert response.headers["x-loraq-dataset-reused"] == "true"
        assert response.json()["reused"] is True
        assert {k: v for k, v in response.json().items() if k != "reused"} == \
            {k: v for k, v in dataset.items() if k != "reused"}
    assert dataset_folders(settings) == folders and used(client) == stored
    assert not any(storage.uploads_root(settings).iterdir())
    assert client.get("/v1/datasets").json()["total"] == 1

    # ?dedupe=false stores a second copy; a plain upload still answers with the oldest
    copy = client.post("/v1/datasets", params={"dedupe": "false"},
                       files={"files": ("copy.zip", _zip(files), "application/zip")})
    assert copy.status_code == 201 and copy.json()["reused"] is False, copy.text
    assert copy.json()["id"] != dataset["id"] and copy.json()["content_hash"] == dataset["content_hash"]
    assert used(client) == 2 * stored and len(dataset_folders(settings)) == 2
    assert upload(files).json()["id"] == dataset["id"]
    # one changed byte is another dataset
    changed = upload({**files, "a.txt": b"a red square!"})
    assert changed.status_code == 201 and changed.json()["id"] != dataset["id"]
    listed = client.get("/v1/datasets", params={"content_hash": dataset["content_hash"]}).json()
    assert sorted(d["id"] for d in listed["items"]) == sorted([dataset["id"], copy.json()["id"]])


def test_reuse_stays_within_one_owner(client, settings, upload, png):
    bob = {"Authorization": f"Bearer {client.post('/v1/keys', json={'owner': 'bob'}).json()['key']}"}
    carol = {"Authorization": f"Bearer {client.post('/v1/keys', json={'owner': 'carol'}).json()['key']}"}
    zipped = _zip(squares(png))

    def post(headers=None):
        return client.post("/v1/datasets", headers=headers, files={"files": ("s.zip", zipped, "application/zip")})

    bobs = post(bob)
    assert bobs.status_code == 201 and bobs.json()["owner"] == "bob", bobs.text
    # the admin sees bob's dataset, yet an admin's upload reuses only the admin's own
    admins = post()
    carols = post(carol)
    assert admins.status_code == 201 and carols.status_code == 201, (admins.text, carols.text)
    ids = {bobs.json()["id"], admins.json()["id"], carols.json()["id"]}
    assert len(ids) == 3
    for headers, mine in ((bob, bobs), (None, admins), (carol, carols)):
        again = post(headers)
        assert again.status_code == 200 and again.json()["id"] == mine.json()["id"], again.text
    content = bobs.json()["content_hash"]
    as_bob = client.get("/v1/datasets", params={"content_hash": content}, headers=bob).json()
    assert [(d["id"], d["owner"]) for d in as_bob["items"]] == [(bobs.json()["id"], "bob")]
    as_admin = client.get("/v1/datasets", params={"content_hash": content}).json()
    assert {d["owner"] for d in as_admin["items"]} == {"admin", "bob", "carol"}
    assert len(dataset_folders(settings)) == 3
    assert (used(client, "bob"), used(client, "carol")) == (bobs.json()["total_bytes"], carols.json()["total_bytes"])


def test_racing_identical_uploads_store_one_dataset(client, settings, png):
    zipped = _zip(squares(png))

    responses = same_time(6, lambda _: client.post("/v1/datasets", files={
        "files": ("s.zip", zipped, "application/zip")}))

    dataset_id = assert_one_created(responses)
    assert dataset_folders(settings) == [dataset_id]
    assert client.get("/v1/datasets").json()["total"] == 1
    assert not any(storage.uploads_root(settings).iterdir())


def test_a_reused_upload_is_never_refused_for_storage(make_client, client, settings, png, zip_bytes):
    files = squares(png)
    first = client.post("/v1/datasets", files={"files": ("s.zip", zip_bytes(files), "application/zip")})
    size = first.json()["total_bytes"]
    other = {"c.png": png(color=(9, 9, 9)), "c.txt": b"x" * (size // 2)}

    def post(to, entries, headers=None):
        return to.post("/v1/datasets", headers=headers, files={"files": ("s.zip", zip_bytes(entries), "application/zip")})

    # under the limit, though a second copy would not fit: reused, not refused; a new one is a 413
    roomy = make_client(settings.model_copy(update={"max_storage_bytes": size + size // 3}))
    assert post(roomy, files).status_code == 200
    assert post(roomy, other).status_code == 413
    # at the limit: refused before the body is read, unless the client names the content it sends
    # and that is a dataset of the owner's (reused); a hint that lies meets the exact check
    full = make_client(settings.model_copy(update={"max_storage_bytes": size}))
    hint = {"X-Loraq-Content-Hash": first.json()["content_hash"]}
    assert post(full, files).status_code == 413
    reused = post(full, files, hint)
    assert reused.status_code == 200 and reused.json()["id"] == first.json()["id"], reused.text
    lying = post(full, other, hint)
    assert lying.status_code == 413 and "storage limit" in error_of(lying)
    assert post(full, files, {"X-Loraq-Content-Hash": "nothex"}).status_code == 422
    assert dataset_folders(settings) == [first.json()["id"]] and used(client) == size
    assert not any(storage.uploads_root(settings).iterdir())
