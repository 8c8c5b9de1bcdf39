"""The client's own logic without a service: SSE resume, resumable download, errors, batch planning."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from loraq_client import Client, LoraqError
from loraq_client.batch import BatchError, key_fingerprint, plan, yaml_scalar
from loraq_client.client import zip_folder
from loraq_client.fingerprint import dataset_fingerprint


def sse(*events) -> bytes:
    return "".join(f"id: {i}\nevent: {t}\ndata: {json.dumps(d)}\n\n" for i, t, d in events).encode()


class Dropped(httpx.SyncByteStream):
    def __init__(self, body: bytes):
        self.body = body

    def __iter__(self):
        yield self.body
        raise httpx.RemoteProtocolError("peer closed connection")


def test_events_resume_with_last_event_id_after_a_drop():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            seen.append(request.headers.get("Last-Event-ID"))
            if len(seen) == 1:
                return httpx.Response(200, stream=Dropped(sse((1, "state", {"state": "running"}),
                                                              (2, "step", {"step": 1}))))
            return httpx.Response(200, content=sse((3, "step", {"step": 2}), (4, "state", {"state": "succeeded"})))
        return httpx.Response(200, json={"id": "j", "state": "succeeded", "step": 2, "total_steps": 2})

    client = Client("http://x", transport=httpx.MockTransport(handler), reconnect_delay=0)
    steps = []
    job = client.wait("j", on_event=lambda e: steps.append((e.id, e.type)))
    assert seen == [None, "2"]
    assert steps == [(1, "state"), (2, "step"), (3, "step"), (4, "state")]
    assert job.state == "succeeded" and job.final


def test_download_rewrites_when_range_is_ignored_and_checks_sha256(tmp_path):
    data = bytes(range(256)) * 100
    ranges = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json=[{"name": "a.bin", "kind": "lora", "size": len(data),
                                              "sha256": hashlib.sha256(data).hexdigest(), "step": 2, "url": ""}])
        ranges.append(request.headers.get("Range"))
        return httpx.Response(200, content=data)  # ignores Range

    client = Client("http://x", transport=httpx.MockTransport(handler))
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes")
    target = client.download("j", "a.bin", tmp_path)
    assert ranges == ["bytes=11-"] and target.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()


def test_errors_carry_the_servers_message_and_auth_header(monkeypatch):
    auth = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth.append(request.headers.get("Authorization"))
        return httpx.Response(422, json={"error": {"status": 422, "message": "resolution: bad"}})

    monkeypatch.setenv("LORAQ_API_KEY", "k1")
    client = Client("http://x", transport=httpx.MockTransport(handler))
    with pytest.raises(LoraqError) as caught:
        client.create_job("d", "tiny-sd", {"resolution": 30})
    assert (caught.value.status, caught.value.message) == (422, "resolution: bad")
    assert auth == ["Bearer k1"]


def test_batch_plan_keys_are_deterministic_and_content_based(tmp_path):
    for sub in ("alice", "bob"):
        (tmp_path / "people" / sub).mkdir(parents=True)
        (tmp_path / "people" / sub / "0.txt").write_text(f"photo of {sub}")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "0.txt").write_text("x")
    spec = {"base_model": "tiny-sd", "dataset": "one", "options": {"rank": 4},
            "grid": {"learning_rate": ["1e-4", 2.0e-4]}, "each_subfolder": "people",
            "jobs": [{"name": "explicit", "options": {"rank": 8}}, {"dataset": "D123", "name": "by-id"}]}
    jobs = plan(spec, tmp_path)
    assert len(jobs) == 8  # (2 explicit + 2 sub-folders) x 2 grid values
    assert [j.name for j in jobs][:2] == ["explicit-learning_rate=0.0001", "explicit-learning_rate=0.0002"]
    assert jobs[0].options == {"rank": 8, "learning_rate": 1e-4}
    assert jobs[2].dataset.id == "D123"
    assert {j.name for j in jobs[4:]} == {f"{p}-learning_rate={v}" for p in ("alice", "bob") for v in (0.0001, 0.0002)}
    assert len({j.key for j in jobs}) == 8
    assert [j.key for j in plan(spec, tmp_path)] == [j.key for j in jobs]
    (tmp_path / "people" / "bob" / "0.txt").write_text("changed")
    changed = plan(spec, tmp_path)
    assert [a.key == b.key for a, b in zip(jobs, changed)] == [True] * 6 + [False] * 2
    assert yaml_scalar("5e-5") == 5e-5 and yaml_scalar("true") is True and yaml_scalar("8") == 8
    with pytest.raises(BatchError, match="unknown key"):
        plan({"base_model": "m", "dataset": "D", "grdi": {}}, tmp_path)


def test_content_hash_is_the_same_for_a_folder_and_its_zips_and_keys_stay_as_before(tmp_path):
    # the server hashes what it unpacks (tests/api/test_datasets_api.py checks it against this)
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"PNGBYTES")
    (folder / "a.txt").write_bytes(b"cap")
    (folder / "sub" / "b.txt").write_bytes(b"x")
    (folder / ".hidden").write_bytes(b"left out")
    content = dataset_fingerprint(folder)
    assert dataset_fingerprint(zip_folder(folder, tmp_path / "plain.zip")) == content
    nested = tmp_path / "outer"
    (nested / "data").mkdir(parents=True)
    for path in folder.rglob("*"):
        target = nested / "data" / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            target.write_bytes(path.read_bytes())
    assert dataset_fingerprint(nested) == content  # one top folder: the server descends into it
    assert dataset_fingerprint(zip_folder(nested, tmp_path / "nested.zip")) == content
    (folder / "a.txt").write_bytes(b"cap!")
    assert dataset_fingerprint(folder) != content
    (folder / "a.txt").write_bytes(b"cap")
    # A batch's keys derive from the files as earlier versions hashed them, so reruns across
    # versions find their jobs (this value is what the previous client computed).
    assert key_fingerprint(folder) == "c849c50c754f9c5bb5c2da4800ef4096b6ecdd372d00e4c0e47a158a39f14664"
